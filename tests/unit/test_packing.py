"""Packing keeps documents apart (issue 22): whole examples in best-fit-decreasing bins, positions restarting at every
document, block-diagonal causal attention, no label across a boundary; a document computes the same packed with
any neighbour as alone."""

from __future__ import annotations

import random

import pytest
import torch
from _packing_helpers import TOLERANCE, encoded_examples, isolation_errors, tiny_dora_model

from dora_dist.data import IGNORE_INDEX, TokenizedDataset
from dora_dist.data.packing import best_fit_decreasing, block_causal_mask, pack_documents, position_ids
from dora_dist.data.tokenize import n_targets


@pytest.fixture(scope="module")
def cache(builtin_cache):
    return str(builtin_cache)  # built once per session (tests/conftest.py)


def test_best_fit_decreasing_places_every_item_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert bins == best_fit_decreasing(lengths, 64)  # deterministic
    # best fit: no two bins could be merged (each pair overflows), so at most one bin is at most half full
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert loads[0] + loads[1] > 64
    assert best_fit_decreasing([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]  # 5 then 4 open bins; 3 -> 4's, 2 -> 5's


def test_pack_documents_keeps_examples_whole_and_labels_inside_them():
    examples = [
        ([1, 2, 3], [1, 2, 3]),
        ([4, 5, 6, 7], [-100, -100, 6, 7]),
        ([8, 9], [8, 9]),
        ([10, 11, 12, 13, 14, 15], [10, 11, 12, 13, 14, 15]),
    ]
    blocks, lengths, stats = pack_documents(examples, 5)
    # longest first: the 6-token example is truncated to 5 (its own block); 4 + nothing fits 1 (no 1s); 3 + 2
    assert [b[0] for b in blocks] == [[10, 11, 12, 13, 14], [4, 5, 6, 7], [1, 2, 3, 8, 9]]
    assert lengths == [[5], [4], [3, 2]]
    # every document's first token is no target; the rest keep their labels
    assert [b[1] for b in blocks] == [[-100, 11, 12, 13, 14], [-100, -100, 6, 7], [-100, 2, 3, -100, 9]]
    assert sum(n_targets(b[1]) for b in blocks) == sum(n_targets(labels[:5]) for _, labels in examples)
    assert stats.truncated == 1 and stats.blocks == 3 and stats.real_tokens == 14
    assert stats.efficiency == pytest.approx(14 / 15)
    assert stats.to_dict()["block_tokens"] == 15


def test_collate_restarts_positions_per_document_and_over_padding():
    ds = TokenizedDataset(
        [[1, 2, 3, 4, 5], [6, 7, 8]], [[-100, 2, 3, -100, 5], [-100, 7, 8]], [3, 2], "text", 0, [[3, 2], [3]]
    )
    batch = ds.collate([0, 1])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert batch["labels"][1].tolist() == [-100, 7, 8, -100, -100]
    assert position_ids([2, 1], 6) == [0, 1, 0, 0, 1, 2]
    mask = block_causal_mask(batch["position_ids"][:1], None)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(mask, expected.bool())


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "chat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_document_computes_the_same_packed_with_any_neighbour_as_alone(cache, fmt, dtype):
    """Logits, loss and the training loss of a packed batch: each document as if alone, to the dtype's rounding
    (TOLERANCE). transformers builds the block-diagonal mask from the position ids (sdpa)."""
    model, tokenizer = tiny_dora_model(cache, dtype)
    examples = encoded_examples(tokenizer, fmt, 12, seed=3)
    errors = isolation_errors(model, examples, targets=[0, 1], neighbours=[2, 3, 4])
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_explicit_4d_mask_fallback_keeps_documents_apart(cache, attn):
    """A model whose attention does not derive masks from position ids gets the explicit block-causal 4-D mask:
    checked on the tiny Llama told to take that path."""
    model, tokenizer = tiny_dora_model(cache, torch.float32, attn)
    model._dora_dist_masks_from_position_ids = False  # the decision, cached on the model
    examples = encoded_examples(tokenizer, "prompt_completion", 8, seed=5)
    errors = isolation_errors(model, examples, targets=[0, 1], neighbours=[2, 3, 4])
    assert max(errors.values()) <= TOLERANCE[torch.float32], errors


def test_without_isolation_the_check_sees_the_leak(cache):
    """The check is sharp: the same blocks with one causal mask over the whole block (the old packing) fail it."""
    import _packing_helpers

    from dora_dist import losses

    model, tokenizer = tiny_dora_model(cache, torch.float32)
    examples = encoded_examples(tokenizer, "text", 6, seed=3)

    def leaky(model, batch):
        return {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"])}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(losses, "packed_forward_kwargs", leaky)
        patch.setattr(_packing_helpers, "packed_forward_kwargs", leaky)
        errors = isolation_errors(model, examples, targets=[0], neighbours=[1, 2])
    assert errors["logits"] > 1e-2 and errors["loss"] > 1e-3, errors


def test_packed_dataset_reports_efficiency_and_never_splits_an_example(cache, tmp_path):
    from dora_dist.config import load_config
    from dora_dist.data import build_dataset
    from dora_dist.models import load_tokenizer

    cfg = load_config(
        None,
        [f"model.cache_dir={cache}", "data.format=prompt_completion", "data.seq_len=64", "data.synthetic_samples=200"],
    )
    tokenizer = load_tokenizer(cfg)
    ds = build_dataset(cfg, tokenizer)
    assert ds.packing is not None and ds.packing.examples == 200 and len(ds) == ds.packing.blocks
    assert sum(sum(d) for d in ds.doc_lengths) == ds.packing.real_tokens == sum(len(i) for i in ds.input_ids)
    assert 0.9 < ds.packing.efficiency <= 1.0
    for labels, docs in zip(ds.labels, ds.doc_lengths, strict=True):
        start = 0
        for n in docs:  # every document starts with its prompt: no block starts inside a completion
            assert labels[start] == IGNORE_INDEX and labels[start + 1] == IGNORE_INDEX
            start += n
