"""A step with a NaN/inf loss or gradient is skipped (no update, no optimizer-state change, no LR tick; reported with
the step and the first parameter whose gradient is non-finite), and training.max_bad_steps of them in a row stop
the run with NonFiniteLossError, no checkpoint written inside the streak: under engine none (in this process) and
ddp / fsdp2 / zero2 / zero3 (2 gloo processes, one torchrun launch). The cases: tests/dist/nonfinite_worker.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netutil import run_workers  # noqa: E402
from nonfinite_worker import BAD_PARAM, GRAD_STEP, LOSS_STEP, run_cases  # noqa: E402


@pytest.fixture(scope="module")
def cache(builtin_cache) -> str:
    return str(builtin_cache)  # built once per session (tests/conftest.py)


def check(res: dict, names_param: bool = True) -> None:
    skip, stop = res["skip"], res["stop"]
    # --- "skip": the bad steps are skipped, the run finishes ---------------------------------------------------
    recs = skip["records"]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert [bool(r.get("skipped")) for r in recs] == [False, True, False, True, False]
    grad_rec, loss_rec = recs[GRAD_STEP - 1], recs[LOSS_STEP - 1]
    if names_param:  # the first bad gradient, by name
        assert grad_rec["bad_param"] == BAD_PARAM and BAD_PARAM in grad_rec["skip_reason"]
    else:  # ZeRO: DeepSpeed's partitions have no names
        assert grad_rec["bad_param"] is None and "the gradient norm is inf" in grad_rec["skip_reason"]
    assert math.isfinite(grad_rec["loss"]) and not math.isfinite(grad_rec["grad_norm"])
    assert math.isnan(loss_rec["loss"]) and "the loss is nan" in loss_rec["skip_reason"]
    per_step = {int(k): v for k, v in skip["per_step"].items()}
    for step, st in per_step.items():
        if step in (GRAD_STEP, LOSS_STEP):  # nothing moved, the LR schedule did not tick
            assert st["params_changed"] == 0 and st["opt_state_changed"] == 0, (step, st)
            assert st["sched_after"] == st["sched_before"], (step, st)
        else:  # a good step does change them (the snapshot can see a change)
            assert st["params_changed"] > 0 and st["opt_state_changed"] > 0, (step, st)
            assert st["sched_after"] == st["sched_before"] + 1, (step, st)
    assert recs[GRAD_STEP]["lr"] == recs[GRAD_STEP - 1]["lr"]  # step 3 runs at the LR step 2 would have had
    assert skip["summary"]["finished"] and skip["summary"]["steps"] == 5
    assert skip["summary"]["skipped_steps"] == [GRAD_STEP, LOSS_STEP]
    # checkpoints every 2 steps: the one due at skipped step 2 (and 4) is taken at the next good step
    assert skip["checkpoints"] == ["step_00000003", "step_00000005"]
    # --- "stop": NaN from step 2, max_bad_steps=2 -> stops at step 3 -------------------------------------------
    assert stop["error"] is not None
    assert "steps 2-3" in stop["error"] and "training.max_bad_steps=2" in stop["error"]
    assert "the loss is nan" in stop["error"] and "training.lr" in stop["error"]
    assert [bool(r.get("skipped")) for r in stop["records"]] == [False, True, True]
    assert stop["checkpoints"] == ["step_00000001"]  # the last good one; none for the streak
    assert not stop["adapter_written"]
    for step in (2, 3):
        st = stop["per_step"][step] if step in stop["per_step"] else stop["per_step"][str(step)]
        assert st["params_changed"] == 0 and st["opt_state_changed"] == 0


@pytest.mark.slow  # trains every fault case in-process: 20-50 s on 2 shared cores
def test_skip_and_stop_engine_none(tmp_path, cache):
    from dora_dist.parallel.dist_env import DistEnv

    env = DistEnv()  # one process, no process group
    check(run_cases(env, "none", tmp_path, cache))


@pytest.mark.dist
@pytest.mark.slow
def test_skip_and_stop_ddp_fsdp2_zero(tmp_path, cache):
    """One torchrun launch, 2 gloo ranks: ddp and fsdp2, and zero2 and zero3 when DeepSpeed is installed (there
    DeepSpeed skips a non-finite step itself, its overflow path, and the parameter is not named)."""
    import importlib.util

    engines = ["ddp", "fsdp2"] + (["zero2", "zero3"] if importlib.util.find_spec("deepspeed") else [])
    out = tmp_path / "results.json"
    run_workers(
        Path(__file__).with_name("nonfinite_worker.py"),
        ["--workdir", str(tmp_path), "--cache", cache, "--out", str(out), "--engines", ",".join(engines)],
        out,
    )
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    for engine in engines:
        check(res[engine], names_param=not engine.startswith("zero"))


@pytest.mark.slow  # a 3-step run with checkpoints: ~20 s on 2 shared cores
def test_engine_that_applies_a_nonfinite_step_stops_the_run(tmp_path, monkeypatch, cache):
    """An engine whose step cannot be skipped (DeepSpeed with bf16 adapters under ZeRO-2 applies a NaN step) stops
    the run at that step, whatever training.max_bad_steps says, and writes no checkpoint for it."""
    from nonfinite_worker import Injector, common_overrides

    import dora_dist.train as train_mod
    from dora_dist.config import load_config
    from dora_dist.parallel.base import Engine, StepResult
    from dora_dist.parallel.dist_env import DistEnv

    def always_step(self, loss_is_finite: bool = True) -> StepResult:  # clip and step whatever the loss
        grad_norm = self.clip_grad_norm(self.cfg.training.max_grad_norm)
        self.optimizer_step()
        return StepResult(grad_norm, stepped=True)

    monkeypatch.setattr(Engine, "guarded_step", always_step)
    out = tmp_path / "run"
    cfg = load_config(
        None,
        common_overrides(cache)
        + [
            "parallel.engine=none",
            "training.max_steps=3",
            "training.max_bad_steps=5",
            f"output.dir={out}",
            "checkpoint.every_steps=1",
        ],
    )
    with (
        Injector(DistEnv(), set(), {2}) as inj,
        pytest.raises(
            train_mod.NonFiniteLossError,
            match=r"step 2 had loss nan and gradient norm nan, and "
            r"parallel.engine=none applied it",
        ),
    ):
        train_mod.train(cfg)
    assert set(inj.per_step) == {1}  # step 2 raised inside train_step
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]


def test_max_bad_steps_is_validated():
    from dora_dist.config import ConfigError, load_config

    assert load_config(None, []).training.max_bad_steps == 5
    with pytest.raises(ConfigError, match="training.max_bad_steps"):
        load_config(None, ["training.max_bad_steps=0"])
    with pytest.raises(ConfigError, match="training.max_bad_steps"):
        load_config(None, ["training.max_bad_steps=two"])
