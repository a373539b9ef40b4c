"""Data: load (synthetic / local file / hub), tokenize by format, pack or truncate, and serve the per-rank
micro-batches of each optimizer step through a deterministic, resumable global-batch sampler."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dora_dist.data.sampler import GlobalBatchSampler
from dora_dist.data.tokenize import IGNORE_INDEX, detect_format, encode_example, n_targets, pack, truncate

LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass
class TokenizedDataset:
    """Pre-tokenized examples (python lists) with their number of loss targets."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    targets: list[int]
    fmt: str
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def n_targets(self, indices) -> int:
        return sum(self.targets[i] for i in indices)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
        length = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(indices), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(indices), length), dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.tensor(self.input_ids[i])
            labels[row, :n] = torch.tensor(self.labels[i])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load_raw(dcfg, seed: int = 0):
    """A `datasets.Dataset` of raw examples, with a clear error for a missing file or split."""
    import datasets

    src = dcfg.source
    if src == "synthetic":
        from dora_dist.data import synthetic

        n = dcfg.synthetic_samples
        fmt = "text" if dcfg.format == "auto" else dcfg.format
        gen = {"text": synthetic.text_examples, "prompt_completion": synthetic.prompt_completion_pairs,
               "chat": synthetic.chat_examples}[fmt]
        return datasets.Dataset.from_list(gen(n, seed=0))
    path = Path(src).expanduser()
    looks_local = path.suffix.lower() in LOCAL_EXTENSIONS or src.startswith((".", "/", "~"))
    if looks_local and not path.exists():
        raise FileNotFoundError(f"data.source: file or directory not found: {src}")
    if path.is_file():
        builder = LOCAL_EXTENSIONS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"data.source: unsupported file type {path.suffix!r}; use one of "
                             f"{', '.join(LOCAL_EXTENSIONS)}")
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    elif path.is_dir():
        ds = datasets.load_dataset(str(path), split=dcfg.split)
    else:
        ds = datasets.load_dataset(src, dcfg.subset, split=dcfg.split)
    return ds


def build_dataset(cfg, tokenizer, env=None) -> TokenizedDataset:
    dcfg = cfg.data
    raw = load_raw(dcfg)
    if dcfg.max_samples:
        raw = raw.select(range(min(dcfg.max_samples, len(raw))))
    if len(raw) == 0:
        raise ValueError(f"data.source {dcfg.source!r} has no examples")
    fmt = detect_format(list(raw.column_names), dcfg)
    encoded = [encode_example(ex, fmt, tokenizer, dcfg) for ex in raw]
    encoded = pack(encoded, dcfg.seq_len) if dcfg.packing else truncate(encoded, dcfg.seq_len)
    encoded = [(i, l) for i, l in encoded if n_targets(l) > 0]
    if not encoded:
        raise ValueError(f"no training examples left after tokenization (seq_len={dcfg.seq_len}, "
                         f"packing={dcfg.packing}); check data.seq_len and the data fields")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenizedDataset([e[0] for e in encoded], [e[1] for e in encoded], [n_targets(e[1]) for e in encoded],
                            fmt, int(pad or 0))


__all__ = ["TokenizedDataset", "GlobalBatchSampler", "build_dataset", "load_raw", "IGNORE_INDEX"]
