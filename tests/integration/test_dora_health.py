"""DoRA's health in the training log, through `dora-dist train`: a healthy run (interrupted and resumed) logs per
group ΔM/ΔD equal to `dora-dist analyze` on its saved adapter and does not warn; a run whose magnitude is frozen
warns once, naming the causes."""

from __future__ import annotations

import json

import pytest
from health_expect import analyze_by_group, assert_logged_equals_analyze

from dora_dist.cli import main
from dora_dist.metrics import read_metrics

pytestmark = [pytest.mark.slow]
WARNING = "warning: DoRA looks like LoRA"


def _args(tmp_path, *extra: str) -> list[str]:
    return [
        "training.max_steps=4",
        "data.synthetic_samples=64",
        "data.seq_len=32",
        "output.progress_bar=false",
        "output.dora_health_every=1",
        f"model.cache_dir={tmp_path / 'cache'}",
        f"output.dir={tmp_path / 'run'}",
        "output.dora_health_warn_after=2",
        *extra,
    ]


def _base_dir(tmp_path):
    (base,) = (tmp_path / "cache").iterdir()
    return base


def test_healthy_resumed_run_matches_analyze_and_does_not_warn(tmp_path, capsys):
    assert main(["train", *_args(tmp_path, "training.stop_after_steps=2", "checkpoint.every_steps=2")]) == 0
    assert main(["train", *_args(tmp_path, "checkpoint.every_steps=2")]) == 0  # resumes from step 2
    out = capsys.readouterr().out
    assert "resumed_from=" in out and WARNING not in out
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:  # log_every = 1: every row carries the values
        assert r["dora_dm_rel_max"] > 1e-4 and r["dora_dm_rel_attn"] > 0 and r["dora_dd_mlp"] > 0
        assert r["dora_share_attn"] == pytest.approx(1.0, abs=1e-3)  # fp32 keeps the scale (test_health.py)
    last = rows[-1]
    # m₀ after the resume is the same ‖W‖ (recomputed from the base): the final values are analyze's
    assert_logged_equals_analyze(last, analyze_by_group(_base_dir(tmp_path), tmp_path / "run" / "adapter"))
    health = json.loads((tmp_path / "run" / "summary.json").read_text())["dora_health"]
    assert health["step"] == 4 and health["warning"] is None
    assert health["groups"]["attention"]["delta_d"] == last["dora_dd_attn"]
    assert health["groups"]["mlp"]["delta_m"] == last["dora_dm_mlp"]
    assert (tmp_path / "run" / "loss.png").is_file()


def test_frozen_magnitude_warns_once(tmp_path, capsys, monkeypatch):
    """The magnitude left out of training (torchtune #2250's symptom): the run warns once, from warn_after on."""
    from dora_dist import models
    from dora_dist.adapters.inject import dora_layers

    real = models.add_adapters

    def frozen_magnitude(model, cfg):
        model = real(model, cfg)
        for _, layer in dora_layers(model):
            layer.magnitude.requires_grad_(False)
        return model

    monkeypatch.setattr(models, "add_adapters", frozen_magnitude)
    assert main(["train", *_args(tmp_path, "output.plot=false")]) == 0
    out = capsys.readouterr().out
    assert out.count(WARNING) == 1 and "have not moved" in out and "magnitude is frozen" in out
    warning_line = next(line for line in out.splitlines() if WARNING in line)
    assert "after 2 steps" in warning_line
    rows = read_metrics(tmp_path / "run")
    assert all(r["dora_dm_rel_max"] == 0.0 for r in rows)  # m = m₀ bit for bit
    assert rows[-1]["dora_dd_attn"] > 0  # the direction still trains
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dora_health"]["warning"] == warning_line.strip()
