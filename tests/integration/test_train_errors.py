"""A non-finite loss is skipped, and training.max_bad_steps of them in a row stop the run with a clear error that
leaves only good checkpoints."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

import dora_dist.train as train_mod
from dora_dist.checkpoint import find_latest
from dora_dist.config import load_job_config
from dora_dist.metrics import read_metrics


def test_nan_loss_stops_cleanly(builtin_cache, tmp_path, monkeypatch, capsys):
    real = train_mod.micro_batch_loss
    calls = {"n": 0}

    def poisoned(model, batch, global_targets, **kwargs):
        calls["n"] += 1
        loss = real(model, batch, global_targets, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss  # 2 micro-batches per step: NaN from step 3

    monkeypatch.setattr(train_mod, "micro_batch_loss", poisoned)
    out = tmp_path / "run"
    overrides = [
        "training.max_steps=6",
        "data.synthetic_samples=200",
        "data.seq_len=32",
        "output.progress_bar=false",
        f"model.cache_dir={builtin_cache}",
        f"output.dir={out}",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=5",
        "training.max_bad_steps=2",
    ]
    with pytest.raises(train_mod.NonFiniteLossError, match=r"steps 3-4.*the loss is nan.*training.lr"):
        train_mod.train(load_job_config(None, overrides))
    capsys.readouterr()
    # through the entry point: one line, exit code 1 (a fault, not bad input), no traceback
    shutil.rmtree(out)
    calls["n"] = 0
    assert train_mod.main(overrides) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("dora_dist: error: ")]
    assert len(errors) == 1 and re.search(r"steps 3-4.*the loss is nan.*training.lr", errors[0])
    assert "Traceback" not in captured.err
    printed = captured.out
    assert "step 3 skipped: the loss is nan" in printed and "step 4 skipped" in printed
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [bool(r.get("skipped")) for r in recs] == [False, False, True, True]
    assert recs[2]["lr"] == recs[3]["lr"]  # the skipped step 3 did not tick the LR schedule
    latest = find_latest(out / "checkpoints")  # no checkpoint inside the streak that stopped
    assert latest is not None and latest.name == "step_00000002"
    assert not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())
    assert not (out / "adapter").exists()
    # the last checkpoint is usable: resuming (without the poison) finishes the run
    monkeypatch.setattr(train_mod, "micro_batch_loss", real)
    summary = train_mod.train(load_job_config(None, overrides))
    assert summary["finished"] and summary["steps"] == 6 and summary["skipped_steps"] == []
    assert torch.isfinite(torch.tensor(summary["last_loss"]))


def test_unmatched_target_module_is_a_clear_cli_error_and_writes_nothing(builtin_cache, tmp_path, capsys):
    from dora_dist.cli import main

    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "dora.target_modules=[q_proj,zz_proj]",
            "training.max_steps=1",
            "data.synthetic_samples=50",
            "data.seq_len=32",
            "output.progress_bar=false",
            f"model.cache_dir={builtin_cache}",
            f"output.dir={out}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "dora.target_modules" in err and "zz_proj" in err and "q_proj" in err  # names the bad one and what exists
    assert not out.exists() or not any((out / "checkpoints").glob("step_*"))
