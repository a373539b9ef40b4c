"""DDP and FSDP2 on 2 real gloo processes == one process over the same global batch (losses, gradient norms, saved
adapter); DDP with a 4-bit (NF4) base == one process; FSDP2 magnitude init == single process; FSDP2
stop-and-resume == uninterrupted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dora_dist.config import load_config
from dora_dist.metrics import read_metrics

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from engine_worker import QDORA, common_overrides  # noqa: E402
from netutil import run_workers  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def cache(builtin_cache):
    return str(builtin_cache)  # built once per session (tests/conftest.py)


@pytest.fixture(scope="module")
def reference(workdir, cache):
    """The single-process run (in this process: no torchrun variables -> one process, engine none)."""
    from dora_dist.train import train

    out = workdir / "single"
    train(load_config(None, common_overrides(cache) + ["parallel.engine=none", f"output.dir={out}"]))
    recs = read_metrics(out)
    return {
        "losses": [r["loss"] for r in recs],
        "grad_norms": [r["grad_norm"] for r in recs],
        "records": recs,
        "adapter": load_file(str(out / "adapter" / "adapter_model.safetensors")),
    }


@pytest.fixture(scope="module")
def reference_nf4(workdir, cache):
    from dora_dist.train import train

    out = workdir / "single_nf4"
    train(load_config(None, common_overrides(cache) + QDORA + ["parallel.engine=none", f"output.dir={out}"]))
    recs = read_metrics(out)
    return {
        "losses": [r["loss"] for r in recs],
        "grad_norms": [r["grad_norm"] for r in recs],
        "records": recs,
        "adapter": load_file(str(out / "adapter" / "adapter_model.safetensors")),
    }


@pytest.fixture(scope="module")
def dist_results(workdir, cache, reference):
    out = workdir / "results.json"
    run_workers(
        Path(__file__).with_name("engine_worker.py"),
        ["--workdir", str(workdir), "--cache", cache, "--out", str(out)],
        out,
    )
    return json.loads(out.read_text())


FP64 = dict(rtol=1e-9, atol=1e-10)  # float64 runs: reduction order only (see engine_worker.common_overrides)


def adamw_drift_bound(lrs: list[float], beta1: float = 0.9, beta2: float = 0.999) -> float:
    """The largest elementwise difference two fp32 runs can reach through AdamW alone, whatever their gradients:
    step t moves each element by lr_t·|m̂_t|/(√v̂_t + ε), and by Cauchy–Schwarz over the gradient history
    |m̂_t|/√v̂_t ≤ κ_t = (1-β1)/(1-β1^t) · sqrt(Σ_j β1^(2j)/β2^j) / sqrt((1-β2)/(1-β2^t)) (κ_1 = 1: a sign flip of a
    near-zero gradient moves that element by 2·lr). Two runs thus differ by at most Σ_t 2·lr_t·κ_t per element."""
    bound = 0.0
    for t, lr in enumerate(lrs, start=1):
        history = sum(beta1 ** (2 * j) / beta2**j for j in range(t))
        kappa = (1 - beta1) / (1 - beta1**t) * history**0.5 / ((1 - beta2) / (1 - beta2**t)) ** 0.5
        bound += 2 * lr * kappa
    return bound


def assert_same_adapter(path: str, ref: dict, rtol=FP64["rtol"], atol=FP64["atol"]):
    got = load_file(str(Path(path) / "adapter_model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype
        torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    assert any(float(v.abs().max()) > 0 for k, v in got.items() if "lora_B" in k)  # it trained


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_engine_matches_single_process(dist_results, reference, engine):
    res = dist_results[engine]
    assert len(res["losses"]) == 4
    assert res["losses"] == pytest.approx(reference["losses"], rel=1e-12, abs=1e-12)
    assert res["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-10, abs=1e-12)
    assert_same_adapter(res["adapter"], reference["adapter"])


def test_ddp_qdora_matches_single_process(dist_results, reference_nf4):
    """fp32 (bitsandbytes has no fp64): losses and gradient norms to fp32 rounding; the adapter within the AdamW
    drift bound of its learning rates (a bound from the optimizer, not from what one CPU printed)."""
    res = dist_results["ddp_nf4"]
    assert len(res["losses"]) == 3
    assert res["losses"] == pytest.approx(reference_nf4["losses"], rel=1e-5, abs=1e-6)
    assert res["grad_norms"] == pytest.approx(reference_nf4["grad_norms"], rel=1e-4, abs=1e-6)
    lrs = [r["lr"] for r in reference_nf4["records"]]
    assert_same_adapter(res["adapter"], reference_nf4["adapter"], rtol=0, atol=adamw_drift_bound(lrs))


def test_fsdp2_magnitude_init_equals_single_process(dist_results):
    mag = dist_results["magnitude"]
    assert mag["n_layers"] == 14
    assert mag["magnitude_max_rel_err"] < 1e-6
    assert mag["rowsq_max_err"] < 1e-4  # the cached ‖W‖² (all-gathered (out,) floats)
    assert mag["probe_local_rows"] == 32  # down_proj, a (64, 99) weight: 32 + 32 rows (sharded, not gathered)
    assert mag["forward_max_err"] < 1e-5


def test_fsdp2_magnitude_init_conv1d_equals_single_process(dist_results):
    """GPT-2's Conv1D weights are sharded by input rows; the engine gathers one layer at a time for them."""
    mag = dist_results["magnitude_gpt2"]
    assert mag["n_layers"] == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    assert mag["magnitude_max_rel_err"] < 1e-6
    assert mag["rowsq_max_err"] < 1e-4
    assert mag["forward_max_err"] < 1e-5


def test_fsdp2_resume_equals_uninterrupted(dist_results, reference):
    res = dist_results["fsdp2_resume"]
    assert res["checkpoints_after_stop"] == ["step_00000002"]
    assert res["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6)
    assert_same_adapter(res["adapter"], reference["adapter"])


@pytest.fixture(scope="module")
def compile_results(workdir, cache):
    import shutil

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("inductor's CPU backend needs a C++ compiler (g++/clang++)")
    out = workdir / "compile_results.json"
    run_workers(
        Path(__file__).with_name("engine_worker.py"),
        ["--workdir", str(workdir), "--cache", cache, "--out", str(out), "--part", "compile"],
        out,
        timeout=1800,
    )
    return json.loads(out.read_text())


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_compiled_blocks_match_eager_single_process(compile_results, reference, engine):
    """training.compile=true (each decoder block torch.compile'd, DoRA layers inside) under DDP / FSDP2 gives the
    eager single-process losses: same fp32 math, reassociated by inductor (rel 1e-4 over 2 steps)."""
    res = compile_results[f"{engine}_compile"]
    assert len(res["losses"]) == 2
    assert res["losses"] == pytest.approx(reference["losses"][:2], rel=1e-4, abs=1e-6)
    assert res["grad_norms"] == pytest.approx(reference["grad_norms"][:2], rel=1e-3, abs=1e-6)


def test_fsdp2_chunked_loss_with_tied_embeddings_equals_plain(dist_results):
    res = dist_results["chunked_loss_fsdp2_tied"]
    assert res["loss_rel_err"] < 1e-6
    assert res["grad_max_rel_err"] < 1e-5
