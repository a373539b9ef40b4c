"""Errors caused by the user's input, and the one place that turns them into a message and an exit code.

A module of its own, below everything, so that any layer (a loader in models/, the data code, the adapter reader)
can report a bad setting or file without importing the layers above it.

Every error the user can fix is a `UserError`. Each class also subclasses the builtin its call sites raised before
(ValueError, FileNotFoundError), so `except ValueError` / `pytest.raises(ValueError)` keep working. The entry
points (`python -m dora_dist.train`, `dora-dist <command>`) catch `UserError` only — never ValueError or
Exception — and call `report_user_error`: one line on stderr, from rank 0 only, exit code 2 on every rank. Any
other exception is a bug and keeps its traceback. `--debug` (or DORA_DIST_DEBUG=1) adds the traceback.
"""
from __future__ import annotations

import os
import sys
import traceback

#: exit code of a run stopped by bad input (argparse uses the same for bad command lines)
USER_ERROR_EXIT = 2
PREFIX = "dora_dist: error: "


class UserError(Exception):
    """Base of every error the user fixes by changing the input; the message names the key/path/value and the fix."""


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


def report_user_error(exc: UserError, debug: bool = False) -> int:
    """Print `dora_dist: error: <message>` once (rank 0) and return the exit code every rank exits with.

    With debug, every rank also prints its traceback (a rank-specific failure is then visible)."""
    if debug_requested(debug):
        traceback.print_exception(exc, file=sys.stderr)
    if is_reporting_rank():
        print(PREFIX + one_line(exc), file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


__all__ = ["UserError", "ConfigError", "DataError", "ModelError", "AdapterError", "CheckpointError",
           "InputNotFoundError", "USER_ERROR_EXIT", "importable", "debug_requested", "is_reporting_rank", "one_line",
           "report_user_error"]
