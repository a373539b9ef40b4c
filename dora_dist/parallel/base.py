"""The parallel engine interface: the only place the trainer meets data parallelism.

The trainer (dora_dist/train.py) drives every engine with the same calls and no engine-specific branches:

    engine = make_engine(cfg, env, batching, optimizer_factory)  # parallel/__init__.py: resolve_engine("auto")
    plan = engine.load_plan()                       # how this rank gets the weights (models/load_plan.py)
    with engine.model_init_context():               # (ZeRO-3: zero.Init)
        model = load_model(cfg, env, plan); add_adapters(model, cfg)
    model = engine.prepare(model)                   # wrap -> init_magnitudes -> optimizer_factory(model);
                                                    #   returns the module to call for forward (may be a wrapper)
    if resuming: extra = engine.load_checkpoint(dir)
    for each optimizer step:
        for i, micro_batch in enumerate(micro_batches):
            with engine.accumulate(last=(i == n - 1)):   # no gradient sync on all but the last micro-step
                loss = <this micro-batch's share of the global-batch mean loss>
                engine.backward(loss)
        result = engine.guarded_step(loss_is_finite)  # clip + step, or skip a non-finite step (see StepResult)
    state = engine.adapter_state_dict()             # full adapter tensors (PEFT keys) on rank 0, None elsewhere
    engine.save_checkpoint(dir, extra_state)        # called by checkpoint.CheckpointManager inside a temp dir

Loss convention. The loss handed to `backward` is the micro-batch's *contribution* to the global-batch mean:
sum of its token losses / number of target tokens in the whole global batch (all ranks, all micro-steps). Summed
over micro-steps and ranks it is the global mean. Engines whose gradient reduction *averages* over data-parallel
ranks (DDP, FSDP2, ZeRO) therefore multiply by the data-parallel world size in `backward` (`loss_scale`); an engine
whose backward also divides by the accumulation steps (DeepSpeed's default) must undo that. The result: the
gradient is the same for any (world size × accumulation) split of the same global batch.

Non-finite steps. `guarded_step` computes the global gradient norm (the one clipping needs anyway) and steps
only when it and the loss are finite; otherwise it finds the first parameter (model order) whose gradient is
non-finite (a collective: only then is there a by-parameter pass), zeroes the gradients and leaves the optimizer
and the LR schedule untouched. An engine whose step cannot be split (ZeRO: DeepSpeed clips and steps in one call)
reports what its step did (`StepResult.stepped`); the trainer stops the run if a non-finite step was applied.

The optimizer and LR schedule are not the engine's: the trainer passes a factory (dora_dist/optim.py) that `prepare`
calls over the wrapped model; the engine only decides when (ZeRO hands the result to deepspeed.initialize).

To add an engine: subclass `Engine` in parallel/<name>.py, declare its `capabilities` (parallel/capabilities.py:
world sizes, quantization modes, compile, sharding, checkpoint format, ...), implement `wrap` (and override what
differs), and register it in `ENGINES` in parallel/__init__.py. Nothing outside parallel/ names an engine:
preflight, compile, resume and the planner read `capabilities(name)`. Method names here are stable.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dora_dist.adapters.inject import dora_layers  # noqa: F401  (re-exported for the engines)
from dora_dist.batching import Batching
from dora_dist.dist_env import DistEnv
from dora_dist.errors import importable
from dora_dist.parallel.capabilities import EngineCapabilities
from dora_dist.parallel.mesh import JobMesh, build_mesh, data_parallel_rank, resolve_dims

if TYPE_CHECKING:
    from dora_dist.config import Config
    from dora_dist.optim import OptimizerFactory

#: a checkpoint's per-tensor format overhead (see Engine.checkpoint_nbytes)
TENSOR_RECORD_BYTES = 4096


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def clean_param_name(name: str) -> str:
    """Strip wrapper prefixes (DDP's `module.`, activation checkpointing, torch.compile) from a parameter name."""
    for prefix in ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
        name = name.replace(prefix, "")
    return name


class Engine:
    """Base engine: one process's view of data parallelism. Subclasses override `wrap` and what differs."""

    name = "base"
    #: what this engine can do (parallel/capabilities.py); read through `dora_dist.parallel.capabilities(name)`
    capabilities = EngineCapabilities()

    @classmethod
    def config_problem(cls, cfg: Config, world_size: int) -> str | None:
        """Why this engine cannot run `cfg` on `world_size` processes here, from the config, the environment and its
        capabilities alone, or None. The one rule: checked by preflight before any process group or model work,
        and again where the engine would otherwise fail."""
        caps = cls.capabilities
        mode = getattr(cfg.quantization, "mode", "none")
        if not caps.holds(mode):
            return f"parallel.engine={cls.name} cannot train a quantization.mode={mode} base: {cls.quant_reason(mode)}"
        for package in caps.requires:
            if not importable(package):
                return (
                    f"parallel.engine={cls.name} needs the '{package}' package, which is not installed (or "
                    f"cannot be imported) here: pip install 'dora_dist[{package}]', or choose another "
                    "parallel.engine (ddp, fsdp2)"
                )
        if caps.max_world is not None and world_size > caps.max_world:
            return (
                f"parallel.engine={cls.name} cannot run {world_size} processes (WORLD_SIZE={world_size}); use "
                "parallel.engine=auto, ddp or fsdp2, or launch one process"
            )
        if world_size < caps.min_world:
            return (
                f"parallel.engine={cls.name} needs several processes but this is one (WORLD_SIZE={world_size}): "
                "launch with torchrun --nproc-per-node N (launch/torchrun.sh), or use parallel.engine=auto"
            )
        return None

    @classmethod
    def quant_reason(cls, mode: str) -> str:
        """Why this engine cannot hold a `mode` base (the end of config_problem's message)."""
        return f"it trains quantization.mode in {sorted(cls.capabilities.quant_modes)} only"

    @property
    def checkpoint_format(self) -> str:
        """What save_checkpoint writes (recorded with each checkpoint)."""
        return self.capabilities.checkpoint_format

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        batching: Batching | None = None,
        optimizer_factory: OptimizerFactory | None = None,
    ):
        self.cfg = cfg
        self.env = env
        self._batching = batching
        self._optimizer_factory = optimizer_factory
        self.plan = None  # the LoadPlan chosen by load_plan()
        self.model: nn.Module | None = None  # what the trainer calls for forward (possibly a wrapper)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    # --- set-up ---------------------------------------------------------------------------------------
    @property
    def batching(self) -> Batching:
        """The job's resolved batch arithmetic (given by the trainer; resolved from the config for a fixed
        max_steps when an engine is built on its own)."""
        if self._batching is None:
            self._batching = Batching.resolve(self.cfg.training, self.dp_size)
        return self._batching

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks (world / parallel.tp): the ranks that see different batches."""
        return data_parallel_rank(self.cfg, self.env.rank, self.env.world_size)[1]

    @property
    def loss_scale(self) -> float:
        """Factor applied in `backward` so that averaging gradients over data-parallel ranks yields the global-batch
        gradient."""
        return float(self.dp_size)

    def job_mesh(self) -> JobMesh:
        """The job's device mesh (parallel/mesh.py), built once (collective: every rank calls it)."""
        mesh = getattr(self, "_job_mesh", None)
        if mesh is None:
            dims = resolve_dims(self.cfg, self.env.world_size, self.env.local_world_size or None, self.name)
            mesh = self._job_mesh = build_mesh(dims, self.env.device.type)
        return mesh

    def apply_tensor_parallel(self, model: nn.Module) -> None:
        """parallel.tp > 1: split the planned linears over the mesh's tp dimension (parallel/tp.py), before any
        data-parallel wrapping. DoRA norms and magnitudes of the split layers are set here."""
        if self.cfg.parallel.tp > 1:
            from dora_dist.parallel.tp import apply_tensor_parallel

            apply_tensor_parallel(model, self.job_mesh())

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model this engine cannot train (called first by `prepare`), naming the layer and the reason."""
        for name, layer in dora_layers(model):
            reason = self.unsupported_base(layer.weight_source)
            if reason:
                raise ValueError(
                    f"parallel.engine={self.name} cannot train {name} (a "
                    f"{type(layer.base_layer).__name__} base): {reason}"
                )

    def unsupported_base(self, source) -> str | None:
        """Why this engine cannot train a base read through `source` (a WeightSource), or None. Default: any."""
        return None

    def model_init_context(self):
        """Context the trainer loads the base model in (e.g. DeepSpeed ZeRO-3's zero.Init). Default: none."""
        return contextlib.nullcontext()

    def load_plan(self):
        """How this rank gets the base weights (models/load_plan.py), chosen once before the model is built; `wrap`
        follows it. Default: real weights straight on this rank's device."""
        from dora_dist.models.load_plan import LoadPlan

        self.plan = LoadPlan("direct", self.env.device)
        return self.plan

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard / replicate the model for this engine; returns the module to call. Collectives: engine-specific."""
        raise NotImplementedError

    def unwrap(self, model: nn.Module | None = None) -> nn.Module:
        """The underlying transformers model (for generation, config access, merging)."""
        model = model if model is not None else self.model
        return getattr(model, "module", model)

    @torch.no_grad()
    def init_magnitudes(self, model: nn.Module) -> None:
        """m = ‖W + s·B·A‖ per row, from the real (loaded) base weights. Default: each layer on its full weight."""
        from dora_dist.parallel.tp import is_tensor_parallel

        for _, layer in dora_layers(model):
            if layer.magnitude is not None and not is_tensor_parallel(layer):  # TP: set when split
                layer.init_magnitude()

    def build_optimizer(self, model: nn.Module):
        """(optimizer, LR scheduler) over the wrapped model, from the factory the trainer gave (dora_dist/optim.py);
        without one, the config's AdamW + warmup/decay schedule."""
        factory = self._optimizer_factory
        if factory is None:
            from dora_dist.optim import adamw_factory

            factory = adamw_factory(self.cfg.training, self.batching.max_steps, self.env.device)
        return factory(model)

    def prepare(self, model: nn.Module) -> nn.Module:
        """check_model -> wrap -> init_magnitudes -> build_optimizer. Returns the module to call for forward."""
        self.check_model(model)
        self.model = self.wrap(model)
        self.init_magnitudes(self.model)
        self.optimizer, self.scheduler = self.build_optimizer(self.model)
        return self.model

    # --- the step -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self, last: bool):
        """Context for one micro-step's forward+backward; engines skip the gradient sync unless `last`."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale).backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm over the trainable parameters, clipped to max_norm when max_norm > 0. A non-finite
        norm leaves the gradients as they are (clipping by it would turn every gradient into NaN and hide which
        parameter was at fault). Collective where the gradients are sharded (FSDP2: DTensor norm)."""
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        total = float(_to_full(norm))
        if max_norm and max_norm > 0 and math.isfinite(total):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return total

    def optimizer_step(self) -> None:
        """Optimizer step, scheduler tick, zero grads (after `clip_grad_norm`)."""
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        """Drop this step's gradients: no optimizer update, no scheduler tick."""
        self.optimizer.zero_grad(set_to_none=True)

    def guarded_step(self, loss_is_finite: bool = True) -> StepResult:
        """Clip and step when the (global) loss and gradient norm are finite, else skip the step (see the module
        docstring). Every rank takes the same branch: the loss and the norm are global values."""
        grad_norm = self.clip_grad_norm(self.cfg.training.max_grad_norm)
        if loss_is_finite and math.isfinite(grad_norm):
            self.optimizer_step()
            return StepResult(grad_norm, stepped=True)
        bad = self.first_nonfinite_grad()
        self.skip_step()
        return StepResult(grad_norm, stepped=False, bad_param=bad)

    @torch.no_grad()
    def first_nonfinite_grad(self) -> str | None:
        """Clean name of the first trainable parameter (model order) whose gradient holds a NaN/inf on any rank,
        or None. COLLECTIVE (one all-reduce MIN of an index): each rank checks its local gradient (its shard
        under FSDP2), so every rank gets the same answer."""
        named = trainable_named_parameters(self.model)
        first = len(named)
        for i, (_, p) in enumerate(named):
            grad = p.grad
            if grad is None:
                continue
            if not bool(torch.isfinite(_to_local(grad)).all()):
                first = i
                break
        first = int(self.env.all_reduce_min(first))
        return clean_param_name(named[first][0]) if first < len(named) else None

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def lr_from_schedule(self) -> None:
        """Set the optimizer's lr to this job's schedule at its restored step (after a resume; see optim.py)."""
        from dora_dist.optim import lr_from_schedule

        lr_from_schedule(self.scheduler)

    # --- adapter export -------------------------------------------------------------------------------
    def adapter_state_dict(self, model: nn.Module | None = None) -> dict[str, torch.Tensor] | None:
        """Full adapter tensors in PEFT key format on rank 0 (None on other ranks). Default: no gathering."""
        from dora_dist.adapters import adapter_state_dict as peft_state

        model = self.unwrap(model)
        out = {}
        for key, t in peft_state(model).items():  # same order on every rank
            if hasattr(t, "full_tensor"):  # a tensor-parallel shard (DTensor): COLLECTIVE all-gather over tp
                t = t.full_tensor()
            if self.env.is_main:
                out[key] = t.detach().cpu().clone()
        return out if self.env.is_main else None

    # --- DoRA health (dora_dist/health.py) -------------------------------------------------------------
    def dora_row_views(self, model: nn.Module | None = None):
        """Yield a `health.RowView` per DoRA layer (use_dora) with the rows this rank accounts for; every rank
        iterates the same layers (an engine may run a collective per layer). Default: each rank holds whole layers,
        rank 0 counts them and the others skip the work."""
        from dora_dist.health import RowView
        from dora_dist.parallel.tp import is_tensor_parallel, tp_row_view

        dp_rank = data_parallel_rank(self.cfg, self.env.rank, self.env.world_size)[0]
        for name, layer in dora_layers(self.unwrap(model)):
            if layer.magnitude is not None and not layer.merged:
                if is_tensor_parallel(layer):  # tensor-parallel: its rows per tp rank
                    yield tp_row_view(clean_param_name(name), layer, dp_rank == 0, self.env.device)
                    continue
                yield RowView.whole_layer(clean_param_name(name), layer, owner=self.env.is_main)

    # --- checkpoints (content only; dir naming, atomicity, retention: checkpoint.CheckpointManager) ---
    def save_checkpoint(self, directory: str, extra_state: dict[str, Any]) -> None:
        """Write adapter params + optimizer (+ scheduler) into `directory` (all ranks call; DCP by default)."""
        from dora_dist.checkpoint.dcp import save_train_state

        save_train_state(directory, self.model, self.optimizer, self.scheduler, extra_state, self.env)

    def checkpoint_nbytes(self) -> int:
        """Bytes `save_checkpoint` writes for the tensors, all ranks together, estimated without communication
        before writing: trainable parameters and optimizer state at their full (global) size, plus the format's
        per-tensor overhead (each tensor is a small torch.save record in DCP's files: 1.6-3 KB measured, torch
        2.13) once per rank for a sharded (DTensor) tensor. A ZeRO-3 parameter counts its `ds_numel`; a
        partitioned optimizer state (ZeRO) its local part × world size."""
        world = self.env.world_size

        def nbytes(t, partitioned: bool = False) -> int:
            numel = getattr(t, "ds_numel", None) or t.numel()
            pieces = world if hasattr(t, "to_local") else 1
            return numel * t.element_size() * (world if partitioned else 1) + TENSOR_RECORD_BYTES * pieces

        total = sum(nbytes(p) for p in self.model.parameters() if p.requires_grad) if self.model is not None else 0
        state = getattr(self.optimizer, "state", None) or {}
        partitioned = self.capabilities.deepspeed_stage is not None  # flat local partitions, not DTensors
        for per_param in state.values():
            total += sum(nbytes(v, partitioned) for v in per_param.values() if isinstance(v, torch.Tensor))
        return total

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        """Restore what `save_checkpoint` wrote; returns its extra_state."""
        from dora_dist.checkpoint.dcp import load_train_state

        return load_train_state(directory, self.model, self.optimizer, self.scheduler, self.env)

    # --- misc ---------------------------------------------------------------------------------------
    def peak_memory_bytes(self) -> int:
        """Peak memory of this process: CUDA max allocated, else the process's max RSS."""
        if self.env.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.env.device))
        try:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except Exception:  # pragma: no cover
            return 0

    def close(self) -> None:
        """Release engine resources (the process group is destroyed by the trainer)."""


@dataclass
class StepResult:
    """What `Engine.guarded_step` did: `stepped` False means skipped (no update, no scheduler tick, grads zeroed);
    `bad_param` is then the first parameter with a non-finite gradient (None when none was, e.g. only the loss)."""

    grad_norm: float
    stepped: bool
    bad_param: str | None = None


def _to_local(t) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2's sharded gradients); plain tensors unchanged."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _to_full(t) -> torch.Tensor:
    """A DTensor (e.g. FSDP2's total grad norm) as a plain tensor; plain tensors unchanged."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return t
    if isinstance(t, DTensor):
        return t.full_tensor()
    return t


def rank_zero_print(env: DistEnv, *args, **kwargs) -> None:
    if env.is_main:
        print(*args, **kwargs, flush=True)
