"""run_state.py and preemption.py without a model: what may resume from what, how summaries grow, signals."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import pytest

from dora_dist.config import ConfigError, load_job_config
from dora_dist.parallel.capabilities import EngineCapabilities
from dora_dist.preemption import PreemptionGuard
from dora_dist.run_state import check_resume, identity_changes, merge_summary, run_identity, write_json_atomic


def _engine(name: str, fmt: str = "dcp", reshardable: bool = True):
    caps = EngineCapabilities(checkpoint_format=fmt, resumes_from=frozenset({fmt}), reshardable_checkpoints=reshardable)
    return SimpleNamespace(name=name, checkpoint_format=fmt, capabilities=caps)


def test_identity_changes_name_each_key():
    a, b = load_job_config(None, []), load_job_config(None, ["dora.r=16", "training.lr=1e-4", "data.seq_len=64"])
    changes = identity_changes(run_identity(a), run_identity(b))
    assert changes == ["dora.r: 8 -> 16", "data.seq_len: 128 -> 64"]  # lr does not define the run
    assert identity_changes({}, run_identity(b)) == []  # nothing recorded: nothing compared


@pytest.mark.parametrize(
    "saved, engine, world, error",
    [
        (("fsdp2", "dcp", 2), _engine("none"), 1, None),  # DCP reshards
        (("ddp", "dcp", 4), _engine("fsdp2"), 2, None),
        (("zero3", "deepspeed", 2), _engine("zero3", "deepspeed", False), 2, None),
        (("zero3", "deepspeed", 2), _engine("zero3", "deepspeed", False), 4, "written by 2 ranks.*resume with 2 ranks"),
        (("zero2", "deepspeed", 2), _engine("fsdp2"), 2, "parallel.engine=zero2 .deepspeed format.*fsdp2 cannot"),
        (("fsdp2", "dcp", 2), _engine("zero2", "deepspeed", False), 2, "parallel.engine=fsdp2 .dcp format.*zero2"),
    ],
)
def test_check_resume_formats_and_world_sizes(tmp_path, saved, engine, world, error):
    cfg = load_job_config(None, [])
    name, fmt, saved_world = saved
    info = {"engine": name, "format": fmt, "world_size": saved_world, "run": run_identity(cfg)}
    if error is None:
        check_resume(tmp_path, info, cfg, engine, world)
    else:
        with pytest.raises(ConfigError, match=error):
            check_resume(tmp_path, info, cfg, engine, world)


def test_merge_summary_appends_segments_and_keeps_the_first_loss():
    first = merge_summary(
        None,
        {
            "steps": 3,
            "engine": "fsdp2",
            "world_size": 2,
            "first_loss": 7.0,
            "last_loss": 6.0,
            "wall_s": 1.0,
            "preempted": True,
        },
        start_step=0,
    )
    second = merge_summary(
        first,
        {
            "steps": 5,
            "engine": "none",
            "world_size": 1,
            "first_loss": 5.9,
            "last_loss": 5.5,
            "wall_s": 2.0,
            "preempted": False,
        },
        start_step=3,
    )
    assert second["first_loss"] == 7.0 and second["last_loss"] == 5.5
    assert [(s["engine"], s["start_step"], s["end_step"]) for s in second["segments"]] == [
        ("fsdp2", 0, 3),
        ("none", 3, 5),
    ]
    restarted = merge_summary(
        second,
        {
            "steps": 5,
            "engine": "none",
            "world_size": 1,
            "first_loss": 7.1,
            "last_loss": 5.5,
            "wall_s": 2.0,
            "preempted": False,
        },
        start_step=0,
    )
    assert len(restarted["segments"]) == 1 and restarted["first_loss"] == 7.1  # a fresh run starts over


def test_write_json_atomic_leaves_no_partial_file(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2} and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_preemption_guard_records_the_first_signal_and_ignores_repeats():
    """SLURM and srun may both deliver a SIGTERM: the second must not kill a rank that is saving."""
    previous = signal.getsignal(signal.SIGUSR1)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: still alive, still the first signal
        assert guard.requested and guard.received == signal.SIGUSR1
        env = SimpleNamespace(all_reduce_max=lambda v: v)
        assert guard.requested_anywhere(env)
    assert signal.getsignal(signal.SIGUSR1) == previous and signal.getsignal(signal.SIGTERM) != guard._handle


def test_an_interrupted_extension_resumes_from_its_later_checkpoint(tmp_path):
    from dora_dist.run_state import PriorRun, check_extension

    prior = PriorRun(tmp_path, {"steps": 100, "finished": True}, None)
    assert check_extension(prior, 100, 100) is True  # nothing to do
    assert check_extension(prior, 200, 100) is False  # extend from the final checkpoint
    assert check_extension(prior, 200, 150) is False  # the extension was killed at 150: go on
    for resume_step, have in ((None, "it has none"), (60, "the latest is at step 60")):
        with pytest.raises(ConfigError, match=f"from 100 to 200 steps: no checkpoint of its last step .{have}"):
            check_extension(prior, 200, resume_step)
