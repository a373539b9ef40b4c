"""Tensor parallelism (parallel.tp, parallel/tp.py) on gloo: 2 processes with tp=2 and 4 processes with dp=2 × tp=2,
fsdp2 and ddp, float64. Losses and the saved (PEFT-format) adapters equal a one-process run's to 1e-10 (float64:
the runs differ by reduction order, ~1e-16 per sum, which 4 AdamW steps cannot amplify past ~1e-10); the magnitude
init with nonzero lora_B equals the unsplit layer's norm (row-wise: partials summed over tp); the collectives counted
on the tp and dp groups equal plan.comm's prediction byte for byte; a tp=2 checkpoint resumes on tp=1 (2 processes),
in one process and on the same dp=2 × tp=2 mesh; DoRA's health and the eval loss equal one process's. One
torchrun launch per world size (tests/dist/tp_worker.py)."""

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
from tp_worker import RUNS, STEPS, overrides  # noqa: E402

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


@pytest.mark.parametrize("world,name", [(w, n) for w, names in RUNS.items() for n in names])
def test_collectives_equal_prediction(runs, world, name):
    from dora_dist.config import load_config
    from dora_dist.plan.comm import KINDS, bytes_by_dim, predict_collectives
    from dora_dist.plan.model_spec import model_spec

    work, cache = runs
    engine, extra = RUNS[world][name]
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
