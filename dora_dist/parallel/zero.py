"""DeepSpeed ZeRO-2 and ZeRO-3 engines (`parallel.engine=zero2|zero3`).

Launched by `deepspeed --num_gpus N --module dora_dist.train ...` (launch/deepspeed.sh; or `deepspeed --hostfile
...`, or torchrun: all set RANK/WORLD_SIZE/MASTER_ADDR, and the trainer makes the process group before DeepSpeed is
touched). On the CPU, DeepSpeed picks its cpu accelerator and uses the gloo group the trainer made.

The math is the single-process math. The DeepSpeed JSON comes from our config (`zero_config.py`); the trainer's
torch AdamW and warmup/cosine LambdaLR are handed to `deepspeed.initialize` as a client optimizer and scheduler, so
ZeRO only partitions their state. `backward` multiplies by the world size (DeepSpeed averages gradients over
ranks) and passes `scale_wrt_gas=False` (the trainer's loss is already the micro-batch's share of the global mean),
and `accumulate(last)` sets DeepSpeed's accumulation boundary, so `step` is called once per optimizer step.

ZeRO-2: every rank holds the whole model; gradients and optimizer state of the adapters are partitioned. The
magnitude is initialised from the full local weight (no communication), before `deepspeed.initialize`.
4/8-bit (bitsandbytes) bases work: frozen parameters are never handed to the ZeRO optimizer.

ZeRO-3: every parameter, frozen base weights included, is flattened and split evenly by element count over the
ranks (rank k holds elements [k·P, (k+1)·P) of the flat weight, P = ceil(numel/N); parameters smaller than
`stage3_param_persistence_threshold` are also kept whole on every rank after their first use). DeepSpeed gathers
a module's own parameters when that module's forward runs; `DoRALinear.forward` reads `base_layer.weight`
through its weight source without calling `base_layer.forward`, so each base weight is registered as an
*external parameter* of its DoRALinear (`deepspeed.zero.register_external_parameter`): it is gathered with the
adapter in the layer's forward and backward and released afterwards, one layer at a time, like any other ZeRO-3
parameter. (DeepSpeed would also gather it lazily on first access as a "dangling" parameter; registering it makes
that explicit and prefetchable. Marking DoRALinear a ZeRO-3 leaf module with `set_z3_leaf_modules` instead fails in
backward here (DeepSpeed 0.19.8: the base weight is still partitioned, shape (0,), when the backward runs).)

Magnitude init and ‖W‖² under ZeRO-3 (`init_magnitudes`), two paths; the default is the first:

- "partition" (no weight gather): each rank squares its own flat slice of W, adds each element into its output
  row (slices are not row-aligned: a slice may start and end mid-row; whole rows in between are reduced as a
  block), and one all-reduce sums the partial ‖W_i‖² over ranks. Moves out·4 bytes per layer (fp32 (out,)
  vector; a ring all-reduce sends about 2·(N-1)/N of that per rank). m = ‖W‖ (B = 0 at init) is written into
  this rank's slice of the magnitude partition; ‖W‖² is cached on the layer (`base_row_sq`) for forward.
  If some lora_B is non-zero (not the case after init), that layer falls back to the gather path.
- "gather": `deepspeed.zero.GatheredParameters([base.weight, lora_A, lora_B])` around one layer at a time,
  computing the norm from the full weight; the gathered copies are released when the context exits. Moves the
  whole weight: out·in·itemsize bytes gathered per layer ((N-1)/N of it received per rank).
`norm_init_stats` records the layers and payload bytes of the last init (tiny test Llama, 14 layers: 2,080 bytes
all-reduced vs 89,680 bytes gathered; Llama-3.1-8B, 224 layers: 5.5 MB vs the whole 14 GB bf16 base).

Loading (`model_init_context`): transformers builds and loads the model inside zero.Init, straight into the
partitions (a load-time config names the base dtype, so a bf16 base stays bf16). DoRA's weight sources read a
partitioned weight's logical shape (`ds_shape`), so the layers are built over the partitioned base.

Adapter export gathers only adapter tensors (one layer at a time) and builds the PEFT state dict on rank 0.
Checkpoints use DeepSpeed's own `save_checkpoint`/`load_checkpoint` (adapter parameters, partitioned optimizer
state, the LR scheduler; frozen base weights excluded), with the trainer's extra state (data position, RNG) as
client state, so a resumed run continues exactly.

QDoRA with ZeRO-3 is refused: ZeRO-3 would flatten and split bitsandbytes' packed 4-bit data while the
quantization state (absmax, blocksize, shape) stays whole, which is why peft fails there (peft issue #1731).
ZeRO-2 (or DDP) trains 4/8-bit bases, and so does FSDP2 (row-sharded packed 4-bit, quant/sharded4bit.py).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dora_dist.checkpoint.safe_load import verify_torch_file
from dora_dist.errors import ConfigError
from dora_dist.parallel.base import Engine, StepResult, dora_layers, rank_zero_print
from dora_dist.parallel.zero_config import build_ds_config, describe

CHECKPOINT_TAG = "zero"
CLIENT_KEY = "dora_dist"
QDORA_ZERO3_REASON = (
    "ZeRO-3 flattens and splits every parameter over the ranks, including the packed quantized weights, whose "
    "quantization state cannot be split with them (the same failure as peft issue #1731). For QDoRA on several "
    "ranks use parallel.engine=zero2 (the 4-bit base stays whole on every rank; adapter gradients and optimizer "
    "state are partitioned) or parallel.engine=ddp; or train a bf16 base with zero3."
)


def _is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: this rank's slice of its flat data is `p.ds_tensor`. (Small 'persistent' parameters
    are partitioned too until their first use, then also kept whole in `p.data`.)"""
    return _is_zero3_param(p) and getattr(p, "ds_tensor", None) is not None


def _partition_range(p: torch.Tensor) -> tuple[int, int, int]:
    """(start, stop, partition size) of this rank's slice of a ZeRO-3 parameter's flat data (stop clipped)."""
    size = int(p.ds_tensor.ds_numel)
    rank = dist.get_rank(group=p.ds_process_group)
    start = rank * size
    return start, max(start, min(start + size, int(p.ds_numel))), size


def _local_slice(p: torch.Tensor) -> torch.Tensor:
    """This rank's valid elements of a partitioned parameter (a view of its ZeRO-3 partition)."""
    start, stop, _ = _partition_range(p)
    return p.ds_tensor.view(-1).narrow(0, 0, stop - start)


def storage_row_pieces(flat: torch.Tensor, start: int, d1: int, chunk_rows: int = 4096):
    """Walk the elements of a row-major (d0, d1) weight that lie in flat[start:...] (one rank's ZeRO-3 partition):
    yields ("piece", row, col0, values) for a partial storage row (the head and tail: the slice may begin and end
    mid-row) and ("block", row0, None, (k, d1) view) for whole rows, at most chunk_rows at a time."""
    pos, end, n = 0, flat.numel(), start
    col = n % d1
    if col and pos < end:  # head: the rest of a storage row
        take = min(d1 - col, end - pos)
        yield "piece", n // d1, col, flat[pos : pos + take]
        pos, n = pos + take, n + take
    while end - pos >= d1:  # body: whole storage rows, in blocks
        rows = min(chunk_rows, (end - pos) // d1)
        yield "block", n // d1, None, flat[pos : pos + rows * d1].view(rows, d1)
        pos, n = pos + rows * d1, n + rows * d1
    if pos < end:  # tail: the start of a storage row
        yield "piece", n // d1, 0, flat[pos:end]


def partial_row_sq_norms(
    flat: torch.Tensor, start: int, shape: tuple[int, int], out_dim: int, chunk_rows: int = 4096
) -> torch.Tensor:
    """Σ w² per output row over the elements of a row-major (d0, d1) weight that lie in flat[start:...].

    out_dim = 0 for an (out, in) weight (nn.Linear), 1 for an (in, out) one (transformers Conv1D). The slice may
    begin and end mid storage-row (storage_row_pieces). fp32 (fp64 for fp64 weights) and at most chunk_rows storage
    rows converted at a time.
    """
    acc = torch.promote_types(flat.dtype, torch.float32)
    out = torch.zeros(shape[out_dim], dtype=acc, device=flat.device)
    for kind, row, col0, values in storage_row_pieces(flat, start, shape[1], chunk_rows):
        sq = values.to(acc).pow(2)
        if kind == "block":
            if out_dim == 0:
                out[row : row + sq.shape[0]] += sq.sum(dim=1)
            else:
                out += sq.sum(dim=0)
        elif out_dim == 0:
            out[row] += sq.sum()
        else:
            out[col0 : col0 + sq.numel()] += sq
    return out


def partial_times_A(
    flat: torch.Tensor, start: int, shape: tuple[int, int], out_dim: int, lora_A: torch.Tensor, chunk_rows: int = 4096
) -> torch.Tensor:
    """The part of W·Aᵀ ((out, r), fp32 or fp64) contributed by the elements of a row-major (d0, d1) weight that lie
    in flat[start:...]; summed over the partitions of all ranks it is W·Aᵀ. out_dim as in partial_row_sq_norms."""
    acc = torch.promote_types(flat.dtype, torch.float32)
    a = lora_A.detach().to(device=flat.device, dtype=acc)  # (r, in)
    out = torch.zeros(shape[out_dim], a.shape[0], dtype=acc, device=flat.device)
    for kind, row, col0, values in storage_row_pieces(flat, start, shape[1], chunk_rows):
        values = values.to(acc)
        if kind == "block":
            if out_dim == 0:  # (out, in): rows are outputs
                out[row : row + values.shape[0]] += values @ a.t()
            else:  # (in, out): rows are inputs
                out += values.t() @ a[:, row : row + values.shape[0]].t()
        elif out_dim == 0:
            out[row] += a[:, col0 : col0 + values.numel()] @ values
        else:
            out[col0 : col0 + values.numel()] += values[:, None] * a[:, row][None, :]
    return out


def deepspeed_checkpoint_globals() -> list:
    """The plain-data classes DeepSpeed's checkpoint files hold besides tensors (checked by verify_torch_file):
    an enum, the (static) loss scaler's attribute record and ZeRO-2's fragment addresses (a named tuple)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


class ZeroEngine(Engine):
    """Common ZeRO engine; `stage` picks ZeRO-2 or ZeRO-3."""

    name = "zero"
    checkpoint_format = "deepspeed"
    reshardable_checkpoints = False  # DeepSpeed's ZeRO checkpoints load at the world size that wrote them
    stage = 0
    runs_alone = False
    requires = ("deepspeed",)

    @classmethod
    def config_problem(cls, cfg, world_size: int) -> str | None:
        """No 4/8-bit base under ZeRO-3 (whatever else is set), then the engine-wide rules (deepspeed importable,
        several processes)."""
        mode = getattr(cfg.quantization, "mode", "none")
        if cls.stage == 3 and mode != "none":
            return f"parallel.engine=zero3 cannot train a quantization.mode={mode} base: {QDORA_ZERO3_REASON}"
        return super().config_problem(cfg, world_size)

    def __init__(self, cfg, env, batching=None):
        super().__init__(cfg, env, batching)
        self.ds_engine = None
        self.ds_config: dict[str, Any] | None = None
        self.norm_init_stats: dict[str, Any] = {}
        self._hf_ds_config = None

    # --- set-up ---------------------------------------------------------------------------------------
    def unsupported_base(self, source) -> str | None:
        if self.stage == 3 and source.quantized:
            return f"zero3 does not support 4/8-bit (quantized) base layers: {QDORA_ZERO3_REASON}"
        return None

    def load_plan(self):
        """ZeRO-3 builds and loads the model inside zero.Init (see model_init_context); ZeRO-2 loads it directly."""
        from dora_dist.models.load_plan import LoadPlan

        self.plan = LoadPlan("zero_init" if self.stage == 3 else "direct", self.env.device)
        return self.plan

    def model_init_context(self):
        """Build/load the model already partitioned (ZeRO-3), so no rank ever holds the whole base model.

        Under this context transformers' `from_pretrained` / `from_config` construct parameters inside
        `deepspeed.zero.Init` and load checkpoint shards straight into the partitions (transformers sees the live
        `HfDeepSpeedConfig`). DoRA layers are added afterwards, outside it; `deepspeed.initialize` partitions them.
        ZeRO-2 (every rank holds the whole model anyway): a no-op context.
        """
        if self.stage != 3:
            return contextlib.nullcontext()
        problem = self.config_problem(self.cfg, self.env.world_size)
        if problem is not None:
            raise ConfigError(problem)
        import deepspeed
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend=self.env.backend)  # wraps the process group the trainer made
        self.ds_config = self.make_ds_config()
        # zero.Init casts every floating tensor it creates to the DeepSpeed config's precision (fp32 when bf16/fp16
        # are off, as in our training config); the load-time copy names the base dtype instead, so a bf16 base
        # is partitioned in bf16, exactly as `model.dtype` asks.
        from dora_dist.models import base_dtype

        load_config = copy.deepcopy(self.ds_config)
        dtype = base_dtype(self.cfg)
        load_config["bf16"] = {"enabled": dtype == torch.bfloat16}
        load_config["fp16"] = {"enabled": dtype == torch.float16}
        # transformers holds this through a weak reference: keep it alive for the engine's lifetime
        self._hf_ds_config = HfDeepSpeedConfig(load_config)
        return contextlib.nullcontext()

    def make_ds_config(self) -> dict[str, Any]:
        return build_ds_config(self.cfg, self.env.world_size, self.stage, grad_accum=self.batching.grad_accum)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Prepare the bare model for deepspeed.initialize (ZeRO-3: base weights as external params)."""
        if not self.env.distributed:
            raise RuntimeError(
                f"parallel.engine={self.name} needs several processes "
                "(launch with `deepspeed --num_gpus N` or torchrun)"
            )
        if self.stage == 3:
            import deepspeed

            for _, layer in dora_layers(model):
                for p in layer.base_layer.parameters(recurse=False):
                    deepspeed.zero.register_external_parameter(layer, p)
        return model

    def prepare(self, model: nn.Module) -> nn.Module:
        """check -> (ZeRO-2: magnitudes) -> optimizer -> deepspeed.initialize -> (ZeRO-3: magnitudes)."""
        import deepspeed

        self.check_model(model)
        if self.ds_config is None:
            self.ds_config = self.make_ds_config()
        model = self.wrap(model)
        if self.stage == 2:
            super().init_magnitudes(model)  # full weights on every rank: no communication
        optimizer, scheduler = self.build_optimizer(model)
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False
        )
        self.ds_engine, self.model = engine, engine
        self.optimizer, self.scheduler = ds_optimizer, ds_scheduler
        if self.stage == 3:
            self.init_magnitudes(engine.module)
            ds_optimizer.refresh_fp32_params()  # the fp32 master partitions follow the new m
        rank_zero_print(self.env, f"[dora_dist] DeepSpeed {describe(self.ds_config)}")
        return engine

    # --- magnitude init (ZeRO-3) -------------------------------------------------------------------------
    @torch.no_grad()
    def init_magnitudes(self, model: nn.Module, method: str = "partition") -> None:
        """m = ‖W + s·B·A‖ per row from partitioned weights; see the module docstring for the two paths."""
        if method not in ("partition", "gather"):
            raise ValueError(f"method must be 'partition' or 'gather', got {method!r}")
        model = self.unwrap(model)
        stats = {"method": method, "layers": 0, "allreduce_bytes": 0, "gathered_bytes": 0, "local_layers": 0}
        layers = list(dora_layers(model))
        b_nonzero = self._lora_b_nonzero([layer for _, layer in layers])
        for (_, layer), nonzero in zip(layers, b_nonzero, strict=True):
            weight = layer.base_layer.weight
            stats["layers"] += 1
            if not _is_partitioned(weight):  # not a ZeRO-3 parameter: whole on every rank
                layer.invalidate_cache()
                row_sq = layer.base_row_sq_norms()
                norm = layer.weight_norm() if layer.magnitude is not None else None
                stats["local_layers"] += 1
            elif method == "gather" or (nonzero and layer.magnitude is not None):
                row_sq, norm = self._norms_gathered(layer, stats)
            else:
                row_sq = self._row_sq_from_partition(layer, stats)
                norm = row_sq.clamp_min(0).sqrt() if layer.magnitude is not None else None
            with self._writable(layer.magnitude, stats):
                layer.set_norms(row_sq, norm)
        self.norm_init_stats = stats

    def _writable(self, param: torch.Tensor | None, stats: dict):
        """A context in which a ZeRO-3-partitioned parameter is whole and writable; on exit rank 0's value is
        re-partitioned. COLLECTIVE (partitioned only): the parameter gathered and broadcast, (out,) floats."""
        if param is None or not _is_partitioned(param):
            return contextlib.nullcontext()
        import deepspeed

        stats["magnitude_bytes"] = stats.get("magnitude_bytes", 0) + int(param.ds_numel) * param.element_size()
        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)

    def _lora_b_nonzero(self, layers: list[nn.Module]) -> list[bool]:
        """Whether each layer's lora_B has a non-zero element on any rank (one all-reduce of L floats)."""
        flags = []
        for layer in layers:
            b = layer.lora_B
            local = _local_slice(b) if _is_partitioned(b) else b.data
            flags.append(float(bool(local.numel()) and bool(local.ne(0).any())))
        t = torch.tensor(flags, dtype=torch.float32, device=self.env.device)
        if t.numel() and self.env.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # COLLECTIVE: L floats
        return [bool(v) for v in t.tolist()]

    def _row_sq_from_partition(self, layer: nn.Module, stats: dict) -> torch.Tensor:
        """‖W_i‖² (fp32, (out,)) from this rank's flat slice + one all-reduce of (out,) floats."""
        w = layer.base_layer.weight
        start, _, _ = _partition_range(w)
        shape = tuple(int(d) for d in w.ds_shape)
        out_dim = 1 if layer.fan_in_fan_out else 0
        partial = partial_row_sq_norms(_local_slice(w), start, shape, out_dim).to(self.env.device)
        dist.all_reduce(partial, group=w.ds_process_group)  # COLLECTIVE: out floats
        stats["allreduce_bytes"] += partial.numel() * partial.element_size()
        return partial.to(torch.float32 if partial.dtype != torch.float64 else partial.dtype)

    def _norms_gathered(self, layer: nn.Module, stats: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gather one layer's base weight and adapter, compute ‖W‖² and ‖W + sBA‖ from the full weight, release on
        exit."""
        import deepspeed

        base = [p for p in layer.base_layer.parameters(recurse=False)]
        params = base + [layer.lora_A, layer.lora_B]
        stats["gathered_bytes"] += sum(int(p.ds_numel) * p.element_size() for p in params if _is_partitioned(p))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # COLLECTIVE: one layer
            layer.invalidate_cache()
            row_sq = layer.base_row_sq_norms().clone()
            norm = layer.weight_norm() if layer.magnitude is not None else None
        return row_sq, norm

    # --- DoRA health ------------------------------------------------------------------------------------
    def dora_row_views(self, model: nn.Module | None = None):
        """ZeRO-3: each layer's adapter gathered (COLLECTIVE: A, B, m of one layer, as the adapter export does) and
        W·Aᵀ summed from every rank's weight partition (COLLECTIVE: one all-reduce of (out, r) floats), never the
        weight; rank 0 counts the layer. ZeRO-2 holds whole layers (the default)."""
        if self.stage != 3:
            yield from super().dora_row_views(model)
            return
        import deepspeed

        from dora_dist.health import RowView
        from dora_dist.parallel.base import clean_param_name

        device = self.env.device
        for name, layer in dora_layers(self.unwrap(model if model is not None else self.model)):
            if layer.magnitude is None:
                continue
            adapter = [layer.lora_A, layer.lora_B, layer.magnitude]
            gathered = [p for p in adapter if _is_partitioned(p)]
            ctx = (
                deepspeed.zero.GatheredParameters(gathered, modifier_rank=None)
                if gathered
                else contextlib.nullcontext()
            )
            with ctx:
                a, b, m = (p.detach().to(device).clone() for p in adapter)
            w = layer.base_layer.weight
            if _is_partitioned(w):
                start, _, _ = _partition_range(w)
                shape = tuple(int(d) for d in w.ds_shape)
                wa = partial_times_A(_local_slice(w), start, shape, 1 if layer.fan_in_fan_out else 0, a).to(device)
                dist.all_reduce(wa, group=w.ds_process_group)  # COLLECTIVE: (out, r) floats
                row_sq = layer.base_row_sq
                if row_sq is None:
                    row_sq = self._row_sq_from_partition(layer, {"allreduce_bytes": 0})  # COLLECTIVE
            else:
                wa, row_sq = layer.weight_source.times_A(a), layer.base_row_sq_norms()
            yield RowView(
                clean_param_name(name),
                torch.arange(layer.out_features, device=device),
                m,
                b,
                a,
                row_sq.to(device),
                wa.to(torch.promote_types(wa.dtype, torch.float32)),
                layer.scaling,
                owner=self.env.is_main,
            )

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

    def step(self) -> float:
        self.ds_engine.set_gradient_accumulation_boundary(True)
        self.ds_engine.step()  # clip, optimizer + LR scheduler step, zero grads
        return self.clip_grad_norm(self.cfg.training.max_grad_norm)

    def guarded_step(self, loss_is_finite: bool = True) -> StepResult:
        """DeepSpeed clips and steps in one call, and skips a step whose gradient norm is inf/NaN itself (no update,
        no LR tick, gradients zeroed: its "overflow" path, taken for fp32 adapters under ZeRO-2 and any dtype under
        ZeRO-3). `was_step_applied` says which happened. The parameter at fault is not named: the gradients are
        in DeepSpeed's flat partitions, and gone after its step. A step applied although non-finite (bf16 adapters
        under ZeRO-2) makes the trainer stop."""
        grad_norm = self.step()
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


class Zero2Engine(ZeroEngine):
    name = "zero2"
    stage = 2


class Zero3Engine(ZeroEngine):
    name = "zero3"
    stage = 3
