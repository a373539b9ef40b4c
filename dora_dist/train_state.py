"""What a checkpoint restores of the training loop itself: the step, the best eval loss so far and the data
position. The loop advances it; the checkpoint manager saves `state_dict()` and a resume calls `load_state_dict()`
(torchtitan's TrainState pattern: it satisfies torch.distributed.checkpoint's `Stateful` protocol).

The saved dict is the trainer state every checkpoint has held (`{"step", "data", "best_eval"}`), so checkpoints
written before this class existed resume unchanged; keys a future version adds must be optional on load.
Parameters, optimizer, scheduler and RNG state are the engine's and the manager's, not this object's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    """torch.distributed.checkpoint.stateful.Stateful, restated so this module needs no torch.distributed."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """The loop's resumable progress. `data`: the data position (the global-batch sampler), its own Stateful."""

    data: Stateful
    step: int = 0
    best_eval: float | None = None

    def improves(self, eval_loss: float) -> bool:
        """True when `eval_loss` beats the best so far (the first eval always does); the same float on every rank,
        so every rank decides alike."""
        return self.best_eval is None or eval_loss < self.best_eval

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "data": self.data.state_dict(), "best_eval": self.best_eval}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (also from checkpoints that predate this class: same keys;
        `best_eval` may be missing in the oldest)."""
        self.data.load_state_dict(state_dict["data"])
        self.step = int(state_dict["step"])
        best = state_dict.get("best_eval")
        self.best_eval = None if best is None else float(best)
