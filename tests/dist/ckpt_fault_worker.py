"""Checkpoint faults, in a real process that writes real checkpoints (tests/dist/test_checkpoint_faults.py and
tests/integration/test_checkpoint_write_faults.py). One process (no torchrun variables: engine none) or
`torchrun --nproc-per-node 2` (engine ddp over gloo).

--mode kill:   save steps 1 and 2, record step 2's files (sha256) and parameters, optionally fail a save of step 3
               on one rank with RLIMIT_FSIZE (--fsize-rank), then SIGKILL a rank (--kill-rank) at --point while it
               saves again. The kill is a monkeypatch of the function at that point in this script; the library has
               no test hooks.
--mode resume: (2 ranks) resume=auto after that kill, save, then damage the newest checkpoints one by one.
--mode reads:  (2 ranks) how many times each checkpoint file is hashed by a resume, per rank.
--mode fs:     (one process, inside `unshare -rm` with --root on a small tmpfs) a full disk, then a read-only one.
--mode chmod:  (one process, not root) the checkpoint root made read-only by chmod.
Results go to --out (JSON, rank 0; the other ranks add <out>.rank<k>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

POINTS = ("engine", "complete", "rename", "replace", "prune")


def make_engine(env, adapter_seed: int, width: int = 16):
    from dora_dist.adapters import DoRAConfig, apply_dora
    from dora_dist.config import load_config
    from dora_dist.parallel.ddp import DDPEngine
    from dora_dist.parallel.none import SingleProcessEngine

    torch.manual_seed(0)  # the frozen base is the same (it is not checkpointed)
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))
    torch.manual_seed(adapter_seed)
    apply_dora(model, DoRAConfig(r=2, alpha=4, target_modules=["0", "2"]))
    cfg = load_config(None, ["training.max_steps=10", "training.warmup_steps=2", "training.lr=1e-2"])
    engine = (DDPEngine if env.world_size > 1 else SingleProcessEngine)(cfg, env)
    engine.prepare(model)
    return engine


def train_step(engine, env) -> None:
    g = torch.Generator().manual_seed(1000 + env.rank)
    loss = engine.model(torch.randn(4, 8, generator=g)).pow(2).mean()
    engine.backward(loss)
    engine.guarded_step()


def params_fingerprint(engine) -> list[float]:
    """Each trainable parameter's float64 sum of squares: equal iff the load restored the saved values (up to
    a collision no test here can hit by chance)."""
    return [float(p.detach().double().pow(2).sum()) for p in engine.model.parameters() if p.requires_grad]


def files_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def save(manager, engine, step: int) -> Path:
    return manager.save(engine, step, {"step": step, "data": {"step": step}})


def try_save(manager, engine, step: int) -> dict:
    """A save expected to fail: the CheckpointWriteError's text and numbers (or what happened instead)."""
    from dora_dist.checkpoint import CheckpointWriteError

    try:
        save(manager, engine, step)
    except CheckpointWriteError as exc:
        return {
            "raised": "CheckpointWriteError",
            "message": str(exc),
            "needed": exc.needed_bytes,
            "free": exc.free_bytes,
            "errno": exc.errno,
            "is_oserror": isinstance(exc, OSError),
            "local_cause": type(exc.__cause__).__name__ if exc.__cause__ is not None else None,
        }
    except BaseException as exc:  # noqa: BLE001  reported to the test
        return {"raised": type(exc).__name__, "message": str(exc)[-2000:]}
    return {"raised": None}


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE with SIGXFSZ ignored: a write past nbytes fails with EFBIG instead of killing the process."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def late_failure(manager, engine, env, rank: int) -> dict:
    """One rank fails after the engine's (collective) write, where no library collective would tell the others:
    ENOSPC raised where that rank writes its RNG file (a monkeypatch of that function, a simulated full disk)."""
    from dora_dist.checkpoint import manager as manager_module

    real = manager_module.save_rng_state

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if env.rank == rank:
        manager_module.save_rng_state = full
    try:
        return try_save(manager, engine, 3)
    finally:
        manager_module.save_rng_state = real


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Monkeypatch the function where `point` is, so that this process SIGKILLs itself there."""
    from torch.distributed.checkpoint import filesystem

    from dora_dist.checkpoint import atomic

    if point == "engine":  # half of a DCP shard written, then killed
        real = filesystem.FileSystem.create_stream

        class Dying:
            def __init__(self, stream):
                self.stream = stream

            def write(self, data):
                data = bytes(memoryview(data))
                self.stream.write(data[: max(1, len(data) // 2)])
                self.stream.flush()
                die()

            def __getattr__(self, name):
                return getattr(self.stream, name)

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with real(self, path, mode) as stream:
                yield Dying(stream) if "w" in mode and str(path).endswith(".distcp") else stream

        filesystem.FileSystem.create_stream = create_stream
    elif point == "complete":  # every file written and fsynced, COMPLETE not yet
        real_write = atomic.write_durably
        atomic.write_durably = lambda path, text: die() if path.name == "COMPLETE" else real_write(path, text)
    elif point == "rename":  # COMPLETE written, the tmp directory not renamed
        atomic.publish = lambda tmp, final: die()
    elif point == "replace":  # a re-save of step 2: the old one set aside, the new
        real_rename = Path.rename  # one not yet moved into place

        def rename(self, target):
            if self.name.startswith(atomic.TMP):
                die()
            return real_rename(self, target)

        Path.rename = rename
    elif point == "prune":  # the oldest checkpoint half-deleted
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            path = Path(path)
            if path.name.startswith(atomic.DELETING):
                next(p for p in sorted(path.rglob("*")) if p.is_file()).unlink()
                die()
            return real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree


def write_json(path: Path, data: dict, env) -> None:
    target = path if env.is_main else path.with_name(f"{path.name}.rank{env.rank}.json")
    target.write_text(json.dumps(data, indent=1))


def mode_kill(args, env, manager) -> None:
    engine = make_engine(env, adapter_seed=0)
    for step in (1, 2):
        train_step(engine, env)
        save(manager, engine, step)
    out = {"step2_files": files_digest(manager.final_dir(2)), "step2_params": params_fingerprint(engine)}
    if args.fsize_rank is not None:
        limit = contextlib.nullcontext()
        if env.rank == args.fsize_rank:
            limit = file_size_limit(args.fsize_bytes)
        with limit:
            out["fsize"] = try_save(manager, engine, 3)
        out["fsize_leftovers"] = sorted(p.name for p in manager.root.iterdir())
        out["step2_files_after_fsize"] = files_digest(manager.final_dir(2))
        out["late"] = late_failure(manager, engine, env, args.fsize_rank)
        out["late_leftovers"] = sorted(p.name for p in manager.root.iterdir())
    write_json(Path(args.out), out, env)
    env.barrier()
    if env.rank == args.kill_rank:
        arm(args.point)
    train_step(engine, env)
    save(manager, engine, 2 if args.point == "replace" else 3)
    write_json(Path(args.out), {"error": f"not killed at {args.point}"}, env)


def mode_resume(args, env, manager) -> None:
    """(After mode kill) resume=auto -> load -> save 3 (tidies the leftover) -> save 4; then damage step 4 (resume
    takes 3), then step 3 too (resume=auto is an error)."""
    from dora_dist.checkpoint import DamagedCheckpointError

    out: dict = {"latest": str(manager.latest())}
    engine = make_engine(env, adapter_seed=1)
    manager.load(engine, manager.latest())
    out["loaded_params"] = params_fingerprint(engine)
    fingerprints = {}
    for step in (3, 4):
        train_step(engine, env)
        save(manager, engine, step)
        fingerprints[step] = params_fingerprint(engine)
    out["names_after_saves"] = sorted(p.name for p in manager.root.iterdir())
    env.barrier()
    if env.is_main:  # truncate step 4's biggest shard (a rank-1 file)
        shard = max(manager.final_dir(4).glob("*.distcp"), key=lambda p: (p.stat().st_size, p.name))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        out["damaged"] = str(shard)
    env.barrier()
    found = manager.latest()
    other = make_engine(env, adapter_seed=2)
    manager.load(other, found)
    out["fallback"] = {"latest": str(found), "params_equal_step3": params_fingerprint(other) == fingerprints[3]}
    env.barrier()
    if env.is_main:  # flip one bit of step 3's metadata too
        meta = manager.final_dir(3) / ".metadata"
        data = bytearray(meta.read_bytes())
        data[len(data) // 2] ^= 1
        meta.write_bytes(bytes(data))
    env.barrier()
    try:
        manager.latest()
        out["none_left"] = {"raised": None}
    except DamagedCheckpointError as exc:
        out["none_left"] = {"raised": type(exc).__name__, "message": str(exc)}
    write_json(Path(args.out), out, env)


def mode_reads(args, env, manager) -> None:
    """(2 ranks) How often each checkpoint file is hashed (read whole) by a resume: the manager's hashing function
    wrapped to count, per rank, for resume=auto (latest + load), an explicit checkpoint (verify + load) and a bare
    load (the library path: it verifies by itself)."""
    from dora_dist.checkpoint import manager as manager_module

    engine = make_engine(env, adapter_seed=0)
    saved = {}
    for step in (1, 2):
        train_step(engine, env)
        save(manager, engine, step)
        saved[step] = params_fingerprint(engine)
    env.barrier()
    real, counts = manager_module.file_digest, {}

    def counting(path):
        counts[str(path)] = counts.get(str(path), 0) + 1
        return real(path)

    manager_module.file_digest = counting
    out: dict = {
        "files": {
            step: sorted(str(p) for p in manager.final_dir(step).rglob("*") if p.is_file() and p.name != "COMPLETE")
            for step in (1, 2)
        }
    }
    try:
        for case, step in (("auto", 2), ("explicit", 1), ("bare_load", 2)):
            counts.clear()
            other = make_engine(env, adapter_seed=5)
            if case == "auto":
                found = manager.latest()
            else:
                found = manager.final_dir(step)
                if case == "explicit":
                    assert manager.verify(found) is None
            manager.load(other, found)
            out[case] = {
                "found": str(found),
                "hashes": dict(counts),
                "params_restored": params_fingerprint(other) == saved[step],
            }
    finally:
        manager_module.file_digest = real
    write_json(Path(args.out), out, env)


def mode_fs(args, env, manager) -> None:
    """--root is a small tmpfs of this mount namespace: fill it, then remount it read-only."""
    engine = make_engine(env, adapter_seed=0, width=256)  # ~30 KB of adapter + optimizer tensors
    train_step(engine, env)
    save(manager, engine, 1)
    out = {"step1_files": files_digest(manager.final_dir(1)), "needed_estimate": manager.bytes_needed(engine)}
    free = shutil.disk_usage(manager.root).free
    filler = manager.root.parent / "filler"
    with filler.open("wb") as f:  # leave half of what a save needs
        f.write(b"\0" * max(0, free - out["needed_estimate"] // 2))
    train_step(engine, env)
    out["early"] = try_save(manager, engine, 2)
    out["early_leftovers"] = sorted(p.name for p in manager.root.iterdir())
    manager.check_space = lambda needed: None  # skip the pre-check: the write itself hits ENOSPC
    out["enospc"] = try_save(manager, engine, 2)
    del manager.check_space
    out["enospc_leftovers"] = sorted(p.name for p in manager.root.iterdir())
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(manager.root.parent)], check=True)
    out["readonly"] = try_save(manager, engine, 2)
    out["readonly_leftovers"] = sorted(p.name for p in manager.root.iterdir())
    out["step1_files_after"] = files_digest(manager.final_dir(1))
    write_json(Path(args.out), out, env)


def mode_chmod(args, env, manager) -> None:
    """The checkpoint root made read-only by its permissions (run as a non-root user: root ignores them)."""
    engine = make_engine(env, adapter_seed=0)
    train_step(engine, env)
    save(manager, engine, 1)
    out = {"step1_files": files_digest(manager.final_dir(1)), "uid": os.geteuid()}
    manager.root.chmod(0o555)
    try:
        out["chmod"] = try_save(manager, engine, 2)
    finally:
        manager.root.chmod(0o755)
    out["chmod_leftovers"] = sorted(p.name for p in manager.root.iterdir())
    out["step1_files_after"] = files_digest(manager.final_dir(1))
    write_json(Path(args.out), out, env)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("kill", "resume", "reads", "fs", "chmod"), default="kill")
    p.add_argument("--point", choices=POINTS, default="engine")
    p.add_argument("--kill-rank", type=int, default=0)
    p.add_argument("--fsize-rank", type=int, default=None)
    p.add_argument("--fsize-bytes", type=int, default=16384)
    args = p.parse_args()
    torch.set_num_threads(1)
    from dora_dist.checkpoint import CheckpointManager
    from dora_dist.parallel.dist_env import DistEnv

    env = DistEnv.from_environ(device="cpu")
    manager = CheckpointManager(args.root, keep_last=2, env=env)
    try:
        modes = {"kill": mode_kill, "resume": mode_resume, "reads": mode_reads, "fs": mode_fs, "chmod": mode_chmod}
        modes[args.mode](args, env, manager)
    finally:
        env.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
