"""GPU and interconnect presets for the projection model (`dora-dist plan --gpu ... --interconnect ...`).

Numbers are vendor figures (dense bf16 tensor-core FLOP/s with fp32 accumulation, memory bandwidth, and memory in
GiB: a "24 GB" card holds 24 GiB = 25.77e9 bytes, which is what `torch.cuda.get_device_properties().total_memory`
reports less a few hundred MiB the driver keeps), and typical *achieved* collective bus bandwidths per GPU (what
NCCL's busbw reports on such links, below the link's line rate). The per-GPU `mfu` defaults are derived from
published runs (benchmarks/published/, the ones marked `fit: true`; see plan/FACTS.md), not from the points the
calibration test holds out. They are presets to start from: pass `--bandwidth-gbps` / `--latency-us` / `--mfu` to
use your own measurements.
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
    #: memory outside PyTorch's caching allocator: the CUDA context with its kernel images (lazy loading, CUDA ≥
    #: 11.7) and cuBLAS/NCCL host-side state; NCCL's own buffers are added per communicator in project.py
    reserved_bytes: float = 0.5 * GiB
    mem_bandwidth: float = 1e12  # bytes/s, vendor peak (bitsandbytes dequantization is bound by it)
    #: achieved fraction of peak_flops on a frozen-base LoRA/DoRA step (matmuls, attention, elementwise), derived
    #: from the cited published runs named in the preset's comment (benchmarks/published, `fit: true`)
    mfu: float = 0.45


@dataclass(frozen=True)
class Interconnect:
    name: str
    bandwidth: float  # achieved bus bandwidth per GPU, bytes/s
    latency_s: float  # per collective call
    #: whether the link lets collectives run alongside compute (loopback: gloo's copies use the compute's cores);
    #: whether the *backend* does is `BACKEND_OVERLAPS`, and both must hold
    overlaps: bool = True
    #: fraction of the overlappable collective time that compute actually hides (1: all of it). Below 1 where
    #: the copy engines share a path with compute traffic: GeForce cards without P2P stage every collective
    #: through host memory over PCIe, which the CPU side of the step also uses. Derived from Answer.AI's 2 x 4090
    #: runs (full x16 lanes): Llama-2-7B LoRA FSDP batch 6 x 2048 took 481 s (5.64 s a step), where the MFU derived
    #: from the DDP run gives 5.08 s of compute: 0.56 s of the predicted 0.69 s of all-gathers were not hidden
    #: (plan/FACTS.md)
    overlap_efficiency: float = 1.0
    #: one such link per GPU (InfiniBand: a NIC per GPU; NVLink) or one per node shared by its GPUs (100 GbE): on a
    #: per-node link the groups that cross nodes at the same time share its bandwidth (plan/links.py)
    per_gpu: bool = True


#: MFU for a GPU no cited run covers (and whose die and peak no covered GPU shares): the median of the derived ones
FALLBACK_MFU = 0.60

#: Whether a backend's collectives overlap with compute. nccl: yes, they run on their own CUDA stream while the
#: compute stream goes on (FSDP2's prefetched all-gathers, DDP's bucketed all-reduces during backward). gloo on the
#: CPU: no, measured over a shaped link (benchmarks/emulated_nodes.py): the step time is compute + communication,
#: the trainer waits on each collective where it is issued (FSDP2 unshards a block just before using it, DDP's
#: gradients fit its first bucket and are reduced after the backward).
BACKEND_OVERLAPS = {"nccl": True, "gloo": False}


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        # H200: the H100's die (GH100) and peak, so the H100's derived MFU
        GPU("h200-141gb", 141 * GiB, 989e12, "nvlink", 256 * GiB, mem_bandwidth=4.8e12, mfu=0.35),
        # mfu 0.35: Answer.AI, Llama-2-70B QLoRA FSDP, batch 8 x 2048, 4 x H100 SXM: 667 s for 1,024 samples
        GPU("h100-80gb", 80 * GiB, 989e12, "nvlink", 256 * GiB, mem_bandwidth=3.35e12, mfu=0.35),
        # mfu 0.60: torchtune README, Llama-3.1-70B LoRA (q,k,v r16) FSDP on 8 x A100, 3,497 tokens/s
        GPU("a100-80gb", 80 * GiB, 312e12, "nvlink", 256 * GiB, mem_bandwidth=2.04e12, mfu=0.60),
        GPU("a100-40gb", 40 * GiB, 312e12, "nvlink", 128 * GiB, mem_bandwidth=1.56e12, mfu=0.60),
        # mfu 0.24: peft method_comparison, Llama-3.2-3B LoRA r32 q,v, batch 4, one L40S, 6,770 tokens/s
        GPU("l40s-48gb", 48 * GiB, 362e12, "pcie", 128 * GiB, mem_bandwidth=0.864e12, mfu=0.24),
        GPU("a6000-48gb", 48 * GiB, 155e12, "pcie", 64 * GiB, mem_bandwidth=0.768e12, mfu=FALLBACK_MFU),
        # RTX 6000 Ada: the L40S's die (AD102) and peak, so the L40S's derived MFU
        GPU("rtx6000ada-48gb", 48 * GiB, 364e12, "pcie", 128 * GiB, mem_bandwidth=0.96e12, mfu=0.24),
        # mfu 0.63: Answer.AI, Llama-2-7B LoRA DDP, batch 4 x 2048, 2 x 4090: 437 s for 1,024 samples
        GPU("rtx4090-24gb", 24 * GiB, 165e12, "pcie", 64 * GiB, mem_bandwidth=1.008e12, mfu=0.63),
        # mfu 0.72: Answer.AI, Llama-2-7B LoRA DDP, batch 4 x 2048, 2 x 3090 at 280 W: 881 s for 1,024 samples
        # (the 3090's 71 TFLOP/s is GeForce's half-rate fp32-accumulate peak)
        GPU("rtx3090-24gb", 24 * GiB, 71e12, "pcie", 64 * GiB, mem_bandwidth=0.936e12, mfu=0.72),
        GPU("a5000-24gb", 24 * GiB, 111e12, "pcie", 64 * GiB, mem_bandwidth=0.768e12, mfu=FALLBACK_MFU),
        GPU("a10-24gb", 24 * GiB, 125e12, "pcie", 64 * GiB, mem_bandwidth=0.6e12, mfu=FALLBACK_MFU),
        GPU("cpu", 64 * GiB, 0.2e12, "loopback", 64 * GiB, reserved_bytes=0.0, mem_bandwidth=0.05e12, mfu=0.4),
    )
}

INTERCONNECTS: dict[str, Interconnect] = {
    i.name: i
    for i in (
        Interconnect("nvlink", 360 * GB, 10e-6),  # NVLink 4 (H100 SXM), NCCL busbw
        Interconnect("pcie", 20 * GB, 15e-6, overlap_efficiency=0.2),  # PCIe 4.0 x16 through the host
        Interconnect("infiniband", 45 * GB, 20e-6),  # 400 Gb/s NDR, one NIC per GPU
        Interconnect("ethernet", 10 * GB, 50e-6, per_gpu=False),  # 100 GbE per node, no RDMA
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
