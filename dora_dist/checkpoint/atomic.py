"""The directory protocol that makes a checkpoint appear whole or not at all, and the error a failed write raises.

Names under the checkpoint root (step N written as 8 digits):

    step_N/        a published checkpoint (COMPLETE inside, with every file's size and sha256)
    .tmp_step_N/   being written (or left by a killed save): never read, removed by the next save
    .old_step_N/   the previous step_N, set aside while a re-save of the same step is moved into place; if a kill
                   leaves it without a step_N it is still that step's checkpoint (find_latest takes it, the next
                   save renames it back); next to a step_N it is garbage
    .del_step_N/   a checkpoint being deleted (pruned or replaced): renamed first so a kill mid-delete never leaves
                   a half-deleted step_N

Every step is a rename (atomic on POSIX filesystems), so a SIGKILL between any two of them leaves either the old or
the new checkpoint published. Durability: file contents are fsynced before COMPLETE is written, COMPLETE itself
before the rename, and the root directory after each rename, so a power loss cannot publish a directory whose files
are not on disk.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from dora_dist.errors import JobFault

STEP_RE = re.compile(r"^step_(\d{8})$")
TMP, ASIDE, DELETING = ".tmp_", ".old_", ".del_"


class CheckpointWriteError(JobFault, OSError):
    """A checkpoint could not be written (disk full, file size limit, read-only or unwritable directory, or another
    rank's failure). Raised on every rank; the partial directory is removed and earlier checkpoints are untouched."""

    def __init__(
        self, message: str, path: Path, needed_bytes: int, free_bytes: int | None, cause_errno: int | None = None
    ):
        super().__init__(message)
        self.errno = cause_errno
        self.path, self.needed_bytes, self.free_bytes = Path(path), needed_bytes, free_bytes


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)  # pragma: no cover


def free_bytes(path: Path) -> int | None:
    """Free bytes (for an unprivileged user) on the filesystem holding `path` or its nearest existing parent."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def os_error_in(exc: BaseException | None) -> OSError | None:
    """The OSError behind an exception: itself, its cause/context, or one a DCP CheckpointException collected from a
    rank (`failures`: {rank: (exception, traceback)})."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        stack += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


def describe_failure(exc: BaseException) -> str:
    """One line for the user: what failed and, for the usual causes, what it means."""
    os_err = os_error_in(exc)
    if os_err is None:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    hints = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EFBIG: "a file exceeds the process's file size limit (ulimit -f) or the filesystem's",
        errno.EROFS: "the filesystem is read-only",
        errno.EACCES: "the directory is not writable",
        errno.EPERM: "the directory is not writable",
    }
    hint = hints.get(os_err.errno) if os_err.errno is not None else None
    where = f" ({os_err.filename})" if os_err.filename else ""
    return f"{hint or os_err.strerror or type(os_err).__name__}{where}"


def advice(err: int | None) -> str:
    if err in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "Make the directory writable or set checkpoint.dir to a writable location."
    if err == errno.EFBIG:
        return "Raise the file size limit (ulimit -f) or set checkpoint.dir to another filesystem."
    return "Free some space or set checkpoint.dir to a disk with room."


def write_error_message(final: Path, reason: str, err: int | None, needed: int, free: int | None, wrote: bool) -> str:
    free_text = f"{human_bytes(free)} ({free:,} bytes)" if free is not None else "an unknown amount"
    outcome = f"The partial {TMP}{final.name} was removed; " if wrote else "Nothing was written; "
    return (
        f"cannot write checkpoint {final}: {reason}. It needs about {human_bytes(needed)} ({needed:,} bytes); "
        f"{free_text} free on that filesystem. {advice(err)} {outcome}the previous checkpoints under "
        f"{final.parent} are untouched."
    )


# --- durability -----------------------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a directory fsync makes its renames durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory; file contents still were
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP) or not path.is_dir():
            raise
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then the directories themselves (deepest first)."""
    dirs = [directory]
    for path in sorted(directory.rglob("*")):
        if path.is_dir():
            dirs.append(path)
        elif path.is_file():
            fsync_path(path)
    for d in reversed(dirs):
        fsync_path(d)


def write_durably(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# --- the protocol ---------------------------------------------------------------------------------------------
def tmp_dir(final: Path) -> Path:
    return final.parent / (TMP + final.name)


def aside_dir(final: Path) -> Path:
    return final.parent / (ASIDE + final.name)


def remove_dir(path: Path) -> None:
    """Delete a checkpoint directory: renamed to .del_* first (atomic), then deleted."""
    if not path.exists():
        return
    doomed = path if path.name.startswith(DELETING) else path.parent / (DELETING + path.name.lstrip("."))
    if doomed != path:
        if doomed.exists():
            shutil.rmtree(doomed)
        path.rename(doomed)
    shutil.rmtree(doomed)


def publish(tmp: Path, final: Path) -> None:
    """Move a written, COMPLETE-marked tmp directory to its final name. An existing final (a re-save of the same
    step) is renamed aside first and deleted last, so some complete step_N exists at every instant."""
    aside = aside_dir(final)
    if final.exists():
        if aside.exists():
            remove_dir(aside)  # garbage from an earlier killed replace (its step_N existed)
        final.rename(aside)
    try:
        tmp.rename(final)
    except OSError:
        if aside.exists() and not final.exists():
            aside.rename(final)  # put the previous checkpoint back
        raise
    fsync_path(final.parent)
    try:
        remove_dir(aside)
    except OSError:  # published already; recover() deletes the garbage on the next save
        pass


def recover(root: Path) -> list[str]:
    """Tidy what a killed save left under root (rank 0, before writing): delete .tmp_ and .del_ directories and
    stale .old_ ones; rename an .old_step_N that has no step_N back. Returns what was done, for the log."""
    done: list[str] = []
    if not root.is_dir():
        return done
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        if child.name.startswith(ASIDE) and STEP_RE.match(child.name[len(ASIDE) :]):
            final = root / child.name[len(ASIDE) :]
            if not final.exists():
                child.rename(final)
                done.append(f"restored {final.name} from {child.name} (a save was killed while replacing it)")
                continue
        if child.name.startswith((TMP, DELETING, ASIDE)):
            shutil.rmtree(child, ignore_errors=True)
            done.append(f"removed {child.name} (left by an interrupted save)")
    if done:
        fsync_path(root)
    return done


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every published checkpoint under root, newest first; an .old_step_N stands for
    step_N when a kill left it without one."""
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for child in root.iterdir():
        m = STEP_RE.match(child.name)
        if m and child.is_dir():
            found[int(m.group(1))] = child
    for child in root.iterdir():
        m = STEP_RE.match(child.name[len(ASIDE) :]) if child.name.startswith(ASIDE) else None
        if m and child.is_dir():
            found.setdefault(int(m.group(1)), child)
    return sorted(found.items(), reverse=True)
