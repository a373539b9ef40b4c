"""Which link each collective crosses, and what it costs there: the mesh dimensions of parallel/mesh.py laid on
a cluster of nodes × GPUs per node.

torchrun numbers ranks node by node and the mesh is row-major with tp innermost, then dp_shard, then dp_replicate,
so a group of one dimension is `size` ranks spaced `stride` apart:

    tp            size tp            stride 1
    dp_shard      size dp_shard      stride tp
    dp_replicate  size dp_replicate  stride tp · dp_shard
    dp (flat)     size dp            stride tp

A group spans size · stride consecutive ranks, so it stays inside one node when size · stride ≤ GPUs per node
(dp_shard · tp ≤ GPUs per node for a shard group) and crosses nodes otherwise (dp_replicate and a flat dp on
several nodes). A crossing group runs at the inter-node link's bus bandwidth (the preset, as a flat ring over
the nodes achieves it). Where that link is one per node (`Interconnect.per_gpu` false: 100 GbE) the groups of one
dimension that cross at the same time share it: a group with k of its ranks on a node shares the node's link with
the node's GPUs / k − 1 other groups (HSDP's replicate groups, one rank per node each: 8 groups on 8 GPUs), so
each gets k / GPUs per node of it. Over one NIC per GPU (InfiniBand presets) each group has its own. A crossing
ring also runs over the node's own link between its GPUs, so it is never faster than that link, and hides behind
compute no better than it does (PCIe without P2P stages every hop through host memory).
"""

from __future__ import annotations

from dataclasses import dataclass

from dora_dist.parallel.mesh import MeshDims
from dora_dist.plan.comm import Collective, wire_bytes
from dora_dist.plan.hardware import BACKEND_OVERLAPS, Cluster, Interconnect


@dataclass(frozen=True)
class DimLink:
    """Where one mesh dimension's groups run on a cluster."""

    dim: str
    size: int  # ranks in one group
    inter_node: bool  # the group crosses nodes
    link: Interconnect  # the link it is charged on: the inter-node one when it crosses
    share: float  # fraction of the link's per-GPU bus bandwidth one group gets (concurrent groups on a per-node link)
    intra: Interconnect | None = None  # the node's own link, which a crossing ring also runs over

    @property
    def bandwidth(self) -> float:
        own = self.link.bandwidth * self.share
        return min(own, self.intra.bandwidth) if self.intra else own

    @property
    def latency_s(self) -> float:
        return max(self.link.latency_s, self.intra.latency_s) if self.intra else self.link.latency_s

    @property
    def overlaps(self) -> bool:
        return self.link.overlaps and (self.intra.overlaps if self.intra else True)

    @property
    def overlap_efficiency(self) -> float:
        eff = self.link.overlap_efficiency
        return min(eff, self.intra.overlap_efficiency) if self.intra else eff


def group_shape(dims: MeshDims, dim: str) -> tuple[int, int]:
    """(size, stride) of one group of mesh dimension `dim` (plan.comm.MESH_DIMS)."""
    shapes = {
        "tp": (dims.tp, 1),
        "dp_shard": (dims.dp_shard, dims.tp),
        "dp_replicate": (dims.dp_replicate, dims.tp * dims.dp_shard),
        "dp": (dims.dp, dims.tp),
    }
    if dim not in shapes:
        raise ValueError(f"unknown mesh dimension {dim!r}; known: {', '.join(shapes)}")
    return shapes[dim]


def dim_link(dims: MeshDims, dim: str, cluster: Cluster) -> DimLink:
    """The link a group of `dim` runs on, with its share of that link."""
    size, stride = group_shape(dims, dim)
    gpn = cluster.gpus_per_node
    crosses = cluster.nodes > 1 and size * stride > gpn
    if not crosses:
        return DimLink(dim, size, False, cluster.intra, 1.0)
    on_one_node = max(1, gpn // stride)  # ranks of one group on a node
    share = 1.0 if cluster.inter.per_gpu else on_one_node / gpn
    return DimLink(dim, size, True, cluster.inter, share, cluster.intra if gpn > 1 else None)


def collective_seconds(c: Collective, dl: DimLink) -> float:
    """Ring wire bytes over the group's share of its link, plus the link's latency per call."""
    return wire_bytes(c, dl.size) / dl.bandwidth + dl.latency_s * c.calls


def comm_time(
    collectives: list[Collective], cluster: Cluster, dims: MeshDims | None = None
) -> tuple[float, float, float]:
    """(overlappable, not overlappable, overlap efficiency) of one step's communication: each collective on its
    dimension's link. The efficiency is the overlappable time's weighted mean of its links' `overlap_efficiency`
    (one NCCL stream runs the collectives of every dimension one after the other)."""
    dims = dims or MeshDims(dp_shard=cluster.world, nodes=cluster.nodes)
    backend = BACKEND_OVERLAPS[cluster.backend]
    ov = no = weighted = 0.0
    for c in collectives:
        dl = dim_link(dims, c.dim, cluster)
        t = collective_seconds(c, dl)
        if c.overlap and backend and dl.overlaps:
            ov += t
            weighted += t * dl.overlap_efficiency
        else:
            no += t
    return ov, no, (weighted / ov if ov else 1.0)


def bytes_by_link(collectives: list[Collective], cluster: Cluster, dims: MeshDims | None = None) -> dict[str, int]:
    """{"intra_node": bytes, "inter_node": bytes} of one rank and step (the collectives' logical buffer sizes, as
    comm.py counts them)."""
    dims = dims or MeshDims(dp_shard=cluster.world, nodes=cluster.nodes)
    out = {"intra_node": 0, "inter_node": 0}
    for c in collectives:
        out["inter_node" if dim_link(dims, c.dim, cluster).inter_node else "intra_node"] += c.nbytes
    return out


__all__ = ["DimLink", "bytes_by_link", "collective_seconds", "comm_time", "dim_link", "group_shape"]
