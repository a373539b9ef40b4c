"""`dora-dist plan`: per-rank memory by component, fit, projected tokens/s, scaling efficiency, recommendation.

    dora-dist plan --config configs/llama3.1-8b-fsdp2-8gpu.yaml --nodes 1 --gpus-per-node 8 --gpu h100-80gb
    dora-dist plan --config configs/llama3.1-70b-qdora-fsdp2-2nodes.yaml --nodes 1 --gpus-per-node 2 \
        --gpu rtx4090-24gb parallel.cpu_offload=true data.seq_len=512

    dora-dist plan --config configs/llama3.1-8b-qdora-1gpu.yaml --gpu rtx4090-24gb --sweep seq_len

Nothing is downloaded or loaded: the model is built on the meta device from its config. A job that does not fit is
reported ("does not fit: needs X, has Y"), with the engines that would. Memory is in GiB (2^30 bytes, the unit the
cards' sizes are in). `--sweep seq_len|micro_batch|r` prints, per engine, the largest value that fits.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dora_dist.parallel import capabilities
from dora_dist.parallel.mesh import MeshDims
from dora_dist.plan.choose import candidates, recommend
from dora_dist.plan.hardware import GPUS, INTERCONNECTS, GiB, make_cluster
from dora_dist.plan.project import MFU_SPREAD, Projection, project

if TYPE_CHECKING:
    from dora_dist.config import Config
    from dora_dist.plan.hardware import Cluster

COMPONENTS = ("base", "adapters", "grads", "optimizer", "gathered", "secondary", "activations", "logits")
SWEEPS = ("seq_len", "micro_batch", "r")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the built-in quickstart)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (ranks) per node (default: %(default)s)")
    p.add_argument(
        "--gpu",
        default="h100-80gb",
        choices=sorted(GPUS),
        metavar="GPU",
        help=f"GPU preset, one of {', '.join(sorted(GPUS))} (default: %(default)s)",
    )
    p.add_argument(
        "--interconnect",
        default=None,
        choices=sorted(INTERCONNECTS),
        help="between the GPUs of a node (default: the GPU's usual one)",
    )
    p.add_argument(
        "--inter-node", default="infiniband", choices=sorted(INTERCONNECTS), help="between nodes (default: %(default)s)"
    )
    p.add_argument(
        "--bandwidth-gbps",
        type=float,
        default=None,
        help="your measured bus bandwidth, GB/s per GPU, "
        "for the slowest link the job crosses (default: the interconnect preset's)",
    )
    p.add_argument(
        "--latency-us", type=float, default=None, help="per-collective latency, µs (default: the interconnect preset's)"
    )
    p.add_argument(
        "--mfu",
        type=float,
        default=None,
        help="model FLOPs utilisation assumed for compute, in (0, 1] (default: the GPU preset's, derived from "
        "published runs)",
    )
    p.add_argument(
        "--sweep",
        choices=SWEEPS,
        default=None,
        help="print, per engine, the largest data.seq_len / training.micro_batch_size / dora.r that fits",
    )
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.cpu_offload=true")


def check_arguments(args, cfg: Config) -> None:
    """The cluster flags, and the job's batch split on that cluster by the trainer's own rule (Batching): what
    training would refuse, plan refuses too."""
    from dora_dist.batching import Batching
    from dora_dist.errors import ConfigError

    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1] (a fraction of the GPU's peak FLOPs), got {args.mfu}")
    if args.bandwidth_gbps is not None and not args.bandwidth_gbps > 0:
        raise ConfigError(f"--bandwidth-gbps must be > 0, got {args.bandwidth_gbps}")
    if args.latency_us is not None and not args.latency_us >= 0:
        raise ConfigError(f"--latency-us must be >= 0, got {args.latency_us}")
    world = args.nodes * args.gpus_per_node
    tp = cfg.parallel.tp
    # the batch is split over the data-parallel ranks: a tp group shares its micro-batches
    Batching.accumulation(cfg.training, world // tp if tp > 0 and world % tp == 0 else world)


def _gb(x: float) -> str:
    return f"{x / GiB:8.2f}"


def _line(p: Projection, nodes: int) -> str:
    moved = sum(p.comm_bytes.values())
    fit = "yes" if p.fits else "no"
    inter = f" {p.link_bytes.get('inter_node', 0) / 2**20:>12,.1f}" if nodes > 1 else ""
    return (
        f"  {p.label:<24} {p.need_bytes / GiB:>9.2f} {fit:>5} "
        f"{moved / 2**20:>12,.1f}{inter} {p.step_s:>9.3f} {p.tokens_per_s:>12,.0f} {100 * p.efficiency:>6.1f}%"
    )


def run(args) -> int:
    from dora_dist.config import load_job_config
    from dora_dist.plan.model_spec import model_spec

    cfg = load_job_config(args.config, args.overrides)
    check_arguments(args, cfg)
    cluster = make_cluster(
        args.gpu,
        args.nodes,
        args.gpus_per_node,
        args.interconnect,
        args.inter_node,
        args.bandwidth_gbps,
        args.latency_us,
    )
    spec = model_spec(cfg)
    kw = {"mfu": args.mfu}
    if getattr(args, "sweep", None):
        return print_sweep(cfg, cluster, args.sweep, kw)
    job = project(cfg, cluster, spec=spec, **kw)
    print(
        f"plan: {cfg.model.name_or_path} ({spec.numel(trainable=False) / 1e9:.2f} B frozen, "
        f"{spec.numel(trainable=True) / 1e6:.1f} M trainable), quantization={cfg.quantization.mode}, "
        f"precision={cfg.training.precision}, gradient_checkpointing={cfg.training.gradient_checkpointing}, "
        f"micro-batch {cfg.training.micro_batch_size} × seq {cfg.data.seq_len}"
    )
    print(
        f"cluster: {cluster.nodes} node(s) × {cluster.gpus_per_node} {cluster.gpu.name} "
        f"({cluster.gpu.memory_bytes / GiB:.0f} GiB), within a node {cluster.intra.name}"
        + (f", between nodes {cluster.inter.name}" if cluster.nodes > 1 else "")
    )
    print(
        f"\nconfigured engine: {job.engine}{' + CPU offload' if job.cpu_offload else ''} on {job.world} rank(s)"
        + (f", mesh {job.dims.describe()} ({job.label})" if job.dims.hybrid or job.dims.tp > 1 else "")
        + "; memory per rank (GiB):"
    )
    for comp in COMPONENTS:
        dev, host = job.memory.device.get(comp), job.memory.host.get(comp)
        if dev is None and host is None:
            continue
        print(f"  {comp:<12} {_gb(dev or 0)}" + (f"   (+{(host or 0) / GiB:.2f} GiB in host memory)" if host else ""))
    floor = job.need_bytes - job.outside_bytes - job.memory.device_total
    print(f"  {'allocator':<12} {_gb(floor)}   (fragmentation the caching allocator cannot release)")
    outside = job.outside_bytes
    print(f"  {'outside':<12} {_gb(outside)}   (CUDA context{', NCCL buffers' if job.world > 1 else ''})")
    print(f"  {'total':<12} {_gb(job.need_bytes)}   of {cluster.gpu.memory_bytes / GiB:.0f} GiB")
    print(f"  (torch.cuda.max_memory_reserved would show about {job.reserved_bytes / GiB:.2f} GiB: the cache grows)")
    for note in (n for n in job.notes if n.startswith("not projected")):
        print(f"  {note} (time and collectives left out)")
    if not job.runnable:
        print(f"  cannot run: {'; '.join(job.notes)}")
    elif job.fits:
        print("  fits")
    else:
        reason = f"needs {job.need_bytes / GiB:.1f} GiB per GPU, has {job.have_bytes / GiB:.0f} GiB"
        if not job.host_fits:
            reason = "; ".join(job.notes)
        print(f"  does not fit: {reason}")
    compute_only = "" if job.comm_modelled else " (compute only: this mesh's communication is not modelled yet)"
    print(
        f"  projected{compute_only}: {job.tokens_per_s:,.0f} tokens/s, step {job.step_s:.3f} s "
        f"(compute {job.compute_s:.3f} s, "
        f"exposed communication {job.exposed_comm_s:.3f} s, offload {job.offload_s:.3f} s), "
        f"scaling efficiency {100 * job.efficiency:.1f}%"
    )
    lo, hi = job.tokens_per_s_range
    top = ", ".join(f"{k} {100 * share:.0f}%" for k, share in job.dominant_memory[:3])
    print(
        f"  uncertainty: {lo:,.0f} to {hi:,.0f} tokens/s (MFU ± {100 * MFU_SPREAD:.0f}% of the preset's "
        f"{args.mfu or cluster.gpu.mfu:.2f}); memory is dominated by {top} (the model's errors against "
        "published runs: README, Scaling)"
    )
    if cluster.nodes > 1:
        # the same engine and tp on one node, data-parallel flat over its GPUs
        flat = MeshDims(dp_shard=cluster.gpus_per_node // job.dims.tp, tp=job.dims.tp)
        one = project(
            cfg, cluster.with_size(1, cluster.gpus_per_node), job.engine, job.cpu_offload, spec, dims=flat, **kw
        )
        eff = job.tokens_per_s / (cluster.nodes * one.tokens_per_s) if one.tokens_per_s else 0.0
        print(f"  against one node: {eff * 100:.1f}% ({one.tokens_per_s:,.0f} tokens/s on 1 node × {cluster.nodes})")
    kinds = {k: v for k, v in job.comm_bytes.items() if v}
    if kinds:
        print("  collectives per step: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in kinds.items()))
        if job.dims.hybrid or job.dims.tp > 1:
            dims = job.dim_bytes
            print(
                "  per mesh dimension: "
                + "; ".join(f"{d} {sum(b.values()) / 2**20:,.1f} MiB" for d, b in dims.items() if sum(b.values()))
            )
        print(
            f"  per link: inside a node {job.link_bytes.get('intra_node', 0) / 2**20:,.1f} MiB"
            + (f", between nodes {job.link_bytes.get('inter_node', 0) / 2**20:,.1f} MiB" if cluster.nodes > 1 else "")
            + " per rank and step"
        )

    projs = candidates(cfg, cluster, spec, **kw)
    inter = f" {'inter-node':>12}" if cluster.nodes > 1 else ""
    print(
        f"\nengines on this cluster:\n  {'engine':<24} {'GiB/rank':>9} {'fits':>5} {'MiB/step':>12}{inter} "
        f"{'step s':>9} {'tokens/s':>12} {'eff':>7}"
    )
    for p in projs:
        print(_line(p, cluster.nodes))
    best, why = recommend(projs, cluster)
    print(f"\nrecommended: {why}" if best else f"\n{why}")
    return 0


def largest_fitting(
    cfg: Config, cluster: Cluster, engine: str, offload: bool, knob: str, spec_for, kw: dict
) -> int | None:
    """The largest value of `knob` with which `engine` fits (binary search over powers of two, then the gap);
    None if even the smallest does not fit."""
    import copy

    def fits(value: int) -> bool:
        c = copy.deepcopy(cfg)
        if knob == "seq_len":
            c.data.seq_len = value
        elif knob == "micro_batch":
            c.training.micro_batch_size = value
            c.training.global_batch_size = 0
        else:
            c.dora.r = value
        return project(c, cluster, engine, offload, spec_for(c), **kw).fits

    lo = 8 if knob == "seq_len" else 1
    if not fits(lo):
        return None
    hi = lo
    limit = {"seq_len": 1 << 22, "micro_batch": 1 << 12, "r": 1 << 12}[knob]
    while hi < limit and fits(hi * 2):
        hi *= 2
    if hi >= limit:
        return hi
    step_lo, step_hi = hi, hi * 2  # fits(step_lo), not fits(step_hi)
    quantum = 8 if knob == "seq_len" else 1
    while step_hi - step_lo > quantum:
        mid = (step_lo + step_hi) // 2 // quantum * quantum
        if mid <= step_lo:
            break
        step_lo, step_hi = (mid, step_hi) if fits(mid) else (step_lo, mid)
    return step_lo


def print_sweep(cfg: Config, cluster: Cluster, knob: str, kw: dict) -> int:
    """`plan --sweep`: per engine (and CPU offload), the largest seq_len / micro_batch / r that fits."""
    from dora_dist.plan.model_spec import model_spec
    from dora_dist.plan.project import valid_engines

    spec = model_spec(cfg)

    def spec_for(c):
        return model_spec(c) if knob == "r" else spec

    cur = {"seq_len": cfg.data.seq_len, "micro_batch": cfg.training.micro_batch_size, "r": cfg.dora.r}[knob]
    print(
        f"sweep {knob} (now {cur}): {cfg.model.name_or_path} on {cluster.world} × {cluster.gpu.name} "
        f"({cluster.gpu.memory_bytes / GiB:.0f} GiB); largest value that fits, per engine:"
    )
    for engine in valid_engines(cfg, cluster.world):
        for off in (False, True) if capabilities(engine).cpu_offload else (False,):
            best = largest_fitting(cfg, cluster, engine, off, knob, spec_for, kw)
            name = engine + (" +offload" if off else "")
            print(f"  {name:<15} " + (f"{best:,}" if best is not None else "does not fit at the smallest value"))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dora-dist plan", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))
