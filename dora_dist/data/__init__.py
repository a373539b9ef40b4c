"""Data: load (synthetic / local file / hub), tokenize by format, pack or truncate, and serve the per-rank
micro-batches of each optimizer step through a deterministic, resumable global-batch sampler."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dora_dist.data.packing import PackingStats, pack_documents, position_ids
from dora_dist.data.sampler import GlobalBatchSampler
from dora_dist.data.tokenize import (
    IGNORE_INDEX,
    check_chat_template,
    check_lengths,
    detect_format,
    encode_example,
    n_targets,
    truncate,
)
from dora_dist.errors import DataError, InputNotFoundError, one_line

if TYPE_CHECKING:
    from dora_dist.config import Config
    from dora_dist.dist_env import DistEnv

LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass
class TokenizedDataset:
    """Pre-tokenized examples, or packed blocks of them (python lists), with their number of loss targets.
    doc_lengths: for packed blocks, the lengths of the documents in each block (None without packing)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    targets: list[int]
    fmt: str
    pad_id: int
    doc_lengths: list[list[int]] | None = None
    packing: PackingStats | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    def n_targets(self, indices) -> int:
        return sum(self.targets[i] for i in indices)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded batch: input_ids, labels (-100 on padding) and attention_mask; packed blocks get
        position_ids restarting at every document (and over the padding) instead of the mask, from which the model
        builds the block-diagonal causal mask (see data/packing.py)."""
        length = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(indices), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(indices), length), dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.tensor(self.input_ids[i])
            labels[row, :n] = torch.tensor(self.labels[i])
            mask[row, :n] = 1
        if self.doc_lengths is None:
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        positions = torch.tensor([position_ids(self.doc_lengths[i], length) for i in indices], dtype=torch.long)
        return {"input_ids": ids, "position_ids": positions, "labels": labels}


def load_raw(dcfg, seed: int = 0):
    """A `datasets.Dataset` of raw examples, with a clear error for a missing file or split."""
    import datasets

    src = dcfg.source
    if src == "synthetic":
        from dora_dist.data import synthetic

        n = dcfg.synthetic_samples
        fmt = "text" if dcfg.format == "auto" else dcfg.format
        gen = {
            "text": synthetic.text_examples,
            "prompt_completion": synthetic.prompt_completion_pairs,
            "chat": synthetic.chat_examples,
        }[fmt]
        return datasets.Dataset.from_list(gen(n, seed=0))
    check_source(src)
    path = Path(src).expanduser()
    if path.is_file():
        return _read_local_file(path)
    if path.is_dir():
        return datasets.load_dataset(str(path), split=dcfg.split)
    from dora_dist.hub import check_hub_dataset

    check_hub_dataset(src)  # one line, at once, for a dataset the hub does not have or cannot serve here
    return datasets.load_dataset(src, dcfg.subset, split=dcfg.split)


def check_source(src: str | None, key: str = "data.source") -> None:
    """A source that names a local path must exist: one with a data file's extension, one starting with ., / or ~,
    one with more than one '/' (a hub id has one), or one whose first folder exists here (`mydata/train` beside a
    `mydata/` folder). Anything else that does not exist is taken for a hub dataset id (see data/hub.py)."""
    if not src or src == "synthetic":
        return
    path = Path(src).expanduser()
    if path.exists():
        return
    first = src.replace("\\", "/").split("/")[0]
    beside_folder = "/" in src and first not in ("", ".", "..", "~") and Path(first).is_dir()
    looks_local = (
        path.suffix.lower() in LOCAL_EXTENSIONS
        or src.startswith((".", "/", "~"))
        or "\\" in src
        or src.count("/") > 1
        or beside_folder
    )
    if looks_local:
        why = f" ({first}/ exists here, so it was taken for a local path)" if beside_folder else ""
        raise InputNotFoundError(f"{key}: file or directory not found: {src}{why}")


def _read_local_file(path: Path):
    """One local data file through `datasets`; a file it cannot parse is a DataError naming the file and why."""
    import datasets

    builder = LOCAL_EXTENSIONS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"data.source: unsupported file type {path.suffix!r} ({path}); use one of {', '.join(LOCAL_EXTENSIONS)}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"data.source: {path} is empty (0 bytes); the data set has no examples")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own log of a parse error: we raise one line
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetsError, ValueError, UnicodeDecodeError, StopIteration) as exc:
        why = one_line(exc.__cause__ or exc) or "no records found"
        raise DataError(
            f"data.source: cannot read {path} as {builder} ({why}); check that the file is valid "
            f"{path.suffix.lstrip('.')}"
        ) from exc
    finally:
        datasets.logging.set_verbosity(verbosity)


def _load_eval_raw(dcfg):
    """The raw examples of data.eval_source (same formats and field keys as the training source)."""
    import dataclasses

    return load_raw(dataclasses.replace(dcfg, source=dcfg.eval_source, split=dcfg.eval_split, subset=dcfg.eval_subset))


def split_eval_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) example indices: a seeded draw of round(fraction·n) examples (at least 1, and at least one
    left for training), each list in the original order. Split before packing, so no block mixes the two."""
    import numpy as np

    n_eval = min(n - 1, max(1, round(fraction * n)))
    if n_eval < 1:
        raise DataError(f"data.eval_fraction={fraction} leaves no training example out of {n}")
    held = set(np.random.default_rng([seed, 0xE7A1]).permutation(n)[:n_eval].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def row_locator(source: str | None, rows: list[int] | None = None):
    """where(i) -> how an error names example i: "at line 151 of data.jsonl" for a local .jsonl/.csv/.txt file (its
    line number, blank lines and a csv header counted), else "number 151 of <source>" (counting from 1). `rows`:
    the examples' row numbers in the source when a subset was taken (data.eval_fraction)."""
    path = Path(source).expanduser() if source and source != "synthetic" else None
    lines: list[int] = []

    def where(i: int) -> str:
        row = rows[i] if rows is not None else i
        if path is not None and path.is_file() and path.suffix.lower() in (".jsonl", ".csv", ".txt"):
            if not lines:  # read only when an error names an example
                with path.open(encoding="utf-8", errors="replace") as f:
                    lines.extend(n for n, text in enumerate(f, 1) if text.strip())
                del lines[: path.suffix.lower() == ".csv"]  # the header
            if row < len(lines):
                return f"at line {lines[row]} of {source}"
        return f"number {row + 1} of {source or 'the data set'}"

    return where


def tokenize_raw(raw, dcfg, tokenizer, what: str = "training", where=None) -> TokenizedDataset:
    """Encode by format, truncate to seq_len, drop examples without loss targets, then pack whole examples into
    blocks (data.packing, see data/packing.py). where: see row_locator."""
    if len(raw) == 0:
        raise DataError(f"the {what} data set is empty (data.source={dcfg.source!r}); it has no examples")
    where = where or row_locator(dcfg.source)
    fmt = detect_format(list(raw.column_names), dcfg)
    check_chat_template(fmt, tokenizer, dcfg)
    encoded = [encode_example(ex, fmt, tokenizer, dcfg, index=i, where=where) for i, ex in enumerate(raw)]
    check_lengths(encoded, dcfg, what, where)
    kept = [i for i, (_, labels) in enumerate(truncate(encoded, dcfg.seq_len)) if n_targets(labels) > 0]
    if not kept:
        raise DataError(
            f"no {what} example has a token to learn from after tokenization (data.seq_len="
            f"{dcfg.seq_len}, data.packing={dcfg.packing}); check data.seq_len and the data fields"
        )
    encoded = [encoded[i] for i in kept]
    doc_lengths, stats = None, None
    if dcfg.packing:
        encoded, doc_lengths, stats = pack_documents(encoded, dcfg.seq_len)
    else:
        encoded = truncate(encoded, dcfg.seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenizedDataset(
        [e[0] for e in encoded],
        [e[1] for e in encoded],
        [n_targets(e[1]) for e in encoded],
        fmt,
        int(pad or 0),
        doc_lengths,
        stats,
    )


def build_datasets(
    cfg: Config, tokenizer, env: DistEnv | None = None
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """(train, eval or None): eval is data.eval_source, or a held-out data.eval_fraction of the raw examples."""
    dcfg = cfg.data
    raw = load_raw(dcfg)
    if dcfg.max_samples:
        raw = raw.select(range(min(dcfg.max_samples, len(raw))))
    if len(raw) == 0:
        raise DataError(f"the training data set is empty (data.source={dcfg.source!r}); it has no examples")
    eval_raw = None
    train_where = eval_where = row_locator(dcfg.source)
    if dcfg.eval_fraction:
        train_idx, eval_idx = split_eval_indices(len(raw), dcfg.eval_fraction, cfg.training.seed)
        raw, eval_raw = raw.select(train_idx), raw.select(eval_idx)
        train_where, eval_where = row_locator(dcfg.source, train_idx), row_locator(dcfg.source, eval_idx)
    elif dcfg.eval_source:
        eval_raw = _load_eval_raw(dcfg)
        eval_where = row_locator(dcfg.eval_source)
    if eval_raw is not None and dcfg.eval_max_samples:
        eval_raw = eval_raw.select(range(min(dcfg.eval_max_samples, len(eval_raw))))
    train = tokenize_raw(raw, dcfg, tokenizer, where=train_where)
    held = tokenize_raw(eval_raw, dcfg, tokenizer, "eval", eval_where) if eval_raw is not None else None
    return train, held


def build_dataset(cfg: Config, tokenizer, env: DistEnv | None = None) -> TokenizedDataset:
    """The training set alone (see build_datasets)."""
    return build_datasets(cfg, tokenizer, env)[0]


__all__ = [
    "check_source",
    "TokenizedDataset",
    "GlobalBatchSampler",
    "build_dataset",
    "build_datasets",
    "split_eval_indices",
    "load_raw",
    "IGNORE_INDEX",
]
