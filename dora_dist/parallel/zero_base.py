"""What DeepSpeed's ZeRO-2 and ZeRO-3 engines share (`parallel.engine=zero2|zero3`, parallel/zero.py).

Launched by `deepspeed --num_gpus N --module dora_dist.train ...` (launch/deepspeed.sh; or `deepspeed --hostfile
...`, or torchrun: all set RANK/WORLD_SIZE/MASTER_ADDR, and the trainer makes the process group before DeepSpeed is
touched). On the CPU, DeepSpeed picks its cpu accelerator and uses the gloo group the trainer made.

The math is the single-process math. The DeepSpeed JSON comes from our config (`zero_config.py`); the optimizer
and LR schedule the trainer's factory builds (torch AdamW and warmup/cosine LambdaLR, dora_dist/optim.py) are handed
to `deepspeed.initialize` as a client optimizer and scheduler, so ZeRO only partitions their state. `backward`
multiplies by the world size (DeepSpeed averages gradients over ranks) and passes `scale_wrt_gas=False` (the
trainer's loss is already the micro-batch's share of the global mean), and `accumulate(last)` sets DeepSpeed's
accumulation boundary, so DeepSpeed's `step` is called once per optimizer step.

`prepare` is the same for both stages except where the magnitudes are initialised: the subclass says, through
`init_magnitudes_before` (ZeRO-2: from the full local weights, before `deepspeed.initialize`) and
`init_magnitudes_after` (ZeRO-3: from the partitions `deepspeed.initialize` made).

Adapter export gathers only adapter tensors (one layer at a time) and builds the PEFT state dict on rank 0.
Checkpoints use DeepSpeed's own `save_checkpoint`/`load_checkpoint` (adapter parameters, partitioned optimizer
state, the LR scheduler; frozen base weights excluded), with the trainer's extra state (data position, RNG) as
client state, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dora_dist.checkpoint.safe_load import verify_torch_file
from dora_dist.parallel.base import Engine, StepResult, dora_layers, rank_zero_print
from dora_dist.parallel.zero_config import build_ds_config, describe

if TYPE_CHECKING:
    from dora_dist.config import Config
    from dora_dist.dist_env import DistEnv

CHECKPOINT_TAG = "zero"
CLIENT_KEY = "dora_dist"


def _is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: this rank's slice of its flat data is `p.ds_tensor`. (Small 'persistent' parameters
    are partitioned too until their first use, then also kept whole in `p.data`.)"""
    return _is_zero3_param(p) and getattr(p, "ds_tensor", None) is not None


def deepspeed_checkpoint_globals() -> list:
    """The plain-data classes DeepSpeed's checkpoint files hold besides tensors (checked by verify_torch_file):
    an enum, the (static) loss scaler's attribute record and ZeRO-2's fragment addresses (a named tuple)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


class ZeroEngine(Engine):
    """Common ZeRO engine; Zero2Engine / Zero3Engine (parallel/zero.py) declare the stage in their capabilities
    and override what differs."""

    name = "zero"

    def __init__(self, cfg: Config, env: DistEnv, batching=None, optimizer_factory=None):
        super().__init__(cfg, env, batching, optimizer_factory)
        self.ds_engine: Any = None  # deepspeed's DeepSpeedEngine (untyped), set by wrap
        self.ds_config: dict[str, Any] | None = None
        self.norm_init_stats: dict[str, Any] = {}
        self._hf_ds_config = None

    # --- set-up ---------------------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        """The ZeRO stage (from the capabilities)."""
        stage = self.capabilities.deepspeed_stage
        if stage is None:
            raise TypeError(f"{type(self).__name__} declares no deepspeed_stage in its capabilities")
        return stage

    def make_ds_config(self) -> dict[str, Any]:
        return build_ds_config(
            self.cfg,
            self.env.world_size,
            self.stage,
            grad_accum=self.batching.grad_accum,
            local_world=self.env.local_world_size,
        )

    def wrap(self, model: nn.Module) -> nn.Module:
        """Prepare the bare model for deepspeed.initialize (the subclass adds what its stage needs)."""
        if not self.env.distributed:
            raise RuntimeError(
                f"parallel.engine={self.name} needs several processes "
                "(launch with `deepspeed --num_gpus N` or torchrun)"
            )
        return model

    def prepare(self, model: nn.Module) -> nn.Module:
        """check -> wrap -> magnitudes (before) -> optimizer -> deepspeed.initialize -> magnitudes (after)."""
        import deepspeed

        self.check_model(model)
        if self.ds_config is None:
            self.ds_config = self.make_ds_config()
        model = self.wrap(model)
        self.init_magnitudes_before(model)
        optimizer, scheduler = self.build_optimizer(model)
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False
        )
        self.ds_engine, self.model = engine, engine
        self.optimizer, self.scheduler = ds_optimizer, ds_scheduler
        self.init_magnitudes_after(engine, ds_optimizer)
        rank_zero_print(self.env, f"[dora_dist] DeepSpeed {describe(self.ds_config)}")
        return engine

    def init_magnitudes_before(self, model: nn.Module) -> None:
        """Magnitudes set on the bare model, before deepspeed.initialize. Default: none."""

    def init_magnitudes_after(self, ds_engine, ds_optimizer) -> None:
        """Magnitudes set once deepspeed.initialize has partitioned the model. Default: none."""

    # --- the step -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self, last: bool):
        """DeepSpeed reduces gradients and steps only at the boundary; we mark it on the last micro-step."""
        self.ds_engine.set_gradient_accumulation_boundary(bool(last))
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.ds_engine.backward(loss * self.loss_scale, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clipping happens inside DeepSpeed's step (gradient_clipping); this reports the last global norm."""
        norm = self.ds_engine.get_global_grad_norm()
        return 0.0 if norm is None else float(norm)

    def optimizer_step(self) -> None:
        """DeepSpeed's step: clip (gradient_clipping), optimizer + LR scheduler step, zero grads, in one call."""
        self.ds_engine.set_gradient_accumulation_boundary(True)
        self.ds_engine.step()

    def guarded_step(self, loss_is_finite: bool = True) -> StepResult:
        """DeepSpeed clips and steps in one call, and skips a step whose gradient norm is inf/NaN itself (no update,
        no LR tick, gradients zeroed: its "overflow" path, taken for fp32 adapters under ZeRO-2 and any dtype under
        ZeRO-3). `was_step_applied` says which happened. The parameter at fault is not named: the gradients are
        in DeepSpeed's flat partitions, and gone after its step. A step applied although non-finite (bf16 adapters
        under ZeRO-2) makes the trainer stop."""
        self.optimizer_step()
        grad_norm = self.clip_grad_norm(self.cfg.training.max_grad_norm)
        return StepResult(grad_norm, stepped=bool(self.ds_engine.was_step_applied()))

    def first_nonfinite_grad(self) -> str | None:
        """Not available: the gradients are in DeepSpeed's flat partitions (and zeroed by its step)."""
        return None

    def current_lr(self) -> float:
        return float(self.ds_engine.get_lr()[0])

    # --- adapter export -------------------------------------------------------------------------------
    def adapter_state_dict(self, model: nn.Module | None = None) -> dict[str, torch.Tensor] | None:
        """Full adapter tensors (PEFT keys) on rank 0; ZeRO-3 gathers one layer's adapter at a time, nothing else."""
        import deepspeed

        from dora_dist.adapters.inject import modules_to_save
        from dora_dist.adapters.peft_format import PREFIX, SUFFIXES

        model = self.unwrap(model if model is not None else self.model)
        out: dict[str, torch.Tensor] = {}
        for name, layer in dora_layers(model):
            params = {
                suffix: getattr(layer, attr) for suffix, attr in SUFFIXES.items() if getattr(layer, attr) is not None
            }
            gathered = [p for p in params.values() if _is_partitioned(p)]
            ctx = (
                deepspeed.zero.GatheredParameters(gathered, modifier_rank=None)
                if gathered
                else contextlib.nullcontext()
            )
            with ctx:  # COLLECTIVE: adapter of one layer
                if self.env.is_main:
                    for suffix, p in params.items():
                        out[f"{PREFIX}{name}.{suffix}"] = p.detach().cpu().clone()
        for name, module in modules_to_save(model).items():  # trained in full (dora.modules_to_save)
            gathered = [p for p in module.parameters() if _is_partitioned(p)]
            ctx = (
                deepspeed.zero.GatheredParameters(gathered, modifier_rank=None)
                if gathered
                else contextlib.nullcontext()
            )
            with ctx:  # COLLECTIVE: one module
                if self.env.is_main:
                    for key, t in module.state_dict().items():
                        out[f"{PREFIX}{name}.{key}"] = t.detach().cpu().clone()
        return out if self.env.is_main else None

    # --- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str, extra_state: dict[str, Any]) -> None:
        """Adapter params, partitioned optimizer state, LR scheduler (no frozen weights) + trainer state."""
        self.ds_engine.save_checkpoint(
            str(directory),
            tag=CHECKPOINT_TAG,
            client_state={CLIENT_KEY: extra_state},
            save_latest=False,
            exclude_frozen_parameters=True,
        )

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        if not (Path(directory) / CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(
                f"{directory} holds no DeepSpeed checkpoint (no '{CHECKPOINT_TAG}' folder); "
                f"was it written by parallel.engine={self.name}?"
            )
        for file in sorted((Path(directory) / CHECKPOINT_TAG).glob("*.pt")):
            verify_torch_file(file, deepspeed_checkpoint_globals())  # DeepSpeed unpickles with weights_only=False
        path, client = self.ds_engine.load_checkpoint(
            str(directory),
            tag=CHECKPOINT_TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
        return (client or {}).get(CLIENT_KEY, {})

    def close(self) -> None:
        destroy = getattr(self.ds_engine, "destroy", None)
        if callable(destroy):
            destroy()
        self._hf_ds_config = None
