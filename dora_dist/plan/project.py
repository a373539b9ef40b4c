"""Step time, throughput, fit and the engine recommendation for a job on a cluster.

step time = compute + the communication that does not overlap with it (+ host↔device traffic under CPU offload):

- compute: model FLOPs per token at the GPU's MFU (its preset's, derived from cited published runs, or `--mfu`),
  or a measured time per token (`compute_s_per_token`, what benchmarks/scaling.py calibrates from its one-process
  run). Every linear of the model counts, adapted or not, and the head: with a frozen base a linear costs 2·N per
  token forward and 2·N backward (input gradients only, no weight gradients), 4·N in all; the adapters 6·N_adapter;
  causal attention 2·S·h per layer and token forward, twice that backward; gradient checkpointing repeats the
  forward; DoRA's weight norm adds 2·r·N_linear per micro-step (W·Aᵀ); LoRA dropout under DoRA runs the adapted
  base matmuls once more on the dropped input (forward and backward). A 4-bit base adds bitsandbytes'
  dequantization, bound by memory bandwidth: per pass over the weights (forward, recomputation, backward, DoRA's
  W·Aᵀ) each weight's packed half byte is read and its 16-bit copy written and read back.
- communication: each collective of `comm.predict_collectives` costs its ring wire bytes / bandwidth + latency ×
  calls on the slowest link it crosses (NVLink/PCIe within a node, InfiniBand/Ethernet across nodes). Under nccl,
  prefetched all-gathers and bucketed gradient reductions overlap with compute, as far as the link's
  `overlap_efficiency` lets them; the rest (the first gather, step-time scalars, DeepSpeed's post-step gathers) do
  not. Under gloo (`--gpu cpu`) nothing does: the trainer waits for each collective where it is issued (measured
  over a shaped link, benchmarks/emulated_nodes.py).

The uncertainty `plan` prints: tokens/s from the MFU's spread over the cited runs (`MFU_SPREAD`), and the memory
terms that dominate the peak.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dora_dist.errors import ConfigError
from dora_dist.parallel import capabilities, engines_for, resolve_engine
from dora_dist.parallel.mesh import MeshDims, resolve_dims
from dora_dist.plan.comm import Collective, bytes_by_dim, bytes_by_kind, four_bit, grad_accum, predict_collectives
from dora_dist.plan.hardware import GB, Cluster, GiB
from dora_dist.plan.links import bytes_by_link
from dora_dist.plan.links import comm_time as link_comm_time
from dora_dist.plan.memory import MemoryEstimate, estimate_memory, is_quantized
from dora_dist.plan.model_spec import ModelSpec, model_spec
from dora_dist.plan.tp_layout import model_split_problem, tp_fraction

if TYPE_CHECKING:
    from dora_dist.config import Config

HOST_LINK_BYTES_PER_S = 20 * GB  # PCIe between host and GPU, for CPU offload traffic
#: what the CUDA caching allocator reserves beyond the peak of live tensors (segments rounded to 2 MiB, blocks split
#: and cached for reuse): Answer.AI measured 10.22 GiB reserved for 9.16 GiB allocated (Llama-2-7B LoRA FSDP,
#: 2 × 3090, benchmarks_03_2024.md), 11.6 %; plan/FACTS.md
ALLOCATOR_OVERHEAD = 0.12
#: what the allocator cannot give back when memory runs short: on a failed cudaMalloc it frees every cached,
#: unused segment and retries, so only the slack inside live segments remains (allocations rounded up to 512 B,
#: large blocks to 2 MiB segments, split blocks not merged): a few percent (plan/FACTS.md)
MIN_FRAGMENTATION = 0.03
#: NCCL's communicator buffers (outside the allocator) on multi-rank jobs: NCCL_BUFFSIZE 4 MiB × channels × peers
NCCL_BYTES = 0.25 * 2**30
#: the relative spread of achieved MFU over the cited runs of one GPU kind (tokens/s range printed by plan)
MFU_SPREAD = 0.25


@dataclass
class Projection:
    engine: str
    cpu_offload: bool
    world: int
    memory: MemoryEstimate
    collectives: list[Collective]
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    offload_s: float
    tokens_per_step: int
    fits: bool
    need_bytes: float
    have_bytes: float
    host_fits: bool = True
    runnable: bool = True
    notes: list[str] = field(default_factory=list)
    reserved_bytes: float = 0.0  # what torch.cuda.max_memory_reserved would report: live peak + allocator overhead
    outside_bytes: float = 0.0  # CUDA context and NCCL buffers, outside the caching allocator
    dims: MeshDims = field(default_factory=MeshDims)  # the job's mesh (dp_replicate × dp_shard × tp)
    #: {"intra_node": bytes, "inter_node": bytes} per rank and step (plan/links.py)
    link_bytes: dict[str, int] = field(default_factory=dict)
    #: False where comm.predict_collectives has no model for this mesh yet: no time, not recommended
    comm_modelled: bool = True

    @property
    def label(self) -> str:
        """The engine and its layout, as the engine table prints it: "fsdp2 HSDP 2×8", "zero3 hpZ 2×8",
        "fsdp2 tp=4", "ddp +offload"."""
        return layout_label(self.engine, self.dims) + (" +offload" if self.cpu_offload else "")

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s + self.offload_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s if self.step_s > 0 else 0.0

    @property
    def tokens_per_s_range(self) -> tuple[float, float]:
        """tokens/s at MFU × (1 ∓ MFU_SPREAD): the spread of the cited runs around the preset."""
        if self.step_s <= 0:
            return (0.0, 0.0)
        rest = self.step_s - self.compute_s
        lo = self.tokens_per_step / (self.compute_s / (1 - MFU_SPREAD) + rest)
        hi = self.tokens_per_step / (self.compute_s / (1 + MFU_SPREAD) + rest)
        return (lo, hi)

    @property
    def dominant_memory(self) -> list[tuple[str, float]]:
        """The device memory terms, largest first, with their share of the live peak."""
        total = self.memory.device_total or 1.0
        return sorted(((k, v / total) for k, v in self.memory.device.items() if v > 0), key=lambda kv: -kv[1])

    @property
    def efficiency(self) -> float:
        """Fraction of the step spent computing: tokens/s over world × one rank's compute-only tokens/s."""
        return self.compute_s / self.step_s if self.step_s > 0 else 0.0

    @property
    def comm_bytes(self) -> dict[str, int]:
        return bytes_by_kind(self.collectives)

    @property
    def dim_bytes(self) -> dict[str, dict[str, int]]:
        return bytes_by_dim(self.collectives)


def layout_label(engine: str, dims: MeshDims) -> str:
    """An engine with its mesh: HSDP (FSDP2) / hpZ (ZeRO-3) when the base is sharded in groups, "replicated" when
    the groups are single ranks, tp=N."""
    out = engine
    if dims.hybrid:
        hybrid = "hpZ" if capabilities(engine).deepspeed_stage else "HSDP"
        out += f" {hybrid} {dims.dp_replicate}×{dims.dp_shard}"
    elif dims.dp_replicate > 1:  # shard groups of one rank: every data-parallel rank holds the whole (tp slice)
        out += f" replicated ×{dims.dp_replicate}"
    if dims.tp > 1:
        out += f" tp={dims.tp}"
    return out


def valid_engines(cfg: Config, world: int) -> list[str]:
    """The engines whose capabilities run `world` ranks over this job's base (registry order)."""
    return engines_for(world, cfg.quantization.mode)


def model_linear_numel(spec: ModelSpec) -> int:
    """Weights of every matmul a token goes through: all 2-D weights of the decoder blocks (adapted or not) and the
    output head (the tied embedding when there is no separate head); embedding lookups cost no FLOPs."""
    blocks = sum(p.numel for p in spec.params if p.block >= 0 and len(p.shape) == 2 and p.role in ("linear", "base"))
    head = sum(
        p.numel
        for p in spec.params
        if p.name.endswith("lm_head.weight") or p.name.endswith("lm_head.base_layer.weight")
    )
    return blocks + (head or spec.vocab * spec.hidden)


def flops_per_token(cfg: Config, spec: ModelSpec, tp: int = 1) -> float:
    """FLOPs per trained token of a micro-step (forward, backward, recomputation), the whole model's; under tensor
    parallelism one tp rank's: its slices of the split linears and adapters (plan/tp_layout.py), 1/tp of the
    attention (heads split), the whole replicated head."""
    head = model_linear_numel(spec) - sum(
        p.numel for p in spec.params if p.block >= 0 and len(p.shape) == 2 and p.role in ("linear", "base")
    )
    n_lin = head + sum(
        p.numel * tp_fraction(p, tp)
        for p in spec.params
        if p.block >= 0 and len(p.shape) == 2 and p.role in ("linear", "base")
    )
    n_adapted = sum(p.numel * tp_fraction(p, tp) for p in spec.select(roles=("linear",)))
    n_adapt = sum(p.numel * tp_fraction(p, tp) for p in spec.select(trainable=True))
    attn_fwd = 2 * cfg.data.seq_len * spec.hidden * spec.n_blocks / tp
    fwd = 2 * n_lin + 2 * n_adapt + attn_fwd
    bwd = 2 * n_lin + 4 * n_adapt + 2 * attn_fwd
    if cfg.dora.use_dora and cfg.dora.dropout > 0:
        fwd += 2 * n_adapted  # the base matmul on the dropped input
        bwd += 2 * n_adapted
    total = fwd + bwd + (fwd if cfg.training.gradient_checkpointing else 0)
    tokens = cfg.training.micro_batch_size * cfg.data.seq_len
    norm = 2 * cfg.dora.r * n_adapted / tokens if cfg.dora.use_dora else 0.0  # per micro-step, spread over its tokens
    return total + norm


def dequant_s_per_micro_step(cfg: Config, spec: ModelSpec, gpu, tp: int = 1) -> float:
    """bitsandbytes dequantizes each 4-bit linear before its matmul: 0.5 byte read + 2 written + 2 read back per
    weight, once per pass (forward, backward, recomputation; DoRA's W·Aᵀ one more), at the GPU's memory bandwidth."""
    if not four_bit(cfg):
        return 0.0
    passes = 2 + (1 if cfg.training.gradient_checkpointing else 0) + (1 if cfg.dora.use_dora else 0)
    n = sum(p.numel * tp_fraction(p, tp) for p in spec.params if not p.trainable and is_quantized(cfg, p))
    return passes * n * 4.5 / gpu.mem_bandwidth


def comm_time(collectives: list[Collective], cluster: Cluster, dims: MeshDims | None = None) -> tuple[float, float]:
    """(overlappable, not overlappable) seconds of communication per step: ring wire bytes / bandwidth + latency
    × calls, each collective on its mesh dimension's link (plan/links.py); overlappable only where the
    collective, the link and the backend allow it."""
    ov, no, _ = link_comm_time(collectives, cluster, dims)
    return ov, no


def project(
    cfg: Config,
    cluster: Cluster,
    engine: str | None = None,
    cpu_offload: bool | None = None,
    spec: ModelSpec | None = None,
    mfu: float | None = None,
    compute_s_per_token: float | None = None,
    loss: str | None = None,
    dims: MeshDims | None = None,
) -> Projection:
    """The projection of `cfg` on `cluster` with `engine` (default: the config's; auto resolved as the trainer).
    mfu: default the GPU preset's; loss: the loss implementation to size (memory.LOSS_STYLES, default ours);
    dims: the mesh (default: what the trainer would build from parallel.shard_group / parallel.tp on this
    cluster's node layout, `parallel.mesh.resolve_dims`, whose one-line errors it raises)."""
    cfg = copy.deepcopy(cfg)
    world = cluster.world
    engine = resolve_engine(engine or cfg.parallel.engine, world, cfg.quantization.mode)
    caps = capabilities(engine)
    if cpu_offload is not None:
        cfg.parallel.cpu_offload = cpu_offload
    configured = dims is None
    if dims is None:
        dims = (
            resolve_dims(cfg, world, cluster.gpus_per_node, engine)
            if caps.runs_on(world)
            else MeshDims(dp_shard=world, nodes=cluster.nodes)
        )
    cfg.parallel.tp, cfg.parallel.shard_group = dims.tp, dims.dp_shard
    spec = spec or model_spec(cfg)
    problem = model_split_problem(spec, dims.tp) if configured and dims.tp > 1 else None
    if problem:  # the trainer's preflight refuses it too (parallel/tp.py)
        raise ConfigError(f"parallel.{problem}")
    gas = grad_accum(cfg, dims.dp)
    tokens_rank = cfg.training.micro_batch_size * cfg.data.seq_len * gas
    if compute_s_per_token is not None:  # measured on one process: a tp rank does its share of those FLOPs
        share = flops_per_token(cfg, spec, dims.tp) / flops_per_token(cfg, spec) if dims.tp > 1 else 1.0
        compute = tokens_rank * compute_s_per_token * share
    else:
        mfu = mfu or cluster.gpu.mfu
        compute = tokens_rank * flops_per_token(cfg, spec, dims.tp) / (cluster.gpu.peak_flops * mfu)
        compute += gas * dequant_s_per_micro_step(cfg, spec, cluster.gpu, dims.tp)
    notes: list[str] = []
    try:
        colls = predict_collectives(cfg, spec, engine, world, dims)
        modelled = True
    except NotImplementedError as exc:  # a mesh whose engine branch has not landed its prediction yet
        colls, modelled = [], False
        notes.append(f"not projected: {exc}")
    ov, no, efficiency = link_comm_time(colls, cluster, dims)
    # overlap composition: the link hides at most overlap_efficiency of what compute could cover (hardware.py)
    exposed = ov - min(ov, compute) * efficiency + no
    mem = estimate_memory(cfg, spec, engine, world, loss, dims)
    offload = 0.0
    if cfg.parallel.cpu_offload and caps.offloads_params:
        gathers = 2 * gas
        offload = (gathers * mem.host.get("base", 0) + 2 * mem.host.get("adapters", 0)) / HOST_LINK_BYTES_PER_S
    elif cfg.parallel.cpu_offload and caps.cpu_offload:
        offload = 2 * spec.numel(trainable=True) * 4 / world / HOST_LINK_BYTES_PER_S
    outside = cluster.gpu.reserved_bytes + (NCCL_BYTES if world > 1 else 0.0)
    need = mem.device_total * (1 + MIN_FRAGMENTATION) + outside
    # what max_memory_reserved reports: the cache grows to the overhead where there is room, is trimmed at the card
    reserved = max(
        mem.device_total * (1 + MIN_FRAGMENTATION),
        min(mem.device_total * (1 + ALLOCATOR_OVERHEAD), cluster.gpu.memory_bytes - outside),
    )
    have = cluster.gpu.memory_bytes
    host_have = cluster.gpu.host_memory_per_gpu
    proj = Projection(
        engine,
        bool(cfg.parallel.cpu_offload),
        world,
        mem,
        colls,
        compute,
        ov + no,
        exposed,
        offload,
        tokens_rank * dims.dp,
        need <= have and mem.host_total <= host_have,
        need,
        have,
        host_fits=mem.host_total <= host_have,
        notes=notes,
        reserved_bytes=reserved,
        outside_bytes=outside,
        dims=dims,
        link_bytes=bytes_by_link(colls, cluster, dims),
        comm_modelled=modelled,
    )
    if engine not in valid_engines(cfg, world):
        proj.fits = False
        proj.runnable = False
        why = (
            "it runs one process"
            if caps.max_world == 1
            else "the trainer refuses this base with it (see README: engines)"
            if world > 1
            else "it needs several ranks"
        )
        proj.notes.append(f"parallel.engine={engine} cannot run this job on {world} rank(s): {why}")
    if not proj.host_fits:
        proj.notes.append(
            f"CPU offload needs {mem.host_total / GiB:.1f} GiB of host memory per GPU, the preset has "
            f"{host_have / GiB:.0f} GiB"
        )
    return proj


def __getattr__(name: str):
    """`candidates`, `layouts` and `recommend` live in plan/choose.py; still importable from here."""
    if name in ("candidates", "layouts", "recommend", "layout_reason"):
        from dora_dist.plan import choose

        return getattr(choose, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
