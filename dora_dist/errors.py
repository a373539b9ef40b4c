"""Errors caused by the user's input, faults that stop a run, and the one place that turns them into a message and
an exit code.

A module of its own, below everything, so that any layer (a loader in models/, the data code, the adapter reader)
can report a bad setting or file without importing the layers above it.

Every error the user can fix is a `UserError`. Each class also subclasses the builtin its call sites raised before
(ValueError, FileNotFoundError), so `except ValueError` / `pytest.raises(ValueError)` keep working. The entry
points (`python -m dora_dist.train`, `dora-dist <command>`) catch `UserError` only — never ValueError or
Exception — and call `report_error`: one line on stderr, printed once (by rank 0; by another rank only when
rank 0 did not fail, see there), exit code 2. Any other exception is a bug and keeps its traceback. `--debug` (or
DORA_DIST_DEBUG=1) adds the traceback.

A `JobFault` is not the input's fault but ends the run all the same, with a message that says what to do (a full
disk while checkpointing, a streak of non-finite steps): reported the same way, exit code 1.
"""

from __future__ import annotations

import os
import sys
import traceback

#: exit code of a run stopped by bad input (argparse uses the same for bad command lines)
USER_ERROR_EXIT = 2
#: exit code of a run stopped by a JobFault
FAULT_EXIT = 1
PREFIX = "dora_dist: error: "


class UserError(Exception):
    """Base of every error the user fixes by changing the input; the message names the key/path/value and the fix."""


class JobFault(Exception):
    """A run cannot go on for a reason outside its input (raised on every rank); the message says what to do."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot work (here or at all), with a message naming the key."""


class DataError(UserError, ValueError):
    """The training/eval data cannot be read or gives no usable example (data.* keys)."""


class ModelError(UserError, ValueError):
    """The base model cannot be loaded as configured (model.* / quantization.* keys)."""


class AdapterError(UserError, ValueError):
    """An adapter directory that cannot be read or does not fit the model it is loaded into."""


class CheckpointError(UserError, ValueError):
    """checkpoint.resume names something that is not a usable checkpoint."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or directory named by the user (data source, model path, adapter, checkpoint) does not exist."""


class SettingError(ValueError):
    """One named setting has a bad value (a DoRAConfig field, a DoRALinear argument). Not a UserError by itself (a
    library caller gets a ValueError); it carries the setting's name so that the job config reports it under the
    key the user wrote (`dora.r`), and the message reads `<owner><name> <problem>` ("DoRAConfig.r must be ...")."""

    def __init__(self, name: str, problem: str, owner: str = "") -> None:
        super().__init__(f"{owner}{name} {problem}")
        self.name, self.problem = name, problem


def importable(package: str) -> bool:
    """Whether `import package` can succeed, without importing it (tests block a package through sys.modules).
    For the checks that name a missing optional package (deepspeed, bitsandbytes) before any work starts."""
    import importlib.util

    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def debug_requested(flag: bool = False) -> bool:
    """--debug on the command line, or DORA_DIST_DEBUG=1 in the environment."""
    return bool(flag) or os.environ.get("DORA_DIST_DEBUG", "").strip().lower() in ("1", "true", "yes")


def is_reporting_rank() -> bool:
    """Rank 0 of a launched job, or a process that is not part of one (no RANK variable)."""
    return os.environ.get("RANK", "").strip() in ("", "0")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (library messages may span several)."""
    return " ".join(str(exc).split())


#: how long a rank other than 0 waits before reporting its own error (see report_error)
OTHER_RANK_GRACE_S = 10.0


def report_error(exc: UserError | JobFault, debug: bool = False) -> int:
    """Print `dora_dist: error: <message>` once and return the exit code the process exits with (2 for bad input,
    1 for a JobFault).

    Rank 0 prints at once. Every rank meets the same bad input, so another rank first waits OTHER_RANK_GRACE_S:
    when rank 0 failed too, the launcher (torchrun polls every 0.1 s, the deepspeed launcher every 1 s) ends this
    process in the meantime and rank 0's line is the only one (the wait also covers rank 0 reaching the same error
    seconds later, on a loaded machine); when it did not (an input only this rank could not
    read), the wait ends and this rank prints its message, marked with its rank. With debug, every rank also
    prints its traceback."""
    code = USER_ERROR_EXIT if isinstance(exc, UserError) else FAULT_EXIT
    if debug_requested(debug):
        traceback.print_exception(exc, file=sys.stderr)
    if is_reporting_rank():
        print(PREFIX + one_line(exc), file=sys.stderr, flush=True)
        return code
    _wait_for_the_launcher(OTHER_RANK_GRACE_S, code)
    print(f"{PREFIX}(rank {os.environ.get('RANK')}) {one_line(exc)}", file=sys.stderr, flush=True)
    return code


def _wait_for_the_launcher(seconds: float, code: int) -> None:
    """Sleep, exiting with `code` at once if the launcher's SIGTERM arrives (whatever handler the job
    installed: this process is failing anyway)."""
    import signal
    import threading
    import time

    sys.stdout.flush()
    sys.stderr.flush()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    time.sleep(seconds)


__all__ = [
    "SettingError",
    "UserError",
    "ConfigError",
    "DataError",
    "ModelError",
    "AdapterError",
    "CheckpointError",
    "InputNotFoundError",
    "JobFault",
    "USER_ERROR_EXIT",
    "FAULT_EXIT",
    "importable",
    "debug_requested",
    "is_reporting_rank",
    "one_line",
    "report_error",
]
