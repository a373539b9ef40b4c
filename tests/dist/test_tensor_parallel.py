"""Tensor parallelism (parallel.tp, parallel/tp.py) on gloo: 2 processes with tp=2 and 4 processes with dp=2 × tp=2,
fsdp2 and ddp, float64. Losses and the saved (PEFT-format) adapters equal a one-process run's to 1e-10 (float64:
the runs differ by reduction order, ~1e-16 per sum, which 4 AdamW steps cannot amplify past ~1e-10); the magnitude
init with nonzero lora_B equals the unsplit layer's norm (row-wise: partials summed over tp); the collectives counted
on the tp and dp groups equal plan.comm's prediction byte for byte; a tp=2 checkpoint resumes on tp=1 (2 processes),
in one process and on the same dp=2 × tp=2 mesh; DoRA's health and the eval loss equal one process's. NF4 bases
(ddp, each rank holding its rows / columns of the packed weight, quant/split4bit.py) in float32, bitsandbytes having
no float64 dequantize: losses to fp32 rounding and adapters within AdamW's drift bound of a one-process NF4 run (the
bound the project's other NF4 engine tests use), collectives equal to the prediction. One torchrun launch per world
size (tests/dist/tp_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from netutil import free_port  # noqa: E402
from test_engines import adamw_drift_bound  # noqa: E402
from tp_worker import NF4, NF4_RUNS, RUNS, STEPS, overrides  # noqa: E402

TOL = 1e-10
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))


def _run(cmd: list[str], timeout: int = 900) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{cmd[:4]} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _train_one_process(cache: str, out: Path, extra: list[str]) -> None:
    """One process (engine none), through the library API the workers use (`train(load_config(None, ...))`)."""
    args = overrides(cache, str(out), "none", extra)
    code = "import sys; from dora_dist.config import load_config; from dora_dist.train import train; "
    _run([sys.executable, "-c", code + "train(load_config(None, sys.argv[1:]))", *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("tp")
    cache = str(tmp_path_factory.mktemp("cache"))
    _train_one_process(cache, work / "reference", [])  # also builds the model cache before the launches
    _train_one_process(cache, work / "reference_nf4", NF4)  # and the NF4 runs' model
    for world in (2, 4):
        _run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(world),
                "--master-port",
                str(free_port()),
                str(Path(__file__).with_name("tp_worker.py")),
                "--workdir",
                str(work),
                "--cache",
                cache,
            ]
        )
    _train_one_process(cache, work / "resume_tp2_to_one", ["checkpoint.resume=auto"])
    return work, cache


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "eval_loss" not in r}


def eval_losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in recs if "eval_loss" in r]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


TRAINED = [n for world in RUNS.values() for n in world] + [
    "resume_tp2_to_tp1",
    "resume_tp2_to_one",
    "resume_tp2_to_tp2",
]


@pytest.mark.parametrize("name", TRAINED)
def test_losses_and_adapter_equal_one_process(runs, name):
    work, _ = runs
    ref, got = losses(work / "reference"), losses(work / name)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert set(got) <= set(ref) and max(got) == STEPS, f"{name}: steps {sorted(got)}"
    for step, loss in got.items():
        assert abs(loss - ref[step]) <= TOL, f"{name} step {step}: loss {loss!r}, one process {ref[step]!r}"
    evals = [eval_losses(work / run) for run in ("reference", name)]
    assert evals[0] and evals[1][-1] == pytest.approx(evals[0][-1], abs=TOL), f"{name}: eval {evals}"
    want, have = adapter(work / "reference"), adapter(work / name)
    assert sorted(have) == sorted(want)  # PEFT keys, whole tensors
    for key, t in want.items():
        assert have[key].shape == t.shape, key
        assert float((have[key] - t).abs().max()) <= TOL, f"{name}: {key}"
    assert json.loads((work / name / "adapter" / "adapter_config.json").read_text())["use_dora"] is True


def test_magnitude_init_and_forward_equal_unsplit(runs):
    work, _ = runs
    res = json.loads((work / "results_w2.json").read_text())["magnitude"]
    kinds = set(res["plan"].values())
    assert kinds == {"colwise", "rowwise"}
    # float64 norms of ≤ 96-element rows (plus the B·A terms): a few ulps
    assert max(res["magnitude_rel_err"].values()) < 1e-13, res["magnitude_rel_err"]
    assert res["forward_max_err"] < 1e-12


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", [n for world in NF4_RUNS.values() for n in world])
def test_nf4_losses_and_adapter_equal_one_process(runs, name):
    """float32: each loss is a mean over fp32 logits whose row-wise layers sum two partial outputs (one more
    rounding, ~1e-7 relative per sum), so rel 1e-5 as the project's other fp32 NF4 engine tests; the adapters within
    test_engines.adamw_drift_bound of the learning rates (a near-zero gradient whose sign differs by reduction order
    moves its element by up to 2·lr a step)."""
    work, _ = runs
    ref, got = losses(work / "reference_nf4"), losses(work / name)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-5, abs=1e-6)
    evals = [eval_losses(work / run) for run in ("reference_nf4", name)]
    assert evals[0] and evals[1][-1] == pytest.approx(evals[0][-1], rel=1e-5), f"{name}: eval {evals}"
    lrs = [r["lr"] for r in metrics(work / "reference_nf4") if "loss" in r and "eval_loss" not in r]
    bound = adamw_drift_bound(lrs)
    want, have = adapter(work / "reference_nf4"), adapter(work / name)
    assert sorted(have) == sorted(want)
    for key, t in want.items():
        assert have[key].shape == t.shape and have[key].dtype == t.dtype == torch.float32, key
        assert float((have[key] - t).abs().max()) <= bound, f"{name}: {key}"
    assert any(float(t.abs().max()) > 0 for k, t in have.items() if "lora_B" in k)  # it trained
    # DoRA's health through each rank's part of the packed weight: ΔM is a mean of |m - m0|, so it moves by at most
    # the adapters' drift (m0 equal to fp32 rounding)
    h_want = json.loads((work / "reference_nf4" / "summary.json").read_text())["dora_health"]
    h_have = json.loads((work / name / "summary.json").read_text())["dora_health"]
    assert sorted(h_have["groups"]) == sorted(h_want["groups"]) == ["attention", "mlp"]
    for group, values in h_want["groups"].items():
        assert abs(h_have["groups"][group]["delta_m"] - values["delta_m"]) <= bound, group


def test_nf4_split_layers_equal_unsplit(runs):
    """A tp=2 split of an NF4 model with nonzero lora_B (fp32): column-wise layers hold exactly the unsplit rows;
    row-wise ones sum two partials. ‖W‖² per row within γ_n = n·u (u = 2⁻²⁴, n ≤ 256 inputs), W·Aᵀ within
    2·n·u·(|W|·|A|ᵀ), the magnitudes and the forward within 1e-5 relative (≈ n·u), lora_A gathered exactly."""
    work, _ = runs
    res = json.loads((work / "results_w2.json").read_text())["nf4"]
    assert set(res["plan"].values()) == {"colwise", "rowwise"}
    assert max(res["magnitude_rel_err"].values()) < 1e-5, res["magnitude_rel_err"]
    assert res["forward_rel_err"] < 1e-5
    for name, h in res["health"].items():
        kind = res["plan"][name]
        assert h["row_sq_rel"] <= h["in_features"] * 2.0**-24, name
        assert h["w_times_a"] <= h["w_times_a_bound"], name
        assert h["lora_A"] == 0.0, name
        # rank 0's rows: all of a row-wise layer (it counts them), the first half of a column-wise one
        assert h["rows"] == list(range(h["out_features"] // (2 if kind == "colwise" else 1))), name


ALL_RUNS = {w: {**RUNS[w], **NF4_RUNS[w]} for w in RUNS}


@pytest.mark.parametrize("world,name", [(w, n) for w, names in ALL_RUNS.items() for n in names])
def test_collectives_equal_prediction(runs, world, name):
    from dora_dist.config import load_config
    from dora_dist.plan.comm import KINDS, bytes_by_dim, predict_collectives
    from dora_dist.plan.model_spec import model_spec

    work, cache = runs
    engine, extra = ALL_RUNS[world][name]
    cfg = load_config(None, overrides(cache, str(work / name), engine, extra))
    predicted = bytes_by_dim(predict_collectives(cfg, model_spec(cfg), engine, world))
    assert predicted["tp"]["all_reduce"] > 0
    total = {k: sum(d.get(k, 0) for d in predicted.values()) for k in KINDS}
    for rank in range(world):
        data = json.loads((work / name / "probe" / f"comm_rank{rank}.json").read_text())
        got = next(s for s in data["steps"] if s["step"] == STEPS)
        assert {k: got[f"comm_{k}_bytes"] for k in KINDS} == total, f"{name} rank {rank}"
        assert {k: got.get(f"comm_tp_{k}_bytes", 0) for k in KINDS} == predicted["tp"], f"{name} rank {rank}"


@pytest.mark.parametrize("name", TRAINED)
def test_dora_health_equals_one_process(runs, name):
    """summary.json's DoRA health (measured at the last step from each tp rank's rows; row-wise layers with W·Aᵀ
    summed over tp) equals the one-process values: ΔM, ΔD and |Δm|/m are float64 sums (1e-9), the effective share
    goes through the fp32 DoRA epilogue (a few fp32 roundings, 1e-6)."""
    work, _ = runs
    want = json.loads((work / "reference" / "summary.json").read_text())["dora_health"]
    have = json.loads((work / name / "summary.json").read_text())["dora_health"]
    assert have["step"] == want["step"] == STEPS
    assert sorted(have["groups"]) == sorted(want["groups"]) == ["attention", "mlp"]
    for group, values in want["groups"].items():
        for key, value in values.items():
            tol = 1e-6 if key == "effective_share" else 1e-9
            assert have["groups"][group][key] == pytest.approx(value, rel=tol), f"{name} {group} {key}"
    assert have["max_delta_m_rel"] == pytest.approx(want["max_delta_m_rel"], rel=1e-9)
