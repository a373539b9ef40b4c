"""The trainer as one rank of a fault test, with a fault injected on one rank at a chosen step.

    fault_worker.py FAULT STEP RANK [key=value ...]

FAULT: none; sigterm (rank RANK sends itself SIGTERM once step STEP is done, as a scheduler would); kill (rank RANK
is SIGKILLed inside step STEP, after its forward, on the first attempt of a torchrun --max-restarts job only).
Exits with the trainer's own status (75 after a preemption), like `python -m dora_dist.train`.
"""

import os
import signal
import sys

import dora_dist.train as trainer


def inject(fault: str, at: int) -> None:
    real_step = trainer.train_step

    def train_step(job):
        if fault == "kill" and job.step + 1 == at and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            job.engine.backward = lambda loss: os.kill(os.getpid(), signal.SIGKILL)  # dies mid-step
        record = real_step(job)
        if fault == "sigterm" and job.step == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    trainer.train_step = train_step


if __name__ == "__main__":
    fault, step, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if fault != "none" and int(os.environ.get("RANK", "0")) == rank:
        inject(fault, step)
    sys.exit(trainer.main(sys.argv[4:]))
