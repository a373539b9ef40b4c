"""Packing that keeps documents apart: several examples share a block of data.seq_len tokens, and each one is
computed exactly as if it were alone.

Why each part:
- Bins, not a cut stream. Examples are placed whole into blocks by best-fit decreasing (longest first, each into
  the fullest block it still fits): no example is split across blocks, so no block starts inside a completion whose
  prompt is in another block. An example longer than seq_len is truncated to it (as without packing). Every block
  is kept, the last partial ones too (padded in the batch).
- Position ids restart at every document (rotary / learned positions as for the document alone).
- Attention is block-diagonal causal. transformers (`masking_utils`, 5.x) derives that mask itself from position
  ids when the model is called without an attention mask and without a cache, for sdpa, eager and flex attention;
  flash-attention runs varlen from the same position ids. A model whose attention code does not go through
  `masking_utils` gets an explicit 4-D mask instead (`losses.packed_forward_kwargs`).
- No label crosses a document boundary: the first token of every document gets no label, so the last token of
  the previous document never predicts it (alone, a first token is never a target either).
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass

import torch

from dora_dist.data.tokenize import IGNORE_INDEX

Example = tuple[list[int], list[int]]


@dataclass(frozen=True)
class PackingStats:
    """How well the examples filled their blocks (reported in the run's log line and summary.json)."""

    examples: int
    blocks: int
    seq_len: int
    real_tokens: int
    truncated: int

    @property
    def efficiency(self) -> float:
        """Real tokens / block tokens (blocks × seq_len): the fraction of computed positions that are not padding."""
        return self.real_tokens / max(1, self.blocks * self.seq_len)

    def to_dict(self) -> dict:
        return {
            "examples": self.examples,
            "blocks": self.blocks,
            "seq_len": self.seq_len,
            "real_tokens": self.real_tokens,
            "block_tokens": self.blocks * self.seq_len,
            "efficiency": round(self.efficiency, 6),
            "truncated_examples": self.truncated,
        }

    def describe(self) -> str:
        return (
            f"packing: {self.examples} examples in {self.blocks} blocks of {self.seq_len} tokens, efficiency "
            f"{100 * self.efficiency:.1f}% (real tokens / block tokens)"
            + (f", {self.truncated} truncated to seq_len" if self.truncated else "")
        )


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most `capacity` (every length ≤ capacity).

    Longest first (ties by index); each item goes to the open bin with the least room that still holds it (ties:
    the oldest bin), else to a new bin. Deterministic: the same lengths give the same bins. Open bins are kept by
    their room (at most `capacity` distinct values), so an item costs O(log capacity + capacity) at worst, not
    O(bins): a million examples pack in well under a minute."""
    bins: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct rooms that some open bin has
    by_room: dict[int, list[int]] = {}  # room -> heap of the ids of the bins with that room
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        at = bisect.bisect_left(rooms, length)
        if at < len(rooms):
            room = rooms[at]
            bin_id = heapq.heappop(by_room[room])
            if not by_room[room]:
                del by_room[room]
                rooms.pop(at)
        else:
            room, bin_id = capacity, len(bins)
            bins.append([])
        bins[bin_id].append(index)
        left = room - length
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            heapq.heappush(by_room[left], bin_id)
    return bins


def pack_documents(examples: list[Example], seq_len: int) -> tuple[list[Example], list[list[int]], PackingStats]:
    """(blocks, each block's document lengths, stats). Examples longer than seq_len are truncated first."""
    truncated = sum(1 for ids, _ in examples if len(ids) > seq_len)
    examples = [(ids[:seq_len], labels[:seq_len]) for ids, labels in examples]
    blocks, doc_lengths = [], []
    for members in best_fit_decreasing([len(ids) for ids, _ in examples], seq_len):
        ids_block: list[int] = []
        labels_block: list[int] = []
        for i in members:
            ids, labels = examples[i]
            ids_block.extend(ids)
            labels_block.append(IGNORE_INDEX)  # a document's first token is never predicted from its neighbour
            labels_block.extend(labels[1:])
        blocks.append((ids_block, labels_block))
        doc_lengths.append([len(examples[i][0]) for i in members])
    stats = PackingStats(len(examples), len(blocks), seq_len, sum(len(ids) for ids, _ in examples), truncated)
    return blocks, doc_lengths, stats


def position_ids(doc_lengths: list[int], length: int) -> list[int]:
    """0..n-1 for every document, then 0.. again over the padding up to `length` (a segment of its own)."""
    out = [p for n in doc_lengths for p in range(n)]
    return out + list(range(length - len(out)))


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) document index of every token: a new document wherever the position does not follow the previous."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """(B, 1, L, L) mask: token q sees token k iff k ≤ q in the same document. Boolean (True = attend) when dtype is
    None, else additive (0 or the dtype's minimum), the two forms attention code takes."""
    seg = segment_ids(position_ids)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    if dtype is None:
        return allowed[:, None]
    zero = torch.zeros((), dtype=dtype, device=position_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]
