"""DoRA's health under FSDP2 on 2 real gloo processes (`torchrun -m dora_dist.train`): each rank measures its own
rows and the per-layer sums are all-reduced, so the logged values must be the one-process values of the same
adapter, and `dora-dist analyze`'s on the saved adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.dist, pytest.mark.slow]
sys.path.insert(0, str(Path(__file__).parent))
from health_expect import EPS32, analyze_by_group, assert_logged_equals_analyze  # noqa: E402
from netutil import run_workers  # noqa: E402


def _args(tmp_path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "training.max_steps=3",
        "data.synthetic_samples=64",
        "data.seq_len=32",
        "output.progress_bar=false",
        "output.dora_health_every=1",
        "output.plot=false",
        f"model.cache_dir={tmp_path / 'cache'}",
        f"output.dir={out_dir}",
        "checkpoint.every_steps=0",
        *extra,
    ]


def _one_process_health(base_dir: Path, adapter_dir: Path) -> dict:
    """The health record of the saved adapter computed in this process on whole layers (the default row views)."""
    from transformers import AutoModelForCausalLM

    from dora_dist.adapters import load_adapter
    from dora_dist.adapters.inject import dora_layers
    from dora_dist.health import RowView, finish_layers, group_record, layer_sums

    model = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    views = [RowView.whole_layer(name, layer, owner=True) for name, layer in dora_layers(model)]
    return group_record(finish_layers(*layer_sums(views, torch.float32)))


def assert_equals_one_process_measurement(last: dict, base, adapter) -> None:
    """The logged values equal the same adapter measured on whole layers in one process: the sharded sums add the
    same per-row fp32 values (W·Aᵀ of k rows vs all rows may differ by BLAS blocking: a few ε per row, relative) in
    another order."""
    for key, value in _one_process_health(base, adapter).items():
        tol = 1e-3 if key.startswith("dora_share") else 16 * EPS32
        assert last[key] == pytest.approx(value, rel=tol), key


def test_fsdp2_logged_health_equals_one_process(tmp_path):
    from dora_dist.config import load_job_config
    from dora_dist.train import train

    single = train(load_job_config(None, _args(tmp_path, tmp_path / "one")))  # also builds the cache
    out = tmp_path / "fsdp2"
    run_workers("-m", ["dora_dist.train", *_args(tmp_path, out, "parallel.engine=fsdp2")], out / "summary.json")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    (base,) = (tmp_path / "cache").iterdir()
    assert_logged_equals_analyze(last, analyze_by_group(base, out / "adapter"))
    assert_equals_one_process_measurement(last, base, out / "adapter")
    # ... and the one-process run's log: ΔM is 1-Lipschitz in m, so it moves by at most the two runs' mean |Δm|
    ref = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()][-1]
    from safetensors.torch import load_file

    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    drift = max(float((a[k].double() - b[k].double()).abs().mean()) for k in a if "magnitude" in k)
    for group in ("attn", "mlp"):
        assert abs(last[f"dora_dm_{group}"] - ref[f"dora_dm_{group}"]) <= drift + 16 * EPS32, group
    assert (
        single["dora_health"]["groups"].keys()
        == json.loads((out / "summary.json").read_text())["dora_health"]["groups"].keys()
    )


def test_zero3_logged_health_equals_analyze(tmp_path):
    """ZeRO-3: the adapter of each layer gathered, W·Aᵀ summed from the flat weight partitions (never the weight)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    run_workers(
        "-m",
        ["dora_dist.train", *_args(tmp_path, out, "parallel.engine=zero3", "training.max_steps=2")],
        out / "summary.json",
    )
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    (base,) = (tmp_path / "cache").iterdir()
    assert_logged_equals_analyze(last, analyze_by_group(base, out / "adapter"))
    assert_equals_one_process_measurement(last, base, out / "adapter")
