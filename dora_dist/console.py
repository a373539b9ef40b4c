"""What a run prints: one progress bar and one clean line per logged step in a terminal, plain lines when piped.

In a terminal (stderr is a TTY) the tqdm bar sits on the last line and every log line goes through `tqdm.write`,
which clears the bar, prints the line and redraws the bar below it, so bar and lines never overwrite each other.
Piped to a file there is no bar at all (its carriage-return redraws would be noise in a log); the per-step lines
are the progress. Third-party output the user can do nothing about (transformers' and datasets' own progress
bars, deprecation warnings raised inside torch.distributed and DeepSpeed, the DeepSpeed CPU-accelerator notice,
bitsandbytes' optional-kernel notice) is silenced; DORA_DIST_VERBOSE=1 keeps all of it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: (logger name, message substring) of notices that are expected on a correct set-up
_QUIET_LOG_MESSAGES = [
    ("DeepSpeed", "Setting accelerator to CPU"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
]
#: (category, message regex) of warnings raised inside libraries, not by anything in the user's config
_QUIET_WARNINGS = [
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),  # raised inside DeepSpeed / FSDP2 collectives
    # DCP saving / loading a one-process checkpoint, which is what engine none means
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized"),
]


class _DropMessages(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


def verbose() -> bool:
    return os.environ.get("DORA_DIST_VERBOSE", "") not in ("", "0", "false")


def quiet_third_party() -> None:
    """Silence library chatter (idempotent; a no-op with DORA_DIST_VERBOSE=1)."""
    if verbose():
        return
    for category, message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, needle in _QUIET_LOG_MESSAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.needle == needle for f in logger.filters):
            logger.addFilter(_DropMessages(needle))
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards"
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class Console:
    """The trainer's output on rank 0: `bar` (tqdm, terminal only) and `line` (a log line that never collides
    with the bar). Other ranks (enabled=False) print nothing."""

    def __init__(self, total: int, initial: int, enabled: bool, bar: bool = True, desc: str = "train"):
        from tqdm.auto import tqdm

        self.enabled = enabled
        show_bar = enabled and bar and is_terminal(sys.stderr)
        sized = show_bar and _columns(sys.stderr) > 0  # a terminal that reports no size gets a fixed width
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not show_bar,
            dynamic_ncols=sized,
            ncols=None if sized else 100,
            desc=desc,
            file=sys.stderr,
            leave=True,
        )

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar.disable:
            print(text, flush=True)
        else:
            self.bar.write(text, file=sys.stdout)  # clears the bar, prints, redraws it below
            sys.stdout.flush()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
