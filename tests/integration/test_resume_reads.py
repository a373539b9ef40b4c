"""A resume through the real entry point reads each checkpoint file whole (sha256) once (issue 29): `resume=auto`
(find_latest, then load) and an explicit `checkpoint.resume=<dir>` (preflight, then load) each hashed every file
twice before. The hashing function of the checkpoint manager is wrapped to count; the resumed run must still go
on from the checkpoint's step. (Two ranks: tests/dist/test_checkpoint_faults.py, rank 1 hashes nothing.)"""

from __future__ import annotations

import re
import shutil
from collections import Counter

import pytest

from dora_dist.checkpoint import manager as manager_module
from dora_dist.config import load_job_config
from dora_dist.train import train

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


def _args(tmp_path, out, *extra: str) -> list[str]:
    return [
        "training.max_steps=3",
        "data.synthetic_samples=32",
        "data.seq_len=32",
        "output.progress_bar=false",
        "output.plot=false",
        "output.save_adapter=false",
        f"model.cache_dir={tmp_path / 'cache'}",
        f"output.dir={out}",
        "checkpoint.every_steps=1",
        *extra,
    ]


@pytest.fixture
def hashed(monkeypatch) -> Counter:
    counts: Counter = Counter()
    real = manager_module.file_digest

    def counting(path):
        counts[str(path)] += 1
        return real(path)

    monkeypatch.setattr(manager_module, "file_digest", counting)
    return counts


def _files(step_dir) -> set[str]:
    return {str(p) for p in step_dir.rglob("*") if p.is_file() and p.name != "COMPLETE"}


def test_resume_hashes_each_checkpoint_file_once(tmp_path, hashed, monkeypatch):
    from dora_dist import loggers

    checks = Counter()
    real_check = loggers.check_loggers
    monkeypatch.setattr(loggers, "check_loggers", lambda names: (checks.update(["call"]), real_check(names))[1])
    stopped = tmp_path / "stopped"
    first = train(load_job_config(None, _args(tmp_path, stopped, "training.stop_after_steps=2")))
    assert first["steps"] == 2 and not first["finished"]
    assert checks["call"] == 1  # issue 29: preflight's check of the trackers only (was also in train and make_loggers)
    step2 = stopped / "checkpoints" / "step_00000002"
    shutil.copytree(stopped, tmp_path / "explicit")
    files = _files(step2)
    assert len(files) >= 3  # DCP metadata + shard, trainer state, RNG

    hashed.clear()
    auto = train(load_job_config(None, _args(tmp_path, stopped)))
    assert auto["finished"] and auto["steps"] == 3
    assert {f: hashed[f] for f in files} == {f: 1 for f in files}  # was 2: find_latest, then load
    assert not any(str(stopped / "checkpoints" / "step_00000001") in f for f in hashed)  # older ones not read

    explicit_dir = tmp_path / "explicit" / "checkpoints" / "step_00000002"
    hashed.clear()
    explicit = train(load_job_config(None, _args(tmp_path, tmp_path / "explicit", f"checkpoint.resume={explicit_dir}")))
    assert explicit["finished"] and explicit["steps"] == 3
    files = _files(explicit_dir)
    assert {f: hashed[f] for f in files} == {f: 1 for f in files}  # was 2: preflight, then load
    assert explicit["last_loss"] == auto["last_loss"]  # the same resumed step from the same checkpoint


def test_an_explicit_damaged_checkpoint_is_still_refused_before_training(tmp_path, hashed):
    """Preflight no longer reads the files of checkpoint.resume=<dir>: a same-size corruption is found by the
    resume's one verification, with preflight's message."""
    from dora_dist.errors import CheckpointError

    out = tmp_path / "run"
    train(load_job_config(None, _args(tmp_path, out, "training.stop_after_steps=1")))
    step1 = out / "checkpoints" / "step_00000001"
    shard = max(step1.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint.resume: {shard} does not match its checksum")):
        train(load_job_config(None, _args(tmp_path, out, f"checkpoint.resume={step1}")))
    assert not (out / "checkpoints" / "step_00000002").exists()
