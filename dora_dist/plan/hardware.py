"""GPU and interconnect presets for the projection model (`dora-dist plan --gpu ... --interconnect ...`).

Numbers are vendor peak figures (dense bf16 tensor-core FLOP/s, memory) and typical *achieved* collective bus
bandwidths per GPU (what NCCL's busbw reports on such links, below the link's line rate). They are presets to start
from: pass `--bandwidth-gbps` / `--latency-us` / `--mfu` to use your own measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dora_dist.errors import ConfigError

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float  # device memory
    peak_flops: float  # dense bf16 FLOP/s
    intra_node: str  # default interconnect between the GPUs of one node
    host_memory_per_gpu: float  # typical CPU RAM per GPU in such a node (CPU offload lands there)
    reserved_bytes: float = 1.5 * GiB  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class Interconnect:
    name: str
    bandwidth: float  # achieved bus bandwidth per GPU, bytes/s
    latency_s: float  # per collective call
    #: whether the link lets collectives run alongside compute (loopback: gloo's copies use the compute's cores);
    #: whether the *backend* does is `BACKEND_OVERLAPS`, and both must hold
    overlaps: bool = True


#: Whether a backend's collectives overlap with compute. nccl: yes, they run on their own CUDA stream while the
#: compute stream goes on (FSDP2's prefetched all-gathers, DDP's bucketed all-reduces during backward). gloo on the
#: CPU: no, measured over a shaped link (benchmarks/emulated_nodes.py): the step time is compute + communication,
#: the trainer waits on each collective where it is issued (FSDP2 unshards a block just before using it, DDP's
#: gradients fit its first bucket and are reduced after the backward).
BACKEND_OVERLAPS = {"nccl": True, "gloo": False}


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("h200-141gb", 141 * GB, 989e12, "nvlink", 256 * GB),
        GPU("h100-80gb", 80 * GB, 989e12, "nvlink", 256 * GB),
        GPU("a100-80gb", 80 * GB, 312e12, "nvlink", 256 * GB),
        GPU("a100-40gb", 40 * GB, 312e12, "nvlink", 128 * GB),
        GPU("l40s-48gb", 48 * GB, 362e12, "pcie", 128 * GB),
        GPU("a6000-48gb", 48 * GB, 155e12, "pcie", 64 * GB),
        GPU("rtx4090-24gb", 24 * GB, 165e12, "pcie", 64 * GB),
        GPU("rtx3090-24gb", 24 * GB, 71e12, "pcie", 64 * GB),
        GPU("a10-24gb", 24 * GB, 125e12, "pcie", 64 * GB),
        GPU("cpu", 64 * GB, 0.2e12, "loopback", 64 * GB, reserved_bytes=0.0),
    )
}

INTERCONNECTS: dict[str, Interconnect] = {
    i.name: i
    for i in (
        Interconnect("nvlink", 360 * GB, 10e-6),  # NVLink 4 (H100 SXM), NCCL busbw
        Interconnect("pcie", 20 * GB, 15e-6),  # PCIe 4.0 x16 through the host
        Interconnect("infiniband", 45 * GB, 20e-6),  # 400 Gb/s NDR, one NIC per GPU
        Interconnect("ethernet", 10 * GB, 50e-6),  # 100 GbE per node, no RDMA
        Interconnect("loopback", 1.5 * GB, 60e-6, overlaps=False),  # gloo over 127.0.0.1 (the CPU benchmarks)
    )
}


def get_gpu(name: str) -> GPU:
    try:
        return GPUS[name]
    except KeyError:
        raise ConfigError(f"--gpu: unknown GPU {name!r}; presets: {', '.join(GPUS)}") from None


def get_interconnect(name: str, bandwidth_gbps: float | None = None, latency_us: float | None = None) -> Interconnect:
    """A preset, optionally with a user-measured bandwidth (GB/s) and/or latency (µs)."""
    if name not in INTERCONNECTS:
        raise ConfigError(f"unknown interconnect {name!r}; presets: {', '.join(INTERCONNECTS)}")
    ic = INTERCONNECTS[name]
    if bandwidth_gbps is not None:
        ic = replace(ic, bandwidth=bandwidth_gbps * GB, name=f"{name}@{bandwidth_gbps:g}GB/s")
    if latency_us is not None:
        ic = replace(ic, latency_s=latency_us * 1e-6)
    return ic


@dataclass(frozen=True)
class Cluster:
    """nodes × gpus_per_node GPUs; collectives spanning nodes run at the inter-node link's speed."""

    gpu: GPU
    nodes: int
    gpus_per_node: int
    intra: Interconnect
    inter: Interconnect

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def backend(self) -> str:
        """The process-group backend the trainer uses on this hardware: gloo on CPUs, nccl on GPUs."""
        return "gloo" if self.gpu.name == "cpu" else "nccl"

    @property
    def link(self) -> Interconnect:
        """The slowest link a world-wide ring crosses."""
        return self.inter if self.nodes > 1 else self.intra

    def with_size(self, nodes: int, gpus_per_node: int) -> Cluster:
        return replace(self, nodes=nodes, gpus_per_node=gpus_per_node)


def make_cluster(
    gpu: str,
    nodes: int,
    gpus_per_node: int,
    interconnect: str | None = None,
    inter_node: str = "infiniband",
    bandwidth_gbps: float | None = None,
    latency_us: float | None = None,
) -> Cluster:
    g = get_gpu(gpu)
    intra = get_interconnect(
        interconnect or g.intra_node, bandwidth_gbps if nodes == 1 else None, latency_us if nodes == 1 else None
    )
    inter = get_interconnect(inter_node, bandwidth_gbps if nodes > 1 else None, latency_us if nodes > 1 else None)
    return Cluster(g, nodes, gpus_per_node, intra, inter)
