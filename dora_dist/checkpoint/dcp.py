"""Training state through torch.distributed.checkpoint (DCP): adapter parameters and optimizer state, sharded as
each engine holds them (FSDP2 DTensors are written shard by shard, without gathering), plus a small trainer-state
file (scheduler, data position, step) written by rank 0.

Frozen base weights are never written: they come from the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from dora_dist.checkpoint.safe_load import verify_dcp_metadata

TRAINER_STATE = "trainer_state.pt"
OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading only the adapter keys into the full model: frozen keys are "missing" on purpose. dcp.load itself still
# fails on any adapter/optimizer key that the checkpoint lacks.
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class _Env(Protocol):
    @property
    def distributed(self) -> bool: ...

    @property
    def is_main(self) -> bool: ...


class _Scheduler(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def _no_dist(env: _Env) -> bool:
    return not env.distributed


def save_train_state(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: _Scheduler | None,
    extra_state: dict[str, Any],
    env: _Env,
) -> None:
    """All ranks call. Writes <dir>/ (DCP files) and <dir>/trainer_state.pt (rank 0)."""
    directory = Path(directory)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    dcp_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory), no_dist=_no_dist(env))
    if env.is_main:
        state = {"extra": extra_state, "scheduler": scheduler.state_dict() if scheduler is not None else None}
        torch.save(state, directory / TRAINER_STATE)


def load_train_state(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: _Scheduler | None, env: _Env
) -> dict[str, Any]:
    """All ranks call. Restores adapter params and optimizer in place; returns the extra_state."""
    directory = Path(directory)
    verify_dcp_metadata(directory)  # DCP unpickles .metadata: check it references plain data only
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    dcp_load(state, checkpoint_id=str(directory), no_dist=_no_dist(env))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=LOAD_OPTIONS
    )
    trainer_state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    if scheduler is not None and trainer_state.get("scheduler") is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    extra: dict[str, Any] = trainer_state["extra"]
    return extra
