"""Re-running into an output directory: a finished run is left as it is (or extended when max_steps grew), another
job's run or checkpoint is refused naming what changed, and the run's records only ever grow."""

from __future__ import annotations

import json
import os
import signal

import pytest

from dora_dist.checkpoint import find_latest
from dora_dist.cli import main
from dora_dist.config import ConfigError, load_job_config
from dora_dist.train import train

# seven tests of one to three training runs each (5-12 s per test on 2 shared cores, ~65 s together): the slow lane
pytestmark = pytest.mark.slow


def _args(tmp_path, builtin_cache, *extra: str) -> list[str]:
    return [
        "training.max_steps=3",
        "data.synthetic_samples=64",
        "data.seq_len=32",
        "output.progress_bar=false",
        "output.plot=false",
        f"model.cache_dir={builtin_cache}",
        f"output.dir={tmp_path / 'run'}",
        "checkpoint.every_steps=0",
        *extra,
    ]


def _snapshot(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_finished_run_is_recognised_and_left_as_is(builtin_cache, tmp_path, capsys):
    """No checkpoint at all (every_steps=0, save_final off): the re-run must not retrain and overwrite."""
    first = train(load_job_config(None, _args(tmp_path, builtin_cache)))
    assert first["finished"] and first["steps"] == 3
    before = _snapshot(tmp_path / "run")
    assert "adapter/adapter_model.safetensors" in before and "summary.json" in before
    capsys.readouterr()
    assert main(["train", *_args(tmp_path, builtin_cache)]) == 0
    out = capsys.readouterr().out
    assert "finished (3 steps" in out and "nothing to do" in out and "training.max_steps" in out
    assert _snapshot(tmp_path / "run") == before  # not a byte changed


def test_finished_run_of_another_job_is_refused(builtin_cache, tmp_path, capsys):
    train(load_job_config(None, _args(tmp_path, builtin_cache)))
    before = _snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"dora\.r: 8 -> 4.*data\.seq_len: 32 -> 48"):
        train(load_job_config(None, _args(tmp_path, builtin_cache, "dora.r=4", "data.seq_len=48")))
    with pytest.raises(ConfigError, match="checkpoint.resume=none would retrain"):
        train(load_job_config(None, _args(tmp_path, builtin_cache, "checkpoint.resume=none")))
    with pytest.raises(ConfigError, match="no checkpoint of its last step .it has none"):
        train(load_job_config(None, _args(tmp_path, builtin_cache, "training.max_steps=5")))
    assert _snapshot(tmp_path / "run") == before


def test_extending_a_finished_run_appends(builtin_cache, tmp_path):
    first = train(load_job_config(None, _args(tmp_path, builtin_cache, "checkpoint.save_final=true")))
    metrics = tmp_path / "run" / "metrics.jsonl"
    head = metrics.read_text().splitlines()
    assert len(head) == 3
    # the same config again: nothing to do, even with its final checkpoint there
    again = train(load_job_config(None, _args(tmp_path, builtin_cache, "checkpoint.save_final=true")))
    assert again.get("already_finished") and metrics.read_text().splitlines() == head
    longer = train(
        load_job_config(None, _args(tmp_path, builtin_cache, "checkpoint.save_final=true", "training.max_steps=5"))
    )
    assert longer["finished"] and longer["steps"] == 5
    lines = metrics.read_text().splitlines()
    assert lines[:3] == head and [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["first_loss"] == first["first_loss"]  # the run's, not this segment's
    assert [(s["start_step"], s["end_step"]) for s in summary["segments"]] == [(0, 3), (3, 5)]
    assert find_latest(tmp_path / "run" / "checkpoints").name == "step_00000005"


def test_resume_with_a_changed_config_is_refused(builtin_cache, tmp_path):
    stopped = train(
        load_job_config(
            None,
            _args(
                tmp_path,
                builtin_cache,
                "checkpoint.every_steps=2",
                "training.max_steps=4",
                "training.stop_after_steps=2",
            ),
        )
    )
    assert not stopped["finished"]
    ckpts = tmp_path / "run" / "checkpoints"
    before = _snapshot(ckpts)
    for override, named in [
        ("dora.r=4", "dora.r: 8 -> 4"),
        ("dora.target_modules=[q_proj,v_proj]", "dora.target_modules: 'all-linear' -> "),
        ("model.config={num_hidden_layers: 1}", "model.config: None -> "),
        ("training.seed=7", "training.seed: 42 -> 7"),
    ]:
        with pytest.raises(ConfigError) as err:
            train(
                load_job_config(
                    None, _args(tmp_path, builtin_cache, "checkpoint.every_steps=2", "training.max_steps=4", override)
                )
            )
        msg = str(err.value)
        assert named in msg and "step_00000002" in msg and "checkpoint.resume=none" in msg
    assert _snapshot(ckpts) == before
    # an engine that cannot read the format, or a world size it cannot load at: tests/unit/test_run_state.py


def _signal_at(monkeypatch, step: int, sig=signal.SIGUSR1) -> None:
    """This process signals itself during step `step`, as a scheduler would (the guard of train() catches it)."""
    import dora_dist.train as trainer

    real = trainer.train_step

    def train_step(job):
        if job.step + 1 == step:
            os.kill(os.getpid(), sig)
        return real(job)

    monkeypatch.setattr(trainer, "train_step", train_step)


def test_a_signal_stops_after_the_step_with_a_checkpoint_and_exit_75(builtin_cache, tmp_path, monkeypatch, capsys):
    import dora_dist.train as trainer

    marker = tmp_path / "requeue.json"
    monkeypatch.setenv("DORA_DIST_REQUEUE_FILE", str(marker))
    args = _args(tmp_path, builtin_cache, "training.max_steps=4", "checkpoint.every_steps=0")
    _signal_at(monkeypatch, 2, signal.SIGTERM)
    assert trainer.main(args) == 75
    assert "stopped by SIGTERM after step 2" in capsys.readouterr().out
    assert find_latest(tmp_path / "run" / "checkpoints").name == "step_00000002"  # although every_steps=0
    assert json.loads(marker.read_text())["step"] == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["preempted"] and not summary["finished"]
    marker.unlink()
    monkeypatch.undo()
    assert trainer.main(args) == 0 and not marker.exists()  # the requeued job finishes
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and [s["end_step"] for s in summary["segments"]] == [2, 4]


def test_a_signal_during_the_last_step_finishes_the_run(builtin_cache, tmp_path, monkeypatch):
    """Not a requeue: a run signalled in its last step is finished (exit 0); run again, it has nothing to do."""
    import dora_dist.train as trainer

    args = _args(tmp_path, builtin_cache)
    _signal_at(monkeypatch, 3)
    assert trainer.main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and not summary["preempted"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    monkeypatch.undo()
    assert trainer.main(args) == 0


def test_extension_under_warmup_and_cosine_uses_the_new_schedule_from_its_first_step(builtin_cache, tmp_path):
    """6 steps, then extended to 9 with warmup + cosine: every step of the extension (7 first) logs the 9-step
    schedule's lr, not the finished run's last one (LambdaLR.load_state_dict leaves the optimizer's old lr)."""
    from dora_dist.optim import warmup_cosine_lambda

    common = (
        "checkpoint.save_final=true",
        "training.lr=0.01",
        "training.warmup_steps=2",
        "training.lr_schedule=cosine",
        "training.min_lr_ratio=0.1",
    )
    train(load_job_config(None, _args(tmp_path, builtin_cache, *common, "training.max_steps=6")))
    assert main(["train", *_args(tmp_path, builtin_cache, *common, "training.max_steps=9")]) == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 10))
    six, nine = warmup_cosine_lambda(2, 6, 0.1, "cosine"), warmup_cosine_lambda(2, 9, 0.1, "cosine")
    for r in records:  # the lr logged at step s is the one step s used: schedule(s - 1)
        schedule = six if r["step"] <= 6 else nine
        assert r["lr"] == pytest.approx(0.01 * schedule(r["step"] - 1), rel=1e-12), r
    assert abs(nine(6) - six(5)) > 1e-3  # the stale value would be told apart
