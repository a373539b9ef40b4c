"""Checkpoint directories: <root>/step_00000100/, written atomically, the last K kept, the latest found on resume.

Atomicity (atomic.py): all ranks write into <root>/.tmp_step_00000100/ (engine content + one RNG file per rank,
JSON: nothing here is unpickled on resume, see safe_load.py) and fsync it; once every rank reports success rank 0
writes COMPLETE and renames the directory to its final name (a re-save of the same step moves the old one aside
first). A run killed at any point of a save leaves the previous checkpoints published and at most a .tmp_/.old_/
.del_ directory, which find_latest never takes for a newer checkpoint and the next save tidies. The root must be
on a filesystem every rank sees (shared across nodes for multi-node jobs).

Write failures (disk full, file size limit, read-only directory): the free space is checked against the size of the
tensors to write before anything is written; an error on any rank is agreed on by all (one all-reduce per phase
instead of a barrier), so every rank raises CheckpointWriteError naming the path, the bytes needed and the bytes
free, the partial directory is removed and the previous checkpoints are untouched.

Integrity: COMPLETE records the size and sha256 of every file; a resume checks them, so a damaged or truncated
latest checkpoint is reported and the previous complete one is used (`resume=auto`), or a clear error names the
damaged file (an explicit `resume=<dir>`). The check reads every byte, so it runs once per resume: on rank 0 only,
whose verdict every rank receives (one broadcast), and `load` does not repeat it for a checkpoint this manager has
just verified (`latest`, `verify`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import dora_dist.checkpoint.atomic as atomic
from dora_dist.checkpoint.atomic import CheckpointWriteError
from dora_dist.checkpoint.safe_load import load_rng_state, save_rng_state
from dora_dist.errors import CheckpointError, InputNotFoundError

if TYPE_CHECKING:
    from dora_dist.dist_env import DistEnv  # a leaf (torch only): checkpoint/ stays below parallel/

COMPLETE = "COMPLETE"
T = TypeVar("T")


class CheckpointEngine(Protocol):
    """What the manager needs of an engine (dora_dist.parallel.base.Engine): it writes and reads the content."""

    name: str
    checkpoint_format: str

    def save_checkpoint(self, directory: str, extra_state: dict[str, Any]) -> None: ...

    def load_checkpoint(self, directory: str) -> dict[str, Any]: ...


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks: the one place a checkpoint's bytes are read for its integrity."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != COMPLETE)


def file_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a checkpoint directory (COMPLETE excepted), recorded when it is saved."""
    return {
        str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": file_digest(path)}
        for path in _files(directory)
    }


def verify_checkpoint(directory: str | Path, contents: bool = True) -> str | None:
    """None when the directory is a complete, undamaged checkpoint; else what is wrong, naming the file.
    contents=False checks only what costs no read (the COMPLETE record, every recorded file present with its
    recorded size: a missing or truncated file); True also compares every file's sha256 (reads all of it)."""
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
    present = {str(path.relative_to(directory)): path for path in _files(directory)}
    for name, info in recorded.items():
        path = present.get(name)
        if path is None:
            return f"{directory / name} is missing"
        size = path.stat().st_size
        if size != info["bytes"]:
            return f"{directory / name} has {size} bytes, {info['bytes']} were written (truncated?)"
    if contents:
        for name, info in recorded.items():
            if file_digest(present[name]) != info["sha256"]:
                return f"{directory / name} does not match its checksum (damaged)"
    return None


def checkpoint_info(directory: str | Path) -> dict[str, Any]:
    """The COMPLETE record of a checkpoint: step, engine, world_size, format, the run's identity (run_state.py)."""
    try:
        info = json.loads((Path(directory) / COMPLETE).read_text())
    except (OSError, ValueError):
        return {}
    return dict(info) if isinstance(info, dict) else {}


def find_latest(root: str | Path, problems: list[str] | None = None) -> Path | None:
    """The newest complete checkpoint under root that verifies; damaged newer ones are skipped (and described in
    `problems` when a list is given). Directories being written (.tmp_) are never candidates; a step_N a killed
    re-save left set aside (.old_step_N, no step_N) is. Read-only: the next save tidies leftovers."""
    candidates = [(step, child) for step, child in atomic.step_dirs(Path(root)) if (child / COMPLETE).exists()]
    for _, child in candidates:
        problem = verify_checkpoint(child)
        if problem is None:
            return child
        if problems is not None:
            problems.append(problem)
    return None


class DamagedCheckpointError(CheckpointError):
    """A checkpoint asked for (explicitly, or every one under the root with resume=auto) fails its checks."""


#: bytes per rank beyond the tensors: the RNG state as JSON (~34 KB), the engine's metadata and trainer state
PER_RANK_OVERHEAD = 64 * 1024
#: a failed phase of a save: (reason for the user, errno, the exception)
_Failure = tuple[str, int | None, BaseException]
_NOT_CAUGHT = (KeyboardInterrupt, SystemExit, GeneratorExit)


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, env: DistEnv):
        self.root = Path(root)
        self.keep_last = keep_last
        self.env = env
        self._verified: Path | None = None  # the checkpoint latest()/verify() just found undamaged (load skips it)

    def final_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def _on_main(self, fn: Callable[[], T]) -> T:
        """fn() run by rank 0 alone, its result on every rank. COLLECTIVE (one broadcast; none in one process). An
        error on rank 0 is raised on every rank (as a CheckpointError on the others), so none waits forever."""
        env = self.env
        if not env.distributed:
            return fn()
        outcome: tuple[bool, Any] | None = None
        error: BaseException | None = None
        if env.is_main:
            try:
                outcome = (True, fn())
            except Exception as exc:  # reported on every rank below
                error, outcome = exc, (False, f"rank 0: {type(exc).__name__}: {exc}")
        ok, value = env.broadcast_object(outcome, src=0)
        if error is not None:
            raise error
        if not ok:
            raise CheckpointError(f"checking checkpoints under {self.root} failed on {value}")
        return value  # type: ignore[no-any-return]

    def latest(self) -> Path | None:
        """The newest undamaged complete checkpoint; damaged newer ones are reported (rank 0) and skipped. None when
        there is none at all; an error when there are checkpoints but every one is damaged (starting over from
        step 0 would silently discard the run). COLLECTIVE: rank 0 reads and checks, every rank gets its answer."""

        def scan() -> tuple[Path | None, list[str]]:
            problems: list[str] = []
            return find_latest(self.root, problems), problems

        found, problems = self._on_main(scan)
        if problems and found is None:
            raise DamagedCheckpointError(
                f"checkpoint.resume=auto: every checkpoint under {self.root} is damaged ({'; '.join(problems)}). "
                "Point checkpoint.resume at an undamaged copy, or move the damaged ones away to start from step 0."
            )
        if problems and self.env.is_main:
            for problem in problems:
                print(f"[dora_dist] skipping a damaged checkpoint: {problem}", flush=True)
            print(f"[dora_dist] resuming from {found}", flush=True)
        self._verified = found
        return found

    def verify(self, path: str | Path) -> str | None:
        """verify_checkpoint(path), read and hashed by rank 0 only; its verdict on every rank (COLLECTIVE)."""
        path = Path(path)
        problem = self._on_main(lambda: verify_checkpoint(path))
        self._verified = path if problem is None else None
        return problem

    # --- saving --------------------------------------------------------------------------------------------
    def save(
        self, engine: CheckpointEngine, step: int, extra_state: dict[str, Any], run: dict[str, Any] | None = None
    ) -> Path:
        """All ranks call. Three phases (prepare on rank 0, write on all ranks, publish on rank 0), each ending in
        an agreement on success that every rank takes part in, so a failure anywhere raises everywhere.
        `run`: the job's identity keys (run_state.py), recorded in COMPLETE so a resume can check them."""
        env = self.env
        self._verified = None
        final = self.final_dir(step)
        tmp = atomic.tmp_dir(final)
        needed = self.bytes_needed(engine)
        failure = self._attempt(self._prepare, tmp, needed) if env.is_main else None
        self._agree(failure, final, needed)
        failure = self._attempt(self._write, engine, tmp, extra_state)
        self._agree(failure, final, needed, partial=tmp)
        if env.is_main:
            failure = self._attempt(self._publish, engine, tmp, final, step, run)
            if failure is None:
                self._prune_quietly(step)
        self._agree(failure, final, needed, partial=tmp)
        return final

    def bytes_needed(self, engine: CheckpointEngine) -> int:
        """What a save writes, estimated before writing: the engine's adapter + optimizer tensors (all ranks
        together) plus a small per-rank overhead."""
        nbytes = getattr(engine, "checkpoint_nbytes", None)
        tensors = int(nbytes()) if nbytes is not None else 0
        return tensors + PER_RANK_OVERHEAD * self.env.world_size

    def _prepare(self, tmp: Path, needed: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for line in atomic.recover(self.root):
            print(f"[dora_dist] checkpoints: {line}", flush=True)
        self.check_space(needed)
        tmp.mkdir()

    def check_space(self, needed: int) -> None:
        """Fail before writing anything when the filesystem clearly lacks room for the checkpoint."""
        free = atomic.free_bytes(self.root)
        if free is not None and needed > free:
            raise _EarlyFailure(errno.ENOSPC, "not enough free space (checked before writing anything)")

    def _write(self, engine: CheckpointEngine, tmp: Path, extra_state: dict[str, Any]) -> None:
        engine.save_checkpoint(str(tmp), extra_state)
        save_rng_state(tmp / f"rng_rank{self.env.rank:05d}.json")
        atomic.fsync_tree(tmp)  # this rank's files are on disk before COMPLETE can exist

    def _publish(self, engine: CheckpointEngine, tmp: Path, final: Path, step: int, run: dict[str, Any] | None) -> None:
        info = {
            "step": step,
            "world_size": self.env.world_size,
            "engine": engine.name,
            "format": engine.checkpoint_format,
            "run": run or {},
            "time": time.time(),
            "files": file_manifest(tmp),
        }
        atomic.write_durably(tmp / COMPLETE, json.dumps(info) + "\n")
        atomic.fsync_path(tmp)
        atomic.publish(tmp, final)

    @staticmethod
    def _attempt(fn: Callable[..., object], *args: Any) -> _Failure | None:
        """Run one phase; None on success, else (reason for the user, errno, the exception)."""
        try:
            fn(*args)
        except _NOT_CAUGHT:
            raise
        except BaseException as exc:  # noqa: BLE001  (DCP's CheckpointException is a BaseException)
            os_err = atomic.os_error_in(exc)
            reason = str(exc.strerror) if isinstance(exc, _EarlyFailure) else atomic.describe_failure(exc)
            return reason, (os_err.errno if os_err is not None else None), exc
        return None

    def _agree(self, failure: _Failure | None, final: Path, needed: int, partial: Path | None = None) -> None:
        """COLLECTIVE (one all-reduce; on failure a broadcast of the reason): raise on every rank if any failed."""
        env = self.env
        failed_rank = int(env.all_reduce_max(env.rank + 1 if failure is not None else 0)) - 1
        if failed_rank < 0:
            return
        mine = failure[:2] if failure is not None and env.rank == failed_rank else None
        reason, err = env.broadcast_object(mine, src=failed_rank)
        if partial is not None:
            if env.is_main and partial.exists():
                try:
                    atomic.remove_dir(partial)
                except OSError:
                    pass
            env.barrier()  # gone before any rank reports it gone
        who = f"rank {failed_rank}: " if env.world_size > 1 else ""
        free = atomic.free_bytes(self.root)
        message = atomic.write_error_message(final, who + reason, err, needed, free, wrote=partial is not None)
        local = failure[2] if failure is not None else None
        if local is not None and atomic.os_error_in(local) is None and not isinstance(local, _EarlyFailure):
            raise local  # not an I/O failure: a bug, keep its traceback
        raise CheckpointWriteError(message, final, needed, free, err) from local

    def _prune_quietly(self, saved_step: int) -> None:
        try:
            self.prune(saved_step)
        except OSError as exc:
            print(f"[dora_dist] warning: could not delete an old checkpoint under {self.root}: {exc}", flush=True)

    def prune(self, saved_step: int | None = None) -> None:
        """Keep the newest keep_last checkpoints up to the one just saved; each older one is renamed to .del_ before
        it is deleted. Newer ones (a run resumed from an earlier checkpoint, or past a damaged one) are left alone and
        never make the one just saved look old."""
        steps = sorted(
            (step, path) for step, path in atomic.step_dirs(self.root) if saved_step is None or step <= saved_step
        )
        for _, path in steps[: max(0, len(steps) - self.keep_last)]:
            atomic.remove_dir(path)

    # --- loading -------------------------------------------------------------------------------------------
    def load(self, engine: CheckpointEngine, path: str | Path) -> dict[str, Any]:
        """All ranks call. Restore the engine's state and this rank's RNG from `path`; returns the trainer state
        saved with it. The checkpoint is verified first (once, on rank 0: see verify) unless this manager's
        latest()/verify() has just found it undamaged."""
        path = Path(path)
        if not (path / COMPLETE).exists():
            raise InputNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        if self._verified != path:
            problem = self.verify(path)
            if problem is not None:
                raise DamagedCheckpointError(f"cannot resume: {problem}")
        self._verified = None  # one load per verdict: a later load checks again
        extra = engine.load_checkpoint(str(path))
        rng_file = path / f"rng_rank{self.env.rank:05d}.json"
        if rng_file.exists():
            load_rng_state(rng_file)
        return extra


class _EarlyFailure(OSError):
    """The free-space check failed before anything was written."""
