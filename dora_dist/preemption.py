"""Stopping cleanly when the scheduler says so: SIGTERM (SLURM preemption or time limit, `scancel`, a spot instance
reclaimed, torchrun's agent shutting down) or SIGUSR1 (SLURM's `--signal=USR1@<seconds>` warning).

The handler only records the signal. At the end of every step the ranks agree (one all-reduce of one number) on
whether any of them was signalled, so all stop after the same step: the trainer then writes a checkpoint and the
process exits with REQUEUE_EXIT_CODE, which launch/slurm.sh turns into `scontrol requeue`; the requeued job resumes
from that checkpoint (checkpoint.resume=auto). A second signal while stopping is not caught: it ends the process at
once, as it would without us.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

#: exit status of a run stopped by a signal after saving a checkpoint: EX_TEMPFAIL, "try again later"
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionGuard:
    """Context manager: while inside, STOP_SIGNALS set a flag instead of killing the process."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        for sig, previous in self._previous.items():   # a second signal is not ours to soften
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def __enter__(self) -> "PreemptionGuard":
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

    def requested_anywhere(self, env) -> bool:
        """COLLECTIVE: True on every rank when any rank has been signalled (one float all-reduce)."""
        return env.all_reduce_max(1.0 if self.requested else 0.0) > 0
