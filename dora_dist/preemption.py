"""Stopping cleanly when the scheduler says so: SIGTERM (SLURM preemption or time limit, `scancel`, a spot instance
reclaimed, torchrun's agent shutting down) or SIGUSR1 (SLURM's `--signal=USR1@<seconds>` warning).

The handler only records the signal. At the end of every step the ranks agree (one all-reduce of one number) on
whether any of them was signalled, so all stop after the same step: the trainer then writes a checkpoint and the
process exits with REQUEUE_EXIT_CODE; the requeued job resumes from that checkpoint (checkpoint.resume=auto).
Launchers do not all pass a rank's exit status on (srun's --kill-on-bad-exit may kill the other ranks first, turning
75 into 143), so rank 0 also writes the file named by $DORA_DIST_REQUEUE_FILE, which launch/slurm.sh reads to decide
on `scontrol requeue`. Further signals while stopping are ignored (SLURM and srun may both deliver one): the hard
stop is SIGKILL.

Ctrl-C (SIGINT) is the same stop, by the user: the step finishes, a checkpoint is written, one line says how to
resume, and the exit status is INTERRUPT_EXIT_CODE (no requeue marker). A second Ctrl-C raises KeyboardInterrupt
at once (the entry points report it in one line, with the same exit status).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from dora_dist.errors import is_reporting_rank

if TYPE_CHECKING:
    from dora_dist.dist_env import DistEnv

#: exit status of a run stopped by a signal after saving a checkpoint: EX_TEMPFAIL, "try again later"
REQUEUE_EXIT_CODE = 75
#: exit status of a run stopped by Ctrl-C (SIGINT), after its checkpoint or (a second Ctrl-C) at once: 128 + 2, as
#: a shell reports a process ended by SIGINT
INTERRUPT_EXIT_CODE = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionGuard:
    """Context manager: while inside, STOP_SIGNALS set a flag instead of killing the process."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            if signum == signal.SIGINT and is_reporting_rank():
                print(
                    "\n[dora_dist] Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again: stop "
                    "now, without it)",
                    file=sys.stderr,
                    flush=True,
                )
        elif signum == signal.SIGINT:  # the second Ctrl-C: stop now (the entry point reports it in one line)
            raise KeyboardInterrupt

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def requested_anywhere(self, env: DistEnv) -> bool:
        """COLLECTIVE: True on every rank when any rank has been signalled (one float all-reduce)."""
        return env.all_reduce_max(1.0 if self.requested else 0.0) > 0

    def stop_reason(self, env: DistEnv) -> str | None:
        """COLLECTIVE (see requested_anywhere): what stops the run, the same decision on every rank; None: go on."""
        if not self.requested_anywhere(env):
            return None
        return self.received.name if self.received else "a signal on another rank"


#: the environment variable naming the file rank 0 writes when a signal stopped the run (launch/slurm.sh sets it)
REQUEUE_FILE_ENV = "DORA_DIST_REQUEUE_FILE"


def write_requeue_marker(step: int, stop_signal: str | None, out_dir: Path, is_main: bool) -> None:
    """Rank 0: write $DORA_DIST_REQUEUE_FILE (when set) with the step and signal, for the launch script."""
    from dora_dist.run_state import write_json_atomic

    target = os.environ.get(REQUEUE_FILE_ENV)
    if is_main and target and stop_signal != signal.SIGINT.name:  # Ctrl-C: the user stopped it
        write_json_atomic(Path(target), {"step": step, "signal": stop_signal, "output_dir": str(out_dir)})


def stopped_line(reason: str, step: int, checkpoint: Path | None) -> str:
    """The one line rank 0 prints when a signal stopped the run: where it stopped and how it goes on."""
    saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint yet (the run restarts at step 0)"
    if reason == signal.SIGINT.name:
        return (
            f"[dora_dist] interrupted (Ctrl-C) after step {step}; {saved}; run the same command again to resume "
            f"(exit code {INTERRUPT_EXIT_CODE})"
        )
    return f"[dora_dist] stopped by {reason} after step {step}; {saved}; exiting with {REQUEUE_EXIT_CODE} (requeue)"


def exit_code_of(summary: dict) -> int:
    """0 for a finished run, INTERRUPT_EXIT_CODE after Ctrl-C, REQUEUE_EXIT_CODE after another stop signal."""
    if not summary.get("preempted") or summary.get("finished"):
        return 0
    return INTERRUPT_EXIT_CODE if summary.get("stop_signal") == signal.SIGINT.name else REQUEUE_EXIT_CODE


def interrupted_now(debug: bool = False) -> int:
    """A KeyboardInterrupt reached the entry point (a second Ctrl-C, or one before training started): one line
    instead of its traceback (--debug shows it), INTERRUPT_EXIT_CODE."""
    from dora_dist.errors import debug_requested

    if debug_requested(debug):
        import traceback

        traceback.print_exc()
    if is_reporting_rank():
        print(
            "\n[dora_dist] interrupted (Ctrl-C): stopped at once; a run resumes from its latest checkpoint when "
            f"the same command is run again (exit code {INTERRUPT_EXIT_CODE})",
            file=sys.stderr,
            flush=True,
        )
    return INTERRUPT_EXIT_CODE
