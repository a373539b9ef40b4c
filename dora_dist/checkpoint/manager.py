"""Checkpoint directories: <root>/step_00000100/, written atomically, the last K kept, the latest found on resume.

Atomicity: all ranks write into <root>/.tmp_step_00000100/ (engine content + one RNG file per rank, JSON: nothing
here is unpickled on resume, see safe_load.py); after a
barrier rank 0 writes COMPLETE and renames the directory to its final name. A run killed mid-save leaves only a
.tmp_ directory, which is ignored (and removed by the next save). The root must be on a filesystem every rank sees
(shared across nodes for multi-node jobs).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any


from dora_dist.checkpoint.safe_load import load_rng_state, save_rng_state

STEP_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"


def find_latest(root: str | Path) -> Path | None:
    root = Path(root)
    if not root.is_dir():
        return None
    best = None
    for child in root.iterdir():
        m = STEP_RE.match(child.name)
        if m and child.is_dir() and (child / COMPLETE).exists():
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return None if best is None else best[1]


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, env):
        self.root = Path(root)
        self.keep_last = keep_last
        self.env = env

    def final_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def latest(self) -> Path | None:
        return find_latest(self.root)

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
                                                    "engine": engine.name, "time": time.time()}) + "\n")
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
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        extra = engine.load_checkpoint(str(path))
        rng_file = path / f"rng_rank{self.env.rank:05d}.json"
        if rng_file.exists():
            load_rng_state(rng_file)
        return extra
