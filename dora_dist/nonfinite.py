"""What a step with a NaN/inf loss or gradient does: it is skipped (the engine makes no update and no LR tick, see
Engine.guarded_step), reported with the step and the first parameter whose gradient is non-finite, and a streak of
`training.max_bad_steps` such steps stops the run. The trainer keeps the streak (Job.bad_streak) and never
checkpoints inside one, so the last checkpoint of a run stopped here is its last good state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from dora_dist.errors import JobFault

ADVICE = (
    "Lower training.lr, set training.max_grad_norm (clipping) if it is 0, or check the data of these steps; "
    "the last checkpoint is from before them (resume with checkpoint.resume=auto)."
)


class NonFiniteLossError(JobFault, FloatingPointError):
    """training.max_bad_steps steps in a row had a NaN/inf loss or gradient, or an engine applied such a step (a
    training fault, not bad input: raised on every rank, reported in one line, exit code 1)."""


def skip_reason(loss: float, grad_norm: float, bad_param: str | None) -> str:
    """Why a step was skipped, for the log line and metrics.jsonl."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if bad_param:
        return f"the gradient of {bad_param} is non-finite (gradient norm {grad_norm})"
    return f"the gradient norm is {grad_norm}"  # an engine that cannot name the parameter (ZeRO)


def applied_nonfinite_step(step: int, loss: float, grad_norm: float, engine: str) -> NonFiniteLossError:
    """The error for a non-finite step an engine applied because it could not skip it."""
    return NonFiniteLossError(
        f"step {step} had loss {loss} and gradient norm {grad_norm}, and parallel.engine={engine} applied it (it "
        f"could not skip it): stopping, no checkpoint is written for it. {ADVICE}"
    )


def report_skipped_step(
    rec: dict[str, Any], streak: list[tuple[int, str]], limit: int, is_main: bool, line: Callable[[str], None]
) -> None:
    """Rank 0 prints the skipped step and why (`line`: the console's); at `limit` (training.max_bad_steps) skipped
    steps in a row (`streak`: their (step, why)), every rank raises NonFiniteLossError (before any checkpoint of the
    streak: see train.maybe_checkpoint)."""
    if is_main:
        line(
            f"[dora_dist] step {rec['step']} skipped: {rec['skip_reason']}; no optimizer update "
            f"({len(streak)}/{limit} bad steps in a row, training.max_bad_steps)"
        )
    if len(streak) >= limit:
        steps = [step for step, _ in streak]
        span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
        reasons = "; ".join(dict.fromkeys(why for _, why in streak))  # each distinct cause once
        raise NonFiniteLossError(
            f"{len(steps)} non-finite step(s) in a row ({span}, training.max_bad_steps="
            f"{limit}): {reasons}. Stopping. {ADVICE}"
        )
