"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters sharded by rows (dim 0) over the data-parallel ranks.

Wrapping: `fully_shard` on every decoder block (the model's `_no_split_modules` classes) and then on the root, with
a MixedPrecisionPolicy (bf16 parameters in forward/backward when training.precision=bf16, fp32 gradient
reduction) and an optional CPUOffloadPolicy.

DoRA and sharding. fully_shard splits each parameter along dim 0 with torch.chunk semantics (ceil(out/N) rows per
rank, the last rank possibly fewer). A base weight W (out, in), its magnitude m (out,) and lora_B (out, r) all have
`out` as dim 0, so rank k holds the *same rows* of all three. The magnitude init therefore needs no weight gather:

    m_i = ‖W_i + s·(B·A)_i‖ = sqrt(‖W_i‖² + 2s·B_i·(W_i·Aᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ)   for the local rows i

Only lora_A (r, in), sharded over r, is all-gathered (r·in floats; zero at B = 0 but kept for generality).
‖W_i‖² is also cached on each layer (`DoRALinear.base_row_sq`, a plain attribute that FSDP2 neither shards nor
offloads) for the forward pass: computed here from the local rows in fp32, all-gathered as (out,) floats per layer
and kept on the compute device (also with CPU offload), so forward never recomputes it from the (possibly bf16)
unsharded weight. See `init_sharded_norms`. Collectives are marked `# COLLECTIVE`.

HSDP (parallel.shard_group below the world; parallel/hsdp.py): the mesh is 2-D (dp_replicate, dp_shard), "rank k"
above is the rank's place in its shard group, and every gather here runs inside the group; only gradients (FSDP2's
all-reduce of the reduce-scattered shards) cross groups.

Forward and backward: FSDP2 all-gathers each block's parameters before use and reduce-scatters gradients
(averaged over ranks; `loss_scale` = world size compensates, see base.py). Under gradient accumulation,
`set_requires_gradient_sync(False)` skips the reduce-scatter on all but the last micro-step.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from dora_dist.nn.dora_linear import dora_row_norms
from dora_dist.parallel.base import Engine, dora_layers
from dora_dist.parallel.capabilities import EngineCapabilities
from dora_dist.parallel.hsdp import chunk_span as _chunk_span
from dora_dist.parallel.hsdp import first_replica, row_shard_group, row_shards, same_row_sharding
from dora_dist.parallel.tp import is_tensor_parallel

if TYPE_CHECKING:
    from dora_dist.config import Config
    from dora_dist.dist_env import DistEnv

try:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - torch < 2.6
    from torch.distributed._composable.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard one by one (classes in `_no_split_modules`, else ModuleList children)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    for module in model.modules():  # fallback: the longest ModuleList
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            return list(module)
    return []


class FSDP2Engine(Engine):
    name = "fsdp2"
    # nf4/fp4 bases become row-shardable ShardedLinear4bit (load plan sharded_4bit); bitsandbytes' Int8Params cannot
    # be split by fully_shard
    capabilities = EngineCapabilities(
        min_world=2,
        shards_params=True,
        shards_optimizer=True,
        quant_modes=frozenset({"none", "nf4", "fp4"}),
        cpu_offload=True,
        hybrid_shard=True,
        tensor_parallel=True,
    )

    @classmethod
    def quant_reason(cls, mode: str) -> str:
        return (
            f"bitsandbytes {mode} weights cannot be sharded by fully_shard (only nf4/fp4 bases become row-shardable "
            "ShardedLinear4bit); use parallel.engine=ddp or zero2"
        )

    def __init__(self, cfg: Config, env: DistEnv, batching=None, optimizer_factory=None):
        super().__init__(cfg, env, batching, optimizer_factory)
        self.mesh = None  # what fully_shard shards over: 1-D "dp", or 2-D (dp_replicate, dp_shard) under HSDP

    def unsupported_base(self, source) -> str | None:
        # bitsandbytes' Params4bit / Int8Params cannot be split by fully_shard (forward raises `quant_state is
        # required`); a ShardedLinear4bit (what the fsdp2 load plan makes of a 4-bit base) can.
        if source.quantized and not source.fsdp_shardable:
            return (
                "bitsandbytes 4/8-bit weights cannot be sharded by fully_shard. Load the model through the "
                "trainer with parallel.engine=fsdp2 and quantization.mode=nf4|fp4 (its linears then become "
                "row-shardable ShardedLinear4bit), or use parallel.engine=ddp or zero2"
            )
        return None

    # --- wrapping ------------------------------------------------------------------------------------
    def mp_policy(self) -> MixedPrecisionPolicy:
        # bf16 compute reduces gradients in fp32; otherwise they are reduced in the parameters' own dtype (fp32, or
        # fp64 for reference runs), never below it.
        bf16 = self.cfg.training.precision == "bf16"
        return MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
        )

    def shard_kwargs(self) -> dict:
        kwargs = {"mesh": self.mesh, "mp_policy": self.mp_policy()}
        if self.cfg.parallel.cpu_offload:
            # pinned host memory needs an accelerator; on a CPU-only run the "offload" is a no-op copy anyway
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.env.device.type == "cuda")
        return kwargs

    def load_plan(self):
        """nf4/fp4: meta build, shard, stream each rank's rows (bnb's Params4bit cannot shard). load_on_rank0: rank 0
        reads the weights into CPU memory, the others build on meta, and `wrap` broadcasts. Else: direct."""
        from dora_dist.models.load_plan import LoadPlan

        if self.cfg.quantization.mode in ("nf4", "fp4"):  # 4-bit: packed row records, sharded by rows
            plan = LoadPlan("sharded_4bit", torch.device("meta"))
        elif (
            self.cfg.parallel.load_on_rank0
            and self.env.world_size > 1
            and self.cfg.quantization.mode == "none"
            and self.cfg.parallel.tp == 1
        ):
            plan = LoadPlan("rank0_broadcast", torch.device("cpu" if self.env.is_main else "meta"))
        else:
            plan = LoadPlan("direct", self.env.device)
        self.plan = plan
        return plan

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard each decoder block, then the root; fill the weights after sharding when the load plan says so."""
        if not self.env.distributed:
            raise RuntimeError("parallel.engine=fsdp2 needs several processes (launch with torchrun)")
        plan = self.plan or self.load_plan()
        # HSDP when parallel.shard_group is below the data-parallel world (shard inside each group, replicate across
        # groups); parallel.tp > 1: split the linears over tp first, then shard over dp (as torchtitan)
        self.apply_tensor_parallel(model)
        self.mesh = self.job_mesh().data_parallel()
        kwargs = self.shard_kwargs()
        full_state = buffers = None
        if plan.kind == "rank0_broadcast":
            # Keep rank 0's full weights (CPU) and every rank's buffers (non-persistent ones, e.g. RoPE inv_freq,
            # are in no state dict), then shard an empty (meta) model and fill it below.
            full_state = model.state_dict() if self.env.is_main else {}
            buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
            model.to("meta")
        blocks = decoder_blocks(model)
        for block in blocks:
            fully_shard(block, reshard_after_forward=self.cfg.parallel.reshard_after_forward, **kwargs)
        # The root holds embeddings, final norm and head; its params are needed right after the last block.
        fully_shard(model, reshard_after_forward=False if blocks else self.cfg.parallel.reshard_after_forward, **kwargs)
        if plan.kind == "rank0_broadcast":
            self._fill_from_rank0(model, full_state, buffers)
        elif plan.kind == "sharded_4bit":
            from dora_dist.models.lowmem_load import finish_lowmem_load

            finish_lowmem_load(model, self.cfg, self.env, self.env.device)  # allocate + load this rank's rows
        return model

    def _fill_from_rank0(self, model: nn.Module, full_state: dict, buffers: dict) -> None:
        """Allocate this rank's shards, restore buffers, receive the weights from rank 0 (one tensor at a time)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model.to_empty(device=self.env.device)
        for name, value in buffers.items():
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module._buffers[attr] = value.to(self.env.device)
        # COLLECTIVE: a broadcast of every base/adapter tensor from rank 0; each rank keeps only its rows
        set_model_state_dict(
            model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        full_state.clear()

    # --- magnitude init from local rows ----------------------------------------------------------------
    @torch.no_grad()
    def init_magnitudes(self, model: nn.Module) -> None:
        init_sharded_norms(model, self.env.device)

    # --- step ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    # --- adapter export --------------------------------------------------------------------------------
    def adapter_state_dict(self, model: nn.Module | None = None):
        """Gather each adapter tensor (only adapters) to full size; rank 0 keeps a CPU copy."""
        from dora_dist.adapters import adapter_state_dict as peft_state

        model = self.unwrap(model)
        out = {}
        for key, t in peft_state(model).items():  # same order on every rank
            if isinstance(t, DTensor):
                if t.device.type != self.env.device.type:
                    t = t.to(self.env.device)
                t = t.full_tensor()  # COLLECTIVE: all-gather of one adapter tensor
            if self.env.is_main:
                out[key] = t.detach().cpu().clone()
        return out if self.env.is_main else None

    # --- DoRA health ------------------------------------------------------------------------------------
    def dora_row_views(self, model: nn.Module | None = None):
        """Each rank's own rows (W, m and lora_B share the dim-0 shards): W·Aᵀ from the local weight rows, with every
        layer's lora_A gathered by one all-gather (COLLECTIVE: Σ r·in floats, inside the shard group), no weight
        gather. Conv1D bases, whose shards hold input rows, gather that one layer's weight on every rank and rank 0
        counts it. Under HSDP only the first shard group's ranks count their rows (the others hold replicas)."""
        from dora_dist.health import RowView
        from dora_dist.parallel.base import clean_param_name

        device = self.env.device
        layers = [
            (clean_param_name(n), layer)
            for n, layer in dora_layers(self.unwrap(model))
            if layer.magnitude is not None and not layer.merged
        ]
        if self.cfg.parallel.tp > 1:  # tensor-parallel layers: their tp rows (parallel/tp.py)
            from dora_dist.parallel.mesh import data_parallel_rank
            from dora_dist.parallel.tp import tp_row_view

            split = [(n, layer) for n, layer in layers if is_tensor_parallel(layer)]
            layers = [(n, layer) for n, layer in layers if not is_tensor_parallel(layer)]
            first = data_parallel_rank(self.cfg, self.env.rank, self.env.world_size)[0] == 0
            for name, layer in split:
                yield tp_row_view(name, layer, first, device)
        sharded = [layer for _, layer in layers if isinstance(layer.base_layer.weight, DTensor)]
        whole_a = dict(
            zip(map(id, sharded), gather_dim0_shards([layer.lora_A for layer in sharded], device), strict=True)
        )
        for name, layer in layers:
            weight = layer.base_layer.weight
            if not isinstance(weight, DTensor):
                yield RowView.whole_layer(name, layer, owner=self.env.is_main)
                continue
            a = whole_a[id(layer)]
            if layer.fan_in_fan_out:
                full = layer.weight_source.over_rows(weight.full_tensor())  # COLLECTIVE: one layer's weight
                yield RowView(
                    name,
                    torch.arange(layer.out_features, device=device),
                    _full(layer.magnitude, device),
                    _full(layer.lora_B, device),
                    a,
                    full.row_sq_norms().to(device),
                    full.times_A(a).to(device),
                    layer.scaling,
                    owner=self.env.is_main,
                )
                continue
            local = _local(weight)
            start, count = _chunk_span(layer.out_features, *row_shards(weight))
            rows = torch.arange(start, start + count, device=device)
            source = layer.weight_source.over_rows(local)
            cached = layer.base_row_sq
            row_sq = cached.to(device)[rows] if cached is not None else source.row_sq_norms().to(device)
            yield RowView(
                name,
                rows,
                _local_copy(layer.magnitude, device),
                _local_copy(layer.lora_B, device),
                a,
                row_sq,
                source.times_A(a).to(device),
                layer.scaling,
                owner=first_replica(weight),
            )


def gather_dim0_shards(params: list, device: torch.device) -> list[torch.Tensor]:
    """Whole copies of several dim-0-sharded DTensors (torch.chunk layout over their shard group: the 1-D mesh, or
    HSDP's dp_shard dimension) from ONE all-gather of all their local shards, flattened and padded to the longest
    rank's total (instead of one collective each). COLLECTIVE, inside the shard group. Plain tensors are returned as
    they are; several dtypes or shardings fall back to one gather each."""
    import torch.distributed as dist

    dts = [p for p in params if isinstance(p, DTensor)]
    dtypes = {p.dtype for p in dts}
    if len(dtypes) > 1 or not same_row_sharding(dts):
        return [_full(p, device) for p in params]
    if not dts:
        return [p.detach().to(device) for p in params]
    world, _ = row_shards(dts[0])

    def rows_of(p, k: int) -> int:
        return _chunk_span(p.shape[0], world, k)[1]

    def width(p) -> int:
        return int(torch.Size(p.shape[1:]).numel())

    totals = [sum(rows_of(p, k) * width(p) for p in dts) for k in range(world)]
    local = torch.zeros(max(totals), dtype=dts[0].dtype, device=device)
    pieces = [_local(p).reshape(-1).to(device) for p in dts]
    if pieces:
        flat = torch.cat(pieces)
        local[: flat.numel()] = flat
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=row_shard_group(dts[0]))  # COLLECTIVE: Σ shards, padded
    offsets = [0] * world
    whole = {}
    for p in dts:
        parts = []
        for k in range(world):
            n = rows_of(p, k) * width(p)
            parts.append(gathered[k][offsets[k] : offsets[k] + n])
            offsets[k] += n
        whole[id(p)] = torch.cat(parts).view(p.shape)
    return [whole[id(p)] if isinstance(p, DTensor) else p.detach().to(device) for p in params]


def _local(t: DTensor) -> torch.Tensor:
    """This rank's shard, detached. The DTensor's own local tensor when it has one: `to_local()` goes through an
    autograd Function (~0.1 ms a call, which the per-layer health views would pay 4 times a layer)."""
    local = getattr(t, "_local_tensor", None)
    return (local if isinstance(local, torch.Tensor) else t.to_local()).detach()


def _local_copy(t: DTensor, device: torch.device) -> torch.Tensor:
    """This rank's shard of a parameter, detached, on `device` (read only)."""
    return _local(t).to(device)


def _full(t, device: torch.device) -> torch.Tensor:
    """A (possibly DTensor) parameter as a whole plain tensor on `device`. COLLECTIVE for a DTensor."""
    t = t.detach()
    if isinstance(t, DTensor):
        if t.device.type != device.type:
            t = t.to(device)
        return t.full_tensor()
    return t.to(device)


# ------------------------------------------------------------------------------------------------------------
# DoRA norms of row-sharded layers (the one FSDP2 norm path: the engine, tests and benchmarks call this)
# ------------------------------------------------------------------------------------------------------------
def gather_rows(like: DTensor, local: torch.Tensor) -> torch.Tensor:
    """All-gather a per-row tensor whose rows are sharded like `like` (Shard(0), torch.chunk layout, the last
    shards possibly short) into the full tensor. COLLECTIVE: rows × trailing dims values."""
    full_shape = torch.Size((like.shape[0], *local.shape[1:]))
    dt = DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=full_shape,
        stride=torch.empty(full_shape, device="meta").stride(),
    )
    return dt.full_tensor()


@torch.no_grad()
def init_sharded_norms(model: nn.Module, device: torch.device) -> int:
    """‖W‖² (cached on each layer, on the compute device) and the magnitude of every DoRA layer, after the real
    weights are loaded, from each rank's own rows: fully_shard splits W (out, in), m (out,) and lora_B (out, r)
    along dim 0 alike, so rank k holds the same rows of all three and

        m_i = ‖W_i + s·(B·A)_i‖ = sqrt(‖W_i‖² + 2s·B_i·(W_i·Aᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ)

    needs only lora_A (r·in values) gathered, never the weight. ‖W‖² is then all-gathered as (out,) floats because
    the forward runs on full rows. Conv1D bases store W as (in, out), so their dim-0 shards hold input rows: those
    are gathered one layer at a time. Returns the number of layers done."""
    done = 0
    for _, layer in dora_layers(model):
        weight, source = layer.base_layer.weight, layer.weight_source
        done += 1
        if is_tensor_parallel(layer):
            continue  # tensor-parallel: norms and magnitude set when it was split (parallel/tp.py)
        if not isinstance(weight, DTensor):
            layer.init_magnitude()  # not sharded (e.g. outside any fully_shard unit)
            continue
        if source.fan_in_fan_out:
            _init_gathered_layer(layer, device)
            continue
        rows = source.over_rows(weight.to_local())  # this rank's rows of W
        row_sq = rows.row_sq_norms().to(device)  # ‖W_i‖², local rows
        magnitude = None
        if layer.magnitude is not None:
            a = layer.lora_A.full_tensor().to(device)  # COLLECTIVE: all-gather A (r, in)
            b = layer.lora_B.to_local().to(device)  # (rows, r), same rows as W
            # A fresh adapter (B = 0 on every rank alike) needs no W·Aᵀ: its cross term is exactly zero
            wa = rows.times_A(a).to(device) if bool(b.any()) else torch.zeros(b.shape[0], a.shape[0], device=device)
            magnitude = dora_row_norms(row_sq, wa, a, b, layer.scaling)
        layer.set_norms(gather_rows(weight, row_sq), magnitude)  # COLLECTIVE: (out,) floats
    return done


@torch.no_grad()
def _init_gathered_layer(layer: nn.Module, device: torch.device) -> None:
    """Norms of a layer whose shards do not hold whole output rows: gather this one layer's weight (never more than
    one at a time), compute its norms, keep this rank's chunk of the magnitude (torch.chunk layout, as fully_shard
    splits it)."""
    weight = layer.base_layer.weight.full_tensor()  # COLLECTIVE: one layer's weight
    source = layer.weight_source
    full = source.over_rows(weight)  # the whole gathered layer
    row_sq = full.row_sq_norms().to(device)
    magnitude = None
    if layer.magnitude is not None:
        a, b = layer.lora_A.full_tensor(), layer.lora_B.full_tensor()  # COLLECTIVE: adapter of one layer
        norm = dora_row_norms(row_sq, full.times_A(a).to(device), a.to(device), b.to(device), layer.scaling)
        size, rank = row_shards(layer.magnitude)
        chunks = torch.chunk(norm, size)
        magnitude = chunks[rank] if rank < len(chunks) else norm[:0]
    del weight
    layer.set_norms(row_sq, magnitude)
