"""Training state through torch.distributed.checkpoint (DCP): adapter parameters and optimizer state, sharded as
each engine holds them (FSDP2 DTensors are written shard by shard, without gathering), plus a small trainer-state
file (scheduler, data position, step) written by rank 0.

Frozen base weights are never written: they come from the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dora_dist.checkpoint.safe_load import verify_dcp_metadata

TRAINER_STATE = "trainer_state.pt"
OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading only the adapter keys into the full model: frozen keys are "missing" on purpose. dcp.load itself still
# fails on any adapter/optimizer key that the checkpoint lacks.
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def _no_dist(env) -> bool:
    return not env.distributed


def save_train_state(directory: str | Path, model, optimizer, scheduler, extra_state: dict[str, Any], env) -> None:
    """All ranks call. Writes <dir>/ (DCP files) and <dir>/trainer_state.pt (rank 0)."""
    directory = Path(directory)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory), no_dist=_no_dist(env))
    if env.is_main:
        state = {"extra": extra_state, "scheduler": scheduler.state_dict() if scheduler is not None else None}
        torch.save(state, directory / TRAINER_STATE)


def load_train_state(directory: str | Path, model, optimizer, scheduler, env) -> dict[str, Any]:
    """All ranks call. Restores adapter params and optimizer in place; returns the extra_state."""
    directory = Path(directory)
    verify_dcp_metadata(directory)  # DCP unpickles .metadata: check it references plain data only
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory), no_dist=_no_dist(env))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=LOAD_OPTIONS
    )
    trainer_state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    if scheduler is not None and trainer_state.get("scheduler") is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    return trainer_state["extra"]
