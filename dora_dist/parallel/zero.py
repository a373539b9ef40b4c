"""DeepSpeed ZeRO-2 and ZeRO-3 engines (`parallel.engine=zero2|zero3`): what each stage does differently. What they
share (launch, the step, adapter export, DeepSpeed checkpoints) is `ZeroEngine` in zero_base.py.

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
Under ZeRO++ hpZ (parallel.shard_group below the world: zero_hpz_partition_size in the JSON) each parameter also has
a secondary partition split over the rank's shard group only; the "partition" path reads it, so the all-reduce
runs inside the group (the node), and the engine names DeepSpeed's hpZ group "dp_shard" for the collective counter.
`norm_init_stats` records the layers and payload bytes of the last init (tiny test Llama, 14 layers: 2,080 bytes
all-reduced vs 89,680 bytes gathered; Llama-3.1-8B, 224 layers: 5.5 MB vs the whole 14 GB bf16 base).

Loading (`model_init_context`): transformers builds and loads the model inside zero.Init, straight into the
partitions (a load-time config names the base dtype, so a bf16 base stays bf16). DoRA's weight sources read a
partitioned weight's logical shape (`ds_shape`), so the layers are built over the partitioned base.

Adapter export gathers only adapter tensors (one layer at a time) and builds the PEFT state dict on rank 0.
quantization state (absmax, blocksize, shape) stays whole, which is why peft fails there (peft issue #1731).
ZeRO-2 (or DDP) trains 4/8-bit bases, and so does FSDP2 (row-sharded packed 4-bit, quant/sharded4bit.py).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch import nn

from dora_dist.errors import ConfigError
from dora_dist.parallel import zero_hpz
from dora_dist.parallel.base import Engine, dora_layers, rank_zero_print
from dora_dist.parallel.capabilities import EngineCapabilities
from dora_dist.parallel.zero_base import (  # noqa: F401  (CHECKPOINT_TAG, CLIENT_KEY, ...: re-exported)
    CHECKPOINT_TAG,
    CLIENT_KEY,
    ZeroEngine,
    _is_partitioned,
    deepspeed_checkpoint_globals,
)

QDORA_ZERO3_REASON = (
    "ZeRO-3 flattens and splits every parameter over the ranks, including the packed quantized weights, whose "
    "quantization state cannot be split with them (the same failure as peft issue #1731). For QDoRA on several "
    "ranks use parallel.engine=zero2 (the 4-bit base stays whole on every rank; adapter gradients and optimizer "
    "state are partitioned) or parallel.engine=ddp; or train a bf16 base with zero3."
)


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


def _norm_slice(p: torch.Tensor) -> tuple[torch.Tensor, int, object]:
    """(valid elements, their flat start, the group whose slices cover the weight) that the row norms of a ZeRO-3
    parameter are computed from: its hpZ secondary partition (shard group), else its primary one (zero_hpz.py)."""
    return zero_hpz.norm_slice(p, (_local_slice(p), _partition_range(p)[0]))


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


class Zero2Engine(ZeroEngine):
    """ZeRO-2: every rank holds the whole model (4/8-bit bases too); adapter gradients and optimizer state are
    partitioned. The magnitudes come from the full local weights, before deepspeed.initialize (no communication)."""

    name = "zero2"
    capabilities = EngineCapabilities(
        min_world=2,
        compile=False,  # DeepSpeed's per-module hooks would run inside the compiled blocks
        shards_optimizer=True,
        deepspeed_stage=2,
        checkpoint_format="deepspeed",
        resumes_from=frozenset({"deepspeed"}),
        reshardable_checkpoints=False,  # DeepSpeed's ZeRO checkpoints load at the world size that wrote them
        cpu_offload=True,
        requires=("deepspeed",),
    )

    def init_magnitudes_before(self, model: nn.Module) -> None:
        Engine.init_magnitudes(self, model)  # full weights on every rank: no communication


class Zero3Engine(ZeroEngine):
    """ZeRO-3: every parameter partitioned, the model loaded inside zero.Init, base weights registered as external
    parameters of their DoRA layer, magnitudes from the weight partitions; no 4/8-bit base."""

    name = "zero3"
    capabilities = EngineCapabilities(
        min_world=2,
        compile=False,
        shards_params=True,
        shards_optimizer=True,
        quant_modes=frozenset({"none"}),
        prequantized=False,
        deepspeed_stage=3,
        hybrid_shard=True,  # ZeRO++ hierarchical partitioning (zero_hpz_partition_size)
        checkpoint_format="deepspeed",
        resumes_from=frozenset({"deepspeed"}),
        reshardable_checkpoints=False,
        cpu_offload=True,
        requires=("deepspeed",),
    )

    @classmethod
    def quant_reason(cls, mode: str) -> str:
        return QDORA_ZERO3_REASON

    # --- set-up ---------------------------------------------------------------------------------------
    def unsupported_base(self, source) -> str | None:
        if source.quantized:
            return f"zero3 does not support 4/8-bit (quantized) base layers: {QDORA_ZERO3_REASON}"
        return None

    def load_plan(self):
        """ZeRO-3 builds and loads the model inside zero.Init (see model_init_context)."""
        from dora_dist.models.load_plan import LoadPlan

        self.plan = LoadPlan("zero_init", self.env.device)
        return self.plan

    def model_init_context(self):
        """Build/load the model already partitioned, so no rank ever holds the whole base model.

        Under this context transformers' `from_pretrained` / `from_config` construct parameters inside
        `deepspeed.zero.Init` and load checkpoint shards straight into the partitions (transformers sees the live
        `HfDeepSpeedConfig`). DoRA layers are added afterwards, outside it; `deepspeed.initialize` partitions them.
        """
        problem = self.config_problem(self.cfg, self.env.world_size)
        if problem is not None:
            raise ConfigError(problem)
        import deepspeed
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend=self.env.backend)  # wraps the process group the trainer made
        self.ds_config = self.make_ds_config()
        zero_hpz.sync_group(zero_hpz.hpz_size(self.ds_config))  # zero.Init creates the hpZ group when it has none
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

    def wrap(self, model: nn.Module) -> nn.Module:
        """Each base weight becomes an external parameter of its DoRA layer (gathered with the adapter)."""
        import deepspeed

        model = super().wrap(model)
        for _, layer in dora_layers(model):
            for p in layer.base_layer.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(layer, p)
        return model

    # --- hpZ (ZeRO++ hierarchical partitioning, parallel.shard_group < world; see zero_hpz.py) ----------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """ZeroEngine.prepare, with the hpZ group made current and named "dp_shard" for the collective counter."""
        if self.ds_config is None:
            self.ds_config = self.make_ds_config()
        zero_hpz.sync_group(zero_hpz.hpz_size(self.ds_config))
        engine = super().prepare(model)
        if (size := zero_hpz.hpz_size(self.ds_config)) > 1:
            ranks = zero_hpz.register_group()
            rank_zero_print(
                self.env,
                f"[dora_dist] ZeRO++ hpZ: weights gathered inside shard groups of {size} (this rank's: {ranks}); "
                f"gradients reduced over all {self.env.world_size} ranks",
            )
        return engine

    def close(self) -> None:
        super().close()
        if zero_hpz.hpz_size(self.ds_config) > 1:
            zero_hpz.release_group()

    def init_magnitudes_after(self, ds_engine, ds_optimizer) -> None:
        self.init_magnitudes(ds_engine.module)
        ds_optimizer.refresh_fp32_params()  # the fp32 master partitions follow the new m

    # --- magnitude init -------------------------------------------------------------------------
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
        flat, start, group = _norm_slice(w)
        shape = tuple(int(d) for d in w.ds_shape)
        out_dim = 1 if layer.fan_in_fan_out else 0
        partial = partial_row_sq_norms(flat, start, shape, out_dim).to(self.env.device)
        dist.all_reduce(partial, group=group)  # COLLECTIVE: out floats (inside the shard group under hpZ)
        stats["allreduce_bytes"] += partial.numel() * partial.element_size()
        stats["allreduce_group_size"] = dist.get_world_size(group)
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
        weight; rank 0 counts the layer."""
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
                flat, start, group = _norm_slice(w)
                shape = tuple(int(d) for d in w.ds_shape)
                wa = partial_times_A(flat, start, shape, 1 if layer.fan_in_fan_out else 0, a).to(device)
                dist.all_reduce(wa, group=group)  # COLLECTIVE: (out, r) floats
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
