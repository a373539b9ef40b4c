"""Step time, throughput, fit and the engine recommendation for a job on a cluster.

step time = compute + the communication that does not overlap with it (+ host↔device traffic under CPU offload):

- compute: model FLOPs per token at a given MFU of the GPU's peak (default 0.4), or a measured time per token
  (`compute_s_per_token`, what benchmarks/scaling.py calibrates from its one-process run). With a frozen base a
  linear costs 2·N per token forward and 2·N backward (input gradients only, no weight gradients), 4·N in all; the
  adapters 6·N_adapter; causal attention 2·S·h per layer and token forward, twice that backward; gradient
  checkpointing repeats the forward; DoRA's weight norm adds 2·r·N_linear per micro-step (W·Aᵀ).
- communication: each collective of `comm.predict_collectives` costs its ring wire bytes / bandwidth + latency ×
  calls on the slowest link it crosses (NVLink/PCIe within a node, InfiniBand/Ethernet across nodes). Under nccl,
  prefetched all-gathers and bucketed gradient reductions overlap with compute; the rest (the first gather,
  step-time scalars, DeepSpeed's post-step gathers) do not. Under gloo (`--gpu cpu`) nothing does: the trainer
  waits for each collective where it is issued (measured over a shaped link, benchmarks/emulated_nodes.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from dora_dist.plan.comm import Collective, bytes_by_kind, four_bit, grad_accum, predict_collectives, wire_bytes
from dora_dist.plan.hardware import BACKEND_OVERLAPS, GB, Cluster
from dora_dist.plan.memory import MemoryEstimate, estimate_memory
from dora_dist.plan.model_spec import ModelSpec, model_spec

HOST_LINK_BYTES_PER_S = 20 * GB  # PCIe between host and GPU, for CPU offload traffic


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

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s + self.offload_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s if self.step_s > 0 else 0.0

    @property
    def efficiency(self) -> float:
        """Fraction of the step spent computing: tokens/s over world × one rank's compute-only tokens/s."""
        return self.compute_s / self.step_s if self.step_s > 0 else 0.0

    @property
    def comm_bytes(self) -> dict[str, int]:
        return bytes_by_kind(self.collectives)


def valid_engines(cfg, world: int) -> list[str]:
    if world <= 1:
        return ["none"]
    if four_bit(cfg):
        return ["ddp", "zero2", "fsdp2"]
    if cfg.quantization.mode == "int8":
        return ["ddp", "zero2"]
    return ["ddp", "fsdp2", "zero2", "zero3"]


def flops_per_token(cfg, spec: ModelSpec) -> float:
    n_lin = spec.numel(roles=("linear",))
    n_head = sum(p.numel for p in spec.params if p.name.endswith("lm_head.weight")) or spec.vocab * spec.hidden
    n_adapt = spec.numel(trainable=True)
    attn_fwd = 2 * cfg.data.seq_len * spec.hidden * spec.n_blocks
    fwd = 2 * (n_lin + n_head) + 2 * n_adapt + attn_fwd
    bwd = 2 * (n_lin + n_head) + 4 * n_adapt + 2 * attn_fwd
    total = fwd + bwd + (fwd if cfg.training.gradient_checkpointing else 0)
    tokens = cfg.training.micro_batch_size * cfg.data.seq_len
    norm = 2 * cfg.dora.r * n_lin / tokens if cfg.dora.use_dora else 0.0  # per micro-step, spread over its tokens
    return total + norm


def comm_time(collectives: list[Collective], cluster: Cluster) -> tuple[float, float]:
    """(overlappable, not overlappable) seconds of communication per step: ring wire bytes / bandwidth + latency
    × calls on the slowest link; overlappable only where the collective, the link and the backend allow it."""
    link = cluster.link
    overlaps = link.overlaps and BACKEND_OVERLAPS[cluster.backend]
    ov = no = 0.0
    for c in collectives:
        t = wire_bytes(c, cluster.world) / link.bandwidth + link.latency_s * c.calls
        if c.overlap and overlaps:
            ov += t
        else:
            no += t
    return ov, no


def project(
    cfg,
    cluster: Cluster,
    engine: str | None = None,
    cpu_offload: bool | None = None,
    spec: ModelSpec | None = None,
    mfu: float = 0.4,
    compute_s_per_token: float | None = None,
) -> Projection:
    """The projection of `cfg` on `cluster` with `engine` (default: the config's; auto resolved as the trainer)."""
    cfg = copy.deepcopy(cfg)
    world = cluster.world
    engine = engine or cfg.parallel.engine
    if engine == "auto":
        engine = "none" if world <= 1 else ("ddp" if cfg.quantization.mode != "none" else "fsdp2")
    if cpu_offload is not None:
        cfg.parallel.cpu_offload = cpu_offload
    spec = spec or model_spec(cfg)
    gas = grad_accum(cfg, world)
    tokens_rank = cfg.training.micro_batch_size * cfg.data.seq_len * gas
    if compute_s_per_token is not None:
        compute = tokens_rank * compute_s_per_token
    else:
        compute = tokens_rank * flops_per_token(cfg, spec) / (cluster.gpu.peak_flops * mfu)
    colls = predict_collectives(cfg, spec, engine, world)
    ov, no = comm_time(colls, cluster)
    exposed = max(0.0, ov - compute) + no
    mem = estimate_memory(cfg, spec, engine, world)
    offload = 0.0
    if cfg.parallel.cpu_offload and engine in ("fsdp2", "zero3"):
        gathers = 2 * gas
        offload = (gathers * mem.host.get("base", 0) + 2 * mem.host.get("adapters", 0)) / HOST_LINK_BYTES_PER_S
    elif cfg.parallel.cpu_offload and engine == "zero2":
        offload = 2 * spec.numel(trainable=True) * 4 / world / HOST_LINK_BYTES_PER_S
    need = mem.device_total + cluster.gpu.reserved_bytes
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
        tokens_rank * world,
        need <= have and mem.host_total <= host_have,
        need,
        have,
        host_fits=mem.host_total <= host_have,
    )
    if engine not in valid_engines(cfg, world):
        proj.fits = False
        proj.runnable = False
        why = (
            "it runs one process"
            if engine == "none"
            else "the trainer refuses this base with it (see README: engines)"
            if world > 1
            else "it needs several ranks"
        )
        proj.notes.append(f"parallel.engine={engine} cannot run this job on {world} rank(s): {why}")
    if not proj.host_fits:
        proj.notes.append(
            f"CPU offload needs {mem.host_total / GB:.1f} GB of host memory per GPU, the preset has "
            f"{host_have / GB:.0f} GB"
        )
    return proj


def candidates(cfg, cluster: Cluster, spec: ModelSpec, **kw) -> list[Projection]:
    """Every engine (and CPU offload where the engine has it) this job could run with on `cluster`."""
    out = []
    for engine in valid_engines(cfg, cluster.world):
        for off in (False, True) if engine in ("fsdp2", "zero2", "zero3") else (False,):
            out.append(project(cfg, cluster, engine, off, spec, **kw))
    return out


def recommend(projs: list[Projection]) -> tuple[Projection | None, str]:
    """The fastest projection that fits, and a sentence saying why."""
    fitting = [p for p in projs if p.fits]
    if not fitting:
        best = min(projs, key=lambda p: p.need_bytes)
        reason = (
            f"needs {best.need_bytes / GB:.1f} GB per GPU, has {best.have_bytes / GB:.0f} GB"
            if best.need_bytes > best.have_bytes
            else "; ".join(best.notes)
        )
        return None, (
            f"does not fit with any engine; the closest, {best.engine}"
            f"{' + CPU offload' if best.cpu_offload else ''}, {reason}. Use more GPUs, a 4-bit base, "
            "gradient checkpointing or a smaller micro-batch / sequence"
        )
    best = max(fitting, key=lambda p: (p.tokens_per_s, -p.need_bytes))
    moved = sum(best.comm_bytes.values())
    why = (
        f"{best.engine}{' + CPU offload' if best.cpu_offload else ''}: fits ({best.need_bytes / GB:.1f} of "
        f"{best.have_bytes / GB:.0f} GB), {moved / 2**20:,.1f} MiB of collectives per step "
        f"({best.exposed_comm_s * 1e3:.1f} ms not hidden behind {best.compute_s * 1e3:.0f} ms of compute), "
        f"{best.tokens_per_s:,.0f} tokens/s"
    )
    others = [p for p in fitting if p is not best]
    if others:
        runner = max(others, key=lambda p: p.tokens_per_s)
        why += (
            f"; next: {runner.engine}{' + offload' if runner.cpu_offload else ''} at "
            f"{runner.tokens_per_s:,.0f} tokens/s ({sum(runner.comm_bytes.values()) / 2**20:,.1f} MiB per step)"
        )
    unfit = sorted({p.engine for p in projs if not p.fits} - {p.engine for p in fitting})
    if unfit:
        why += f"; engines that do not fit: {', '.join(unfit)}"
    return best, why
