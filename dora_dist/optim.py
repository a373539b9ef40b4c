"""The optimizer and LR policy of a job: AdamW over the adapter parameters and a warmup + cosine (or constant /
linear) LambdaLR, handed to the engine as a factory.

Why a factory: the engine decides *when* the optimizer is built (after wrapping, over the wrapped parameters; a
ZeRO engine hands it to `deepspeed.initialize` as a client optimizer) but not *what* it is; the trainer decides
that. An engine built without one (library callers, tests) gets `adamw_factory` of its config, the same policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: model -> (optimizer, LR scheduler), called by Engine.prepare once the model is wrapped
OptimizerFactory = Callable[[nn.Module], tuple[torch.optim.Optimizer, Any]]


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0, schedule: str = "cosine"):
    """LR multiplier: linear warmup from ~0 to 1 over warmup_steps, then cosine (or constant/linear) decay."""

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on lora_A/lora_B, none on magnitudes and biases."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (name.endswith("magnitude") or name.endswith("bias") or p.ndim < 2) else decay).append(p)
    groups: list[dict] = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("the model has no trainable parameters (did apply_dora match any target module?)")
    return groups


def adamw_factory(training, max_steps: int, device: torch.device) -> OptimizerFactory:
    """AdamW over the trainable (adapter) parameters + the warmup/decay LambdaLR of `training` (the config's
    training section) over `max_steps` optimizer steps."""

    def build(model: nn.Module):
        t = training
        opt = torch.optim.AdamW(
            param_groups(model, t.weight_decay),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            foreach=False if device.type == "cpu" else None,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine_lambda(t.warmup_steps, max_steps, t.min_lr_ratio, t.lr_schedule)
        )
        return opt, sched

    return build


def lr_from_schedule(scheduler) -> None:
    """Set the optimizer's lr to the schedule's value at its restored step. After a resume the optimizer holds
    the lr saved with it (and LambdaLR.load_state_dict keeps it): stale for one step when the schedule changed,
    as when a finished run is extended (training.max_steps raised)."""
    if scheduler is None:
        return
    sched = getattr(scheduler, "scheduler", scheduler)  # unwrap, should an engine wrap the torch scheduler
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas, strict=False)]
    for group, lr in zip(sched.optimizer.param_groups, lrs, strict=False):  # as many (DeepSpeed wraps them)
        group["lr"] = lr
    sched._last_lr = list(lrs)
