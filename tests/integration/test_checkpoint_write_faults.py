"""A checkpoint save that dies or fails part-way never costs the previous checkpoint (issue 16).

Kills: a real process saving with CheckpointManager SIGKILLs itself (tests/dist/ckpt_fault_worker.py, a
monkeypatch of the function at that point) (a) half-way through an engine (DCP) file, (b) with every file written
but no COMPLETE, (c) with COMPLETE written but before the rename, (c') re-saving the same step between moving the old
directory aside and moving the new one in, (d) half-way through deleting the oldest checkpoint. Afterwards the
previous checkpoint's bytes are unchanged, find_latest / resume=auto takes it (never the half-written one), it
restores the saved parameters, and the next save tidies every leftover.

Write failures: a file size limit (RLIMIT_FSIZE), a full and then read-only filesystem (a small tmpfs in a user and
mount namespace), a read-only directory by permissions (non-root only): a CheckpointWriteError naming the path, the
bytes needed and the bytes free; no partial directory left; the previous checkpoint unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dora_dist.checkpoint import CheckpointManager, find_latest
from dora_dist.checkpoint.manager import verify_checkpoint
from dora_dist.parallel.dist_env import DistEnv

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "dist" / "ckpt_fault_worker.py"
sys.path.insert(0, str(WORKER.parent))
from ckpt_fault_worker import files_digest, make_engine, params_fingerprint, save, train_step  # noqa: E402

# spawns the worker and kills it part way through a save
pytestmark = pytest.mark.slow


def run_worker(args: list[str], prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [*prefix, sys.executable, str(WORKER), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


#: point -> (step of the re-save, what resume=auto must take, leftovers the kill must leave)
KILLS = {
    "engine": (3, "step_00000002", [".tmp_step_00000003"]),
    "complete": (3, "step_00000002", [".tmp_step_00000003"]),
    "rename": (3, "step_00000002", [".tmp_step_00000003"]),
    "replace": (2, ".old_step_00000002", [".old_step_00000002", ".tmp_step_00000002"]),
    "prune": (3, "step_00000003", [".del_step_00000001"]),
}


@pytest.mark.parametrize("point", list(KILLS))
def test_a_save_killed_part_way_keeps_the_previous_checkpoint(tmp_path, point):
    root, out = tmp_path / "ckpt", tmp_path / "out.json"
    args = ["--root", str(root), "--out", str(out), "--point", point]
    if point == "engine":  # the same process first meets a file size limit
        args += ["--fsize-rank", "0", "--fsize-bytes", "512"]
    proc = run_worker(args)
    assert proc.returncode == -9, f"the worker was not SIGKILLed at {point}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    before = json.loads(out.read_text())
    resaved, expected, left = KILLS[point]

    assert leftovers(root) == left
    previous = root / ("step_00000002" if point != "replace" else ".old_step_00000002")
    assert files_digest(previous) == before["step2_files"]  # byte for byte
    assert verify_checkpoint(previous) is None
    latest = find_latest(root)
    assert latest is not None and latest.name == expected
    manager = CheckpointManager(root, keep_last=2, env=DistEnv())
    assert manager.latest() == latest  # resume=auto
    engine = make_engine(DistEnv(), adapter_seed=1)
    manager.load(engine, latest)
    if point != "prune":  # (prune: step 3 was complete, and is taken)
        assert params_fingerprint(engine) == before["step2_params"]

    train_step(engine, DistEnv())
    save(manager, engine, 4)  # the next save tidies up
    assert leftovers(root) == []
    kept = sorted(p.name for p in root.iterdir())
    assert kept == (["step_00000003", "step_00000004"] if point == "prune" else ["step_00000002", "step_00000004"])
    assert all(verify_checkpoint(root / name) is None for name in kept)
    if point != "prune":
        assert files_digest(root / "step_00000002") == before["step2_files"]

    if point == "engine":
        fsize = before["fsize"]
        assert fsize["raised"] == "CheckpointWriteError" and fsize["is_oserror"] and fsize["errno"] == 27  # EFBIG
        assert str(root / "step_00000003") in fsize["message"]
        assert f"{fsize['needed']:,} bytes" in fsize["message"] and "file size limit" in fsize["message"]
        written = sum(f.stat().st_size for f in (root / "step_00000002").rglob("*") if f.is_file())
        assert fsize["needed"] >= written  # the estimate covers what a save of this model writes
        assert before["fsize_leftovers"] == ["step_00000001", "step_00000002"]
        assert before["step2_files_after_fsize"] == before["step2_files"]


def _userns_tmpfs_works(tmp_path: Path) -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1) to make a user and mount namespace"
    probe = tmp_path / "probe"
    probe.mkdir()
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none {probe}"], capture_output=True, text=True
    )
    return None if proc.returncode == 0 else f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()}"


def test_full_then_read_only_filesystem(tmp_path):
    """A 1 MiB tmpfs (mounted in a user + mount namespace, so no root needed where user namespaces are allowed):
    a save that clearly does not fit fails before writing; one that runs out of space while writing (the pre-check
    skipped) fails with ENOSPC and leaves nothing; the filesystem remounted read-only fails with EROFS."""
    reason = _userns_tmpfs_works(tmp_path)
    if reason:
        pytest.skip(reason)
    mnt, out = tmp_path / "mnt", tmp_path / "out.json"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o size=1m none {mnt} && exec {sys.executable} {WORKER} --mode fs "
        f"--root {mnt / 'ckpt'} --out {out}"
    )
    proc = run_worker([], prefix=("unshare", "-rm", "sh", "-c", script))
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    r = json.loads(out.read_text())
    final = str(mnt / "ckpt" / "step_00000002")
    for case, errno_, words in (
        ("early", 28, "not enough free space"),
        ("enospc", 28, "the disk is full"),
        ("readonly", 30, "read-only"),
    ):
        got = r[case]
        assert got["raised"] == "CheckpointWriteError" and got["errno"] == errno_, (case, got)
        assert final in got["message"] and words in got["message"], (case, got["message"])
        assert r[f"{case}_leftovers"] == ["step_00000001"], case
        assert got["needed"] == r["needed_estimate"] and f"{got['needed']:,} bytes" in got["message"], case
    assert "Nothing was written" in r["early"]["message"] and "partial" in r["enospc"]["message"]
    assert r["early"]["needed"] == r["needed_estimate"] > r["early"]["free"]  # the numbers it names
    assert f"{r['early']['needed']:,} bytes" in r["early"]["message"]
    assert f"{r['early']['free']:,} bytes" in r["early"]["message"]
    assert r["step1_files_after"] == r["step1_files"]


def test_read_only_directory_by_permissions(tmp_path):
    """chmod 555 on the checkpoint root. Root ignores permissions, so as root the worker runs as uid 1000 of a
    user namespace (`unshare -U --map-user`), where it owns the files but has no override."""
    root, out = tmp_path / "ckpt", tmp_path / "out.json"
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        probe = (
            subprocess.run(
                ["unshare", "-U", "--map-user=1000", "--map-group=1000", "true"], capture_output=True, text=True
            )
            if shutil.which("unshare")
            else None
        )
        if probe is None or probe.returncode != 0:
            pytest.skip(
                "running as root, where chmod does not stop writes, and no user namespace to run as "
                "another user (the read-only filesystem test covers EROFS)"
            )
        prefix = ("unshare", "-U", "--map-user=1000", "--map-group=1000")
    proc = run_worker(["--mode", "chmod", "--root", str(root), "--out", str(out)], prefix=prefix)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["uid"] != 0
    got = r["chmod"]
    assert got["raised"] == "CheckpointWriteError" and got["errno"] == 13, got  # EACCES
    assert str(root / "step_00000002") in got["message"] and "not writable" in got["message"]
    assert f"{got['needed']:,} bytes" in got["message"] and "Nothing was written" in got["message"]
    assert r["chmod_leftovers"] == ["step_00000001"]
    assert r["step1_files_after"] == r["step1_files"]
