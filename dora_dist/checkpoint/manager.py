"""Checkpoint directories: <root>/step_00000100/, written atomically, the last K kept, the latest found on resume.

Atomicity: all ranks write into <root>/.tmp_step_00000100/ (engine content + one RNG file per rank, JSON: nothing
here is unpickled on resume, see safe_load.py); after a
barrier rank 0 writes COMPLETE and renames the directory to its final name. A run killed mid-save leaves only a
.tmp_ directory, which is ignored (and removed by the next save). The root must be on a filesystem every rank sees
(shared across nodes for multi-node jobs).

Integrity: COMPLETE records the size and sha256 of every file; a resume checks them, so a damaged or truncated
latest checkpoint is reported and the previous complete one is used (`resume=auto`), or a clear error names the
damaged file (an explicit `resume=<dir>`).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any


from dora_dist.checkpoint.safe_load import load_rng_state, save_rng_state
from dora_dist.errors import CheckpointError, InputNotFoundError

STEP_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"


def file_manifest(directory: Path) -> dict[str, dict]:
    """Size and sha256 of every file of a checkpoint directory (COMPLETE excepted), recorded when it is saved."""
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != COMPLETE):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return out


def verify_checkpoint(directory: str | Path) -> str | None:
    """None when the directory is a complete, undamaged checkpoint; else what is wrong, naming the file."""
    directory = Path(directory)
    marker = directory / COMPLETE
    if not marker.is_file():
        return f"{directory} is not a complete checkpoint (no {COMPLETE} marker)"
    try:
        recorded = json.loads(marker.read_text()).get("files")
    except ValueError:
        return f"{marker} is damaged (not JSON)"
    if recorded is None:  # written before manifests existed: nothing to compare
        return None
    actual = file_manifest(directory)
    for name, info in recorded.items():
        got = actual.get(name)
        if got is None:
            return f"{directory / name} is missing"
        if got["bytes"] != info["bytes"]:
            return f"{directory / name} has {got['bytes']} bytes, {info['bytes']} were written (truncated?)"
        if got["sha256"] != info["sha256"]:
            return f"{directory / name} does not match its checksum (damaged)"
    return None


def find_latest(root: str | Path, problems: list[str] | None = None) -> Path | None:
    """The newest complete checkpoint under root that verifies; damaged newer ones are skipped (and described in
    `problems` when a list is given)."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted(((int(m.group(1)), child) for child in root.iterdir()
                         if (m := STEP_RE.match(child.name)) and child.is_dir() and (child / COMPLETE).exists()),
                        reverse=True)
    for _, child in candidates:
        problem = verify_checkpoint(child)
        if problem is None:
            return child
        if problems is not None:
            problems.append(problem)
    return None


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, env):
        self.root = Path(root)
        self.keep_last = keep_last
        self.env = env

    def final_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def latest(self) -> Path | None:
        """The newest undamaged complete checkpoint; damaged newer ones are reported (rank 0) and skipped."""
        problems: list[str] = []
        found = find_latest(self.root, problems)
        if problems and self.env.is_main:
            for problem in problems:
                print(f"[dora_dist] skipping a damaged checkpoint: {problem}", flush=True)
            print(f"[dora_dist] resuming from {found}" if found else "[dora_dist] no undamaged checkpoint to resume "
                  "from: starting from step 0", flush=True)
        return found

    def save(self, engine, step: int, extra_state: dict[str, Any]) -> Path:
        env = self.env
        final, tmp = self.final_dir(step), self.root / f".tmp_step_{step:08d}"
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        env.barrier()
        engine.save_checkpoint(str(tmp), extra_state)
        save_rng_state(tmp / f"rng_rank{env.rank:05d}.json")
        env.barrier()
        if env.is_main:
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": env.world_size,
                                                    "engine": engine.name, "time": time.time(),
                                                    "files": file_manifest(tmp)}) + "\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self.prune()
        env.barrier()
        return final

    def prune(self) -> None:
        steps = sorted((int(m.group(1)), c) for c in self.root.iterdir() if (m := STEP_RE.match(c.name)))
        for _, path in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, engine, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        if not (path / COMPLETE).exists():
            raise InputNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"cannot resume: {problem}")
        extra = engine.load_checkpoint(str(path))
        rng_file = path / f"rng_rank{self.env.rank:05d}.json"
        if rng_file.exists():
            load_rng_state(rng_file)
        return extra
