"""The collectives each engine runs per optimizer step, with their exact sizes (padding included).

Sizes are whole logical buffers on one rank, as `dora_dist.parallel.comm_counter` counts them: all-gather = the
gathered output, reduce-scatter = the input, all-reduce / broadcast = the tensor. `tests/dist/test_comm_prediction.py`
holds these predictions equal to the counted bytes of real 2-process runs for every engine.

Where the sizes come from (world N, gas = micro-steps per optimizer step, adapters in `dora.adapter_dtype`):

- every engine: the trainer all-reduces the step loss, one float64 (8 bytes).
- ddp: adapter gradients all-reduced once per step (on the last micro-step), in DDP's buckets (1 MiB first bucket,
  then `parallel.ddp_bucket_mb`); buckets concatenate gradients, no padding. Frozen base: nothing.
- fsdp2: every parameter is sharded on dim 0 with torch.chunk, each shard padded to ceil(dim0/N) rows, so a unit's
  all-gather output is Σ ceil(dim0/N)·N·(row elements)·itemsize in the all-gather dtype (bf16 under
  training.precision=bf16, else the parameter's own; a 4-bit base gathers its packed row records, see
  quant/sharded4bit.py). Per micro-step the root (embeddings, head) is gathered once (it stays unsharded until the
  backward ends) and each block twice (forward, and again in backward after reshard_after_forward); adapter
  gradients are reduce-scattered in fp32 under bf16, else in the adapters' dtype (padded the same way) on the last
  micro-step; clipping all-reduces one norm per trainable tensor (DTensor's partial norms, stacked).
- fsdp2 HSDP (dp_replicate R × dp_shard S): the same with N = S, all inside a shard group (dim "dp_shard"), plus
  one all-reduce per unit across groups (dim "dp_replicate") of the unit's reduce-scattered shard (its
  reduce-scatter bytes / S), on the last micro-step only. The loss all-reduce stays on "dp".
- zero2: DeepSpeed all-reduces the adapter gradients (its contiguous buckets) on every micro-step, checks two fp32
  scalars, and after the optimizer step all-gathers each parameter group's flat fp32 partition, the group padded
  to a multiple of 2·N elements (nccl_start_alignment_factor = 2).
- zero3: every parameter is split by element count into N partitions of ceil(numel/N). Parameters with at most
  `stage3_param_persistence_threshold` (1e5) elements are "persistent": after each optimizer step they are all
  gathered once and stay whole; larger ones are gathered (together) at each micro-step's forward and, when the
  model's non-persistent elements exceed `stage3_max_reuse_distance` (1e9), again in backward. Gradients are
  reduce-scattered (fp32, each padded to N·ceil(numel/N)) on every micro-step; two float64 scalars are
  all-reduced at the step. With shard groups (ZeRO++ hpZ, parallel.shard_group < N) the non-persistent gathers
  run inside the group (dim "dp_shard"), but for an adapter's first gather after each step (`_hpz_gathers`);
  gradients, the persistent re-gather and the scalars stay on all ranks (dim "dp").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from math import ceil
from typing import TYPE_CHECKING

from dora_dist.parallel import capabilities
from dora_dist.parallel.mesh import MeshDims, resolve_dims
from dora_dist.plan.model_spec import ModelSpec, ParamSpec, base_dtype_bytes, dtype_bytes

if TYPE_CHECKING:
    from dora_dist.config import Config

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "reduce", "other")
ZERO3_PERSISTENCE_THRESHOLD = 100_000
ZERO3_MAX_REUSE_DISTANCE = 1_000_000_000
DDP_FIRST_BUCKET_BYTES = 1 << 20


#: the mesh dimension whose process group runs a collective (parallel/mesh.py): "dp" = all data-parallel ranks
#: (the flat group, the only one before HSDP / TP), "dp_shard" = inside a shard group, "dp_replicate" = across
#: shard groups (the same shard on each group), "tp" = inside a tensor-parallel group
MESH_DIMS = ("dp", "dp_shard", "dp_replicate", "tp")


@dataclass(frozen=True)
class Collective:
    kind: str
    nbytes: int  # per step, summed over its calls
    calls: int
    overlap: bool  # can hide behind compute (prefetched all-gathers, bucketed gradient reductions)
    what: str
    dim: str = "dp"  # MESH_DIMS: which group runs it (its size and whether it crosses nodes follow from MeshDims)


def grad_accum(cfg: Config, world: int) -> int:
    t = cfg.training
    if t.global_batch_size:
        return max(1, t.global_batch_size // (t.micro_batch_size * world))
    return int(t.grad_accum)


def four_bit(cfg: Config) -> bool:
    return cfg.quantization.mode in ("nf4", "fp4")


def packed_row_bytes(cfg: Config, out_features: int, in_features: int) -> int:
    """Bytes of one row record of a Sharded4bitTensor (FSDP2's 4-bit base), from its layout code."""
    return _packed_row_bytes(cfg.quantization.mode, cfg.quantization.double_quant, out_features, in_features)


@cache
def _packed_row_bytes(mode: str, nested: bool, out_features: int, in_features: int) -> int:
    """(cached: the layout code is slow and a model has a handful of distinct shapes)"""
    from dora_dist.quant.sharded4bit import _Meta, row_layout

    _, _, _, _, k1, k2 = row_layout(out_features, in_features, 64, nested)
    return _Meta(mode, 64, nested, None, None, k1, k2, in_features).row_bytes


def param_itemsize(cfg: Config, p: ParamSpec) -> int:
    """Bytes per element as stored (dense); 4-bit bases are handled by the callers."""
    if p.trainable:
        return dtype_bytes(cfg.dora.adapter_dtype)
    return base_dtype_bytes(cfg)


def fsdp2_gather_bytes(cfg: Config, p: ParamSpec, world: int) -> int:
    """All-gather output bytes of one parameter under FSDP2 (dim-0 padded to a multiple of the world size)."""
    rows = ceil(p.shape[0] / world) * world if p.shape else world
    if p.role == "linear" and four_bit(cfg):
        return rows * packed_row_bytes(cfg, p.shape[0], p.shape[1])
    row_elems = p.numel // p.shape[0] if p.shape else 1
    itemsize = 2 if cfg.training.precision == "bf16" else param_itemsize(cfg, p)
    return rows * row_elems * itemsize


def fsdp2_unit_bytes(cfg: Config, spec: ModelSpec, unit: int, world: int) -> int:
    return sum(fsdp2_gather_bytes(cfg, p, world) for p in spec.select(block=unit))


def _padded(numel: int, world: int) -> int:
    return ceil(numel / world) * world


def fsdp2_collectives(cfg: Config, spec: ModelSpec, dims: MeshDims, gas: int) -> list[Collective]:
    """FSDP2's collectives of one step, flat (one "dp" group) or HSDP: all-gathers, reduce-scatters and the
    gradient-norm all-reduce run inside a shard group of S = dp_shard ranks (padding to multiples of S), and each
    unit's reduce-scattered gradient shard (its reduce-scatter bytes / S) is all-reduced across the R = dp_replicate
    groups, once per step (set_requires_gradient_sync(False) holds both back on the other micro-steps)."""
    hsdp = dims.dp_replicate > 1
    s, dim = dims.dp_shard, "dp_shard" if hsdp else "dp"
    # gradients are reduced in fp32 under bf16 compute (MixedPrecisionPolicy), else in the adapters' own dtype
    abytes = dtype_bytes(cfg.dora.adapter_dtype)
    grad_bytes = 4 if cfg.training.precision == "bf16" else abytes
    blocks = [u for u in spec.units if u >= 0]
    root = fsdp2_unit_bytes(cfg, spec, -1, s)
    block_bytes = sum(fsdp2_unit_bytes(cfg, spec, u, s) for u in blocks)
    per_block = 2 if cfg.parallel.reshard_after_forward else 1
    root_times = 1 if blocks or not cfg.parallel.reshard_after_forward else 2
    what = f"decoder blocks, {'forward + backward' if per_block == 2 else 'forward'}"
    rs, rs_calls = 0, 0
    for u in spec.units:
        unit_train = spec.select(trainable=True, block=u)
        if unit_train:
            rs += sum(_padded(p.shape[0], s) * (p.numel // p.shape[0]) * grad_bytes for p in unit_train)
            rs_calls += 1
    n_tensors = len(spec.select(trainable=True))
    out = [
        Collective("all_gather", gas * root_times * root, gas * root_times, False, "root unit (embeddings, head)", dim),
        Collective("all_gather", gas * per_block * block_bytes, gas * per_block * len(blocks), True, what, dim),
        Collective("reduce_scatter", rs, rs_calls, True, "adapter gradients (padded dim 0)", dim),
        Collective("all_reduce", abytes * n_tensors, 1, False, "gradient norm (one value per tensor)", dim),
    ]
    if hsdp:
        out.append(
            Collective("all_reduce", rs // s, rs_calls, True, "gradient shards across shard groups", "dp_replicate")
        )
    return out


def predict_collectives(
    cfg: Config,
    spec: ModelSpec,
    engine: str,
    world: int,
    dims: MeshDims | None = None,
    padded_tokens: int | None = None,
) -> list[Collective]:
    """Every collective of one steady-state optimizer step on one rank (empty for one process). `dims`: the job's
    mesh (default: `resolve_dims` for one node of `world` processes). `padded_tokens`: the tokens this rank's
    micro-batches of the step computed, padding included (only tensor parallelism's activation all-reduces depend
    on them; default: full blocks, gas · micro_batch_size · seq_len)."""
    caps = capabilities(engine)
    if world <= 1 or caps.max_world == 1:
        return []
    if dims is None:
        dims = resolve_dims(cfg, world, None, engine)
    if dims.tp > 1 and dims.world == world:  # dp × tp, flat or HSDP dp (plan/comm_tp.py)
        from dora_dist.plan.comm_tp import predict_tp_collectives

        return [c for c in predict_tp_collectives(cfg, spec, engine, dims, padded_tokens) if c.nbytes or c.calls]
    fsdp2 = caps.shards_params and caps.deepspeed_stage is None
    # modelled meshes: flat (every engine), FSDP2's HSDP and ZeRO-3's hpZ (dp_replicate × dp_shard, both > 1)
    hybrid_modelled = dims.hybrid and (fsdp2 or caps.deepspeed_stage == 3)
    if (dims.dp_replicate > 1 and not hybrid_modelled) or dims.world != world:
        raise NotImplementedError(f"no communication model yet for the mesh {dims.describe()}")
    gas = grad_accum(cfg, world)
    abytes = dtype_bytes(cfg.dora.adapter_dtype)
    trainable = spec.select(trainable=True)
    n_train = sum(p.numel for p in trainable)
    out = [Collective("all_reduce", 8, 1, False, "step loss (float64)")]
    if not caps.shards_params and not caps.shards_optimizer:  # DDP: replicated, gradients all-reduced
        nbytes = n_train * abytes
        cap = cfg.parallel.ddp_bucket_mb * 2**20
        calls = 1 + (ceil(max(0, nbytes - DDP_FIRST_BUCKET_BYTES) / cap) if nbytes > DDP_FIRST_BUCKET_BYTES else 0)
        out.append(Collective("all_reduce", nbytes, calls, True, "adapter gradients (DDP buckets)"))
    elif fsdp2:  # FSDP2: sharded by rows (inside each shard group under HSDP)
        out += fsdp2_collectives(cfg, spec, dims, gas)
    elif caps.deepspeed_stage == 2:
        out.append(Collective("all_reduce", gas * n_train * abytes, gas, False, "adapter gradients, every micro-step"))
        out.append(Collective("all_reduce", 2 * 4, 2, False, "overflow / norm scalars"))
        decay = [p for p in trainable if not (p.role == "magnitude" or len(p.shape) < 2)]
        no_decay = [p for p in trainable if p not in decay]
        ag = sum(ceil(sum(p.numel for p in g) / (2 * world)) * 2 * world * abytes for g in (decay, no_decay) if g)
        out.append(
            Collective(
                "all_gather",
                ag,
                sum(1 for g in (decay, no_decay) if g),
                False,
                "updated fp32 partitions (groups padded to 2·N)",
            )
        )
    elif caps.deepspeed_stage == 3:
        persistent = [p for p in spec.params if p.numel <= ZERO3_PERSISTENCE_THRESHOLD]
        big = [p for p in spec.params if p.numel > ZERO3_PERSISTENCE_THRESHOLD]
        itemsize = lambda p: param_itemsize(cfg, p)  # noqa: E731
        big_bytes = sum(_padded(p.numel, world) * itemsize(p) for p in big)
        regather = 2 if sum(p.numel for p in big) > ZERO3_MAX_REUSE_DISTANCE else 1
        if dims.hybrid:
            out.extend(_hpz_gathers(cfg, big, world, gas * regather))
        else:
            out.append(
                Collective(
                    "all_gather",
                    gas * regather * big_bytes,
                    gas * regather * (1 if big else 0),
                    True,
                    "non-persistent parameters, per micro-step",
                )
            )
        out.append(
            Collective(
                "all_gather",
                sum(_padded(p.numel, world) * itemsize(p) for p in persistent),
                len(persistent),
                False,
                "persistent parameters, re-gathered after the step",
            )
        )
        out.append(
            Collective(
                "reduce_scatter",
                gas * sum(_padded(p.numel, world) * 4 for p in trainable),
                gas,
                True,
                "adapter gradients, every micro-step",
            )
        )
        out.append(Collective("all_reduce", 2 * 8, 2, False, "norm / overflow scalars"))
    else:
        raise ValueError(f"no communication model for engine {engine!r}")
    return [c for c in out if c.nbytes or c.calls]


def _hpz_gathers(cfg: Config, big: list[ParamSpec], world: int, gathers: int) -> list[Collective]:
    """ZeRO++ hpZ's per-layer all-gathers of the non-persistent parameters (`gathers` per step: micro-steps × 1 or 2).
    Each is gathered from its secondary partition (padded numel / shard group) inside the shard group, except a
    trainable one's first gather of the step: DeepSpeed drops the secondary copies of updated parameters after
    the optimizer step, so that gather reads the primary partitions over all ranks (and makes the new secondary
    copy). The output has the same padded size either way (the secondary split pads to the world too)."""
    nbytes = lambda ps: sum(_padded(p.numel, world) * param_itemsize(cfg, p) for p in ps)  # noqa: E731
    frozen, train = [p for p in big if not p.trainable], [p for p in big if p.trainable]
    return [
        Collective(
            "all_gather",
            gathers * nbytes(frozen) + (gathers - 1) * nbytes(train),
            gathers if big else 0,
            True,
            "non-persistent parameters per micro-step, from the shard group's secondary partitions",
            dim="dp_shard",
        ),
        Collective(
            "all_gather",
            nbytes(train),
            1 if train else 0,
            True,
            "non-persistent adapters' first gather after the step (secondary copy dropped)",
        ),
    ]


def bytes_by_kind(collectives: list[Collective]) -> dict[str, int]:
    out = {k: 0 for k in KINDS}
    for c in collectives:
        out[c.kind] += c.nbytes
    return out


def bytes_by_dim(collectives: list[Collective]) -> dict[str, dict[str, int]]:
    """{mesh dimension: {kind: bytes}} for the dimensions that carry any collective."""
    return {
        d: bytes_by_kind([c for c in collectives if c.dim == d])
        for d in MESH_DIMS
        if any(c.dim == d for c in collectives)
    }


def wire_bytes(c: Collective, world: int) -> float:
    """Bytes one rank sends over the link for a ring implementation of `c`."""
    f = (world - 1) / world
    return c.nbytes * (2 * f if c.kind == "all_reduce" else f if c.kind in ("all_gather", "reduce_scatter") else 1.0)
