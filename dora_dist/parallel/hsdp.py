"""Where a row-sharded FSDP2 parameter's rows live, on a flat or a hybrid (HSDP) mesh.

Flat FSDP2 shards over a 1-D mesh: placements (Shard(0),). HSDP (parallel.shard_group below the data-parallel
world) shards over the 2-D mesh (dp_replicate, dp_shard): placements (Replicate(), Shard(0)), so the ranks of one
shard group hold the rows between them and every group holds the same rows. The DoRA norm code
(parallel/fsdp2.py: init_sharded_norms, gather_dim0_shards, dora_row_views) asks these helpers which mesh
dimension holds the rows, so its gathers run inside the shard group only (never across groups: a gather across
groups would fetch copies of rows this group already has) and only the first group's ranks count rows in the
health metrics (the other groups hold replicas).
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


def chunk_span(n: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, rows) of `rank`'s dim-0 shard of n rows: torch.chunk's layout, ceil(n/world) rows per rank, the
    last ranks possibly fewer or none."""
    size = -(-n // world)
    start = min(n, rank * size)
    return start, max(0, min(size, n - start))


def row_shard_dim(t: DTensor) -> int:
    """The mesh dimension over which `t` is split by rows (Shard(0)); FSDP2's shard dimension is the last one."""
    dims = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
    if len(dims) != 1 or t.placements[dims[0]] != Shard(0):
        raise NotImplementedError(f"expected one row (Shard(0)) sharding, got placements {t.placements}")
    return dims[0]


def row_shards(t: DTensor) -> tuple[int, int]:
    """(ranks sharing `t`'s rows, this rank's index among them): the shard group's size and this rank's place."""
    d = row_shard_dim(t)
    return t.device_mesh.size(d), t.device_mesh.get_local_rank(d)


def row_shard_group(t: DTensor) -> dist.ProcessGroup:
    """The process group of `t`'s shard dimension (the whole mesh's for a 1-D mesh)."""
    return t.device_mesh.get_group(row_shard_dim(t))


def first_replica(t: DTensor) -> bool:
    """True on the ranks of the first shard group (coordinate 0 on every mesh dimension except the row shard's):
    these count the rows; the other groups hold copies of them."""
    d = row_shard_dim(t)
    mesh = t.device_mesh
    return all(mesh.get_local_rank(i) == 0 for i in range(mesh.ndim) if i != d)


def same_row_sharding(params: list[DTensor]) -> bool:
    """All of `params` split over the same mesh, by rows, on the same mesh dimension (one gather can serve them)."""
    if not params:
        return True
    first = params[0]
    try:
        row_shard_dim(first)
    except NotImplementedError:  # not split by rows (e.g. a tensor-parallel Shard(1)): the caller gathers each
        return False
    return all(p.device_mesh == first.device_mesh and p.placements == first.placements for p in params)


__all__ = ["chunk_span", "row_shard_dim", "row_shards", "row_shard_group", "first_replica", "same_row_sharding"]
