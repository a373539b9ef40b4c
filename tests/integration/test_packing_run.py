"""A packed run and an unpacked run of the same documents give the same loss at every step when each step's batch
holds the same documents (here: all of them), through `python -m dora_dist.train`; the packed run reports its
packing efficiency in the log and summary.json."""

from __future__ import annotations

import json

import pytest

from dora_dist.config import load_job_config
from dora_dist.data import build_dataset
from dora_dist.metrics import read_metrics
from dora_dist.models import load_tokenizer
from dora_dist.train import main

# two training runs end to end (~20 s together on 2 shared cores): the slow lane
pytestmark = pytest.mark.slow

N_DOCS = 12


def _args(tmp_path, builtin_cache, *extra: str) -> list[str]:
    # float64 base and adapters: the two runs differ only in summation order (1e-16), which AdamW cannot amplify
    # past ~1e-10 in 3 steps (see tests/dist/engine_worker.common_overrides); a leak moves the loss by ~1e-1.
    return [
        f"model.cache_dir={builtin_cache}",
        "data.format=prompt_completion",
        "data.seq_len=32",
        f"data.synthetic_samples={N_DOCS}",
        "training.max_steps=3",
        "training.lr=1e-2",
        "training.warmup_steps=0",
        "model.dtype=float64",
        "dora.adapter_dtype=float64",
        "checkpoint.every_steps=0",
        "output.plot=false",
        "output.progress_bar=false",
        "training.loss_chunk_tokens=17",
        *extra,
    ]


def test_packed_and_unpacked_runs_of_the_same_documents_have_the_same_losses(builtin_cache, tmp_path, capsys):
    cfg = load_job_config(None, _args(tmp_path, builtin_cache))
    blocks = build_dataset(cfg, load_tokenizer(cfg))
    assert blocks.packing.examples == N_DOCS and 1 < len(blocks) < N_DOCS  # documents do share blocks
    n = len(blocks)
    # packed: every block in one micro-batch (the partial ones padded); unpacked: 12 documents, 3 per micro-batch
    assert (
        main(
            _args(
                tmp_path,
                builtin_cache,
                f"output.dir={tmp_path / 'packed'}",
                f"training.global_batch_size={n}",
                f"training.micro_batch_size={n}",
            )
        )
        == 0
    )
    log = capsys.readouterr().out
    assert f"packing: {N_DOCS} examples in {n} blocks of 32 tokens, efficiency" in log
    assert (
        main(
            _args(
                tmp_path,
                builtin_cache,
                f"output.dir={tmp_path / 'unpacked'}",
                "data.packing=false",
                f"training.global_batch_size={N_DOCS}",
                "training.micro_batch_size=3",
            )
        )
        == 0
    )
    packed = [r["loss"] for r in read_metrics(tmp_path / "packed")]
    unpacked = [r["loss"] for r in read_metrics(tmp_path / "unpacked")]
    assert len(packed) == len(unpacked) == 3
    assert packed == pytest.approx(unpacked, rel=1e-9, abs=0), (packed, unpacked)
    assert packed[0] > packed[-1]  # it trains
    summary = json.loads((tmp_path / "packed" / "summary.json").read_text())
    stats = summary["packing"]
    assert stats["blocks"] == n and stats["block_tokens"] == 32 * n and stats["examples"] == N_DOCS
    assert stats["efficiency"] == pytest.approx(stats["real_tokens"] / stats["block_tokens"], abs=1e-6)
    assert json.loads((tmp_path / "unpacked" / "summary.json").read_text())["packing"] is None
