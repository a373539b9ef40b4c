"""The device mesh of a job, decided in one place (as torchtitan's ParallelDims): dp_replicate × dp_shard × tp.

    world = dp_replicate · dp_shard · tp          ranks laid out row-major: tp innermost, then dp_shard

- tp (`parallel.tp`): tensor-parallel degree; a block's linears are split over these ranks (inside a node).
- dp_shard (`parallel.shard_group`): the data-parallel ranks that shard the base among themselves (FSDP2, ZeRO-3).
- dp_replicate: copies of a shard group. dp_replicate > 1 with dp_shard > 1 is hybrid sharding (FSDP2's HSDP,
  ZeRO++ hpZ): the base never crosses a group boundary, only the adapters' gradients do.

torchrun numbers ranks node by node (LOCAL_WORLD_SIZE consecutive ranks per node), so with tp and dp_shard
innermost a shard group is a run of consecutive ranks: inside one node when it fits, whole nodes otherwise.
`resolve_dims` validates the sizes from the config and the launch alone (no process group: preflight and the
planner call it offline); `build_mesh` makes the DeviceMesh once the process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dora_dist.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from dora_dist.config import Config

#: mesh dimension names, outermost first (a flattened "dp" = dp_replicate × dp_shard is added by build_mesh)
DIM_NAMES: tuple[str, str, str] = ("dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class MeshDims:
    """Sizes of the job's mesh. `nodes` is how many nodes the launch spans (1 when unknown or single-node)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    nodes: int = 1

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each sees its own micro-batches."""
        return self.dp_replicate * self.dp_shard

    @property
    def hybrid(self) -> bool:
        """The base is sharded inside groups and replicated across them (HSDP / hpZ)."""
        return self.dp_replicate > 1 and self.dp_shard > 1

    def sizes(self) -> tuple[int, int, int]:
        return (self.dp_replicate, self.dp_shard, self.tp)

    def describe(self) -> str:
        parts = [f"{n}={s}" for n, s in zip(DIM_NAMES, self.sizes(), strict=True) if s > 1]
        return " × ".join(parts) or "one process"


def resolve_dims(cfg: Config, world: int, local_world: int | None = None, engine: str | None = None) -> MeshDims:
    """The mesh sizes of `cfg` on `world` processes, `local_world` of them per node (None: one node), for `engine`
    (default: parallel.engine resolved). Raises a one-line ConfigError naming the key when they cannot work."""
    from dora_dist.parallel import capabilities, engines_with, resolve_engine

    p = cfg.parallel
    name = engine or resolve_engine(p.engine, world, cfg.quantization.mode)
    caps = capabilities(name)
    local = world if not local_world or local_world >= world else local_world
    if world % local:
        raise ConfigError(f"WORLD_SIZE={world} is not a whole number of nodes of {local} processes (LOCAL_WORLD_SIZE)")
    nodes = world // local
    tp = p.tp
    if world % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the world size {world}")
    if local % tp:
        raise ConfigError(
            f"parallel.tp={tp} does not divide the {local} processes of a node: a tensor-parallel group must stay "
            "inside one node (its all-reduces run on every layer)"
        )
    if tp > 1 and not caps.tensor_parallel:
        raise ConfigError(
            f"parallel.tp={tp} with parallel.engine={name}, which cannot compose with tensor parallelism; engines "
            f"that can: {', '.join(engines_with('tensor_parallel'))}"
        )
    dp, dp_per_node = world // tp, local // tp
    group = p.shard_group
    if group == 0:  # auto: one node's data-parallel ranks when the job spans nodes and the engine can hybrid-shard
        # (a node of one data-parallel process shards nothing inside it: flat, or the base would be whole on each)
        group = dp_per_node if nodes > 1 and caps.hybrid_shard and dp_per_node > 1 else dp
    if group > dp or dp % group:
        raise ConfigError(
            f"parallel.shard_group={group} does not divide the {dp} data-parallel processes (world {world} / "
            f"tp {tp}); use a divisor of {dp}, or 0 for one node's processes"
        )
    if nodes > 1 and dp_per_node % group and group % dp_per_node:
        raise ConfigError(
            f"parallel.shard_group={group} does not fit the node layout ({nodes} nodes × {dp_per_node} data-parallel "
            f"processes): a shard group must divide one node's processes or be whole nodes"
        )
    if group < dp and not (caps.hybrid_shard and caps.shards_params):
        raise ConfigError(
            f"parallel.shard_group={group} is below the {dp} data-parallel processes (hybrid sharding), which "
            f"parallel.engine={name} has no mode for; engines that do: {', '.join(engines_with('hybrid_shard'))}"
        )
    return MeshDims(dp_replicate=dp // group, dp_shard=group, tp=tp, nodes=nodes)


def data_parallel_rank(cfg: Config, rank: int, world: int) -> tuple[int, int]:
    """(this rank's data-parallel index, data-parallel size): the ranks of one tensor-parallel group (tp innermost,
    consecutive) see the same batches, so data, batch arithmetic and loss scaling count world / tp ranks."""
    tp = max(1, int(cfg.parallel.tp))
    return rank // tp, max(1, world // tp)


@dataclass(frozen=True)
class JobMesh:
    """The built mesh: the 3-D root (dp_replicate, dp_shard, tp) and its flattened data-parallel dimension, kept
    here because slicing a flattened dimension from the root is deprecated in torch."""

    dims: MeshDims
    root: DeviceMesh
    dp: DeviceMesh  # 1-D, dp_replicate × dp_shard ranks: DDP's group, the loss all-reduce

    def __getitem__(self, name: str) -> DeviceMesh:
        """The 1-D sub-mesh of one named dimension (dp_replicate, dp_shard, tp) or "dp"."""
        return self.dp if name == "dp" else self.root[name]

    def data_parallel(self) -> DeviceMesh:
        """The mesh FSDP2 shards over: 2-D (dp_replicate, dp_shard) when groups are replicated (HSDP: fully_shard
        replicates over the first dimension and shards over the second), else the 1-D "dp" (= dp_shard)."""
        if self.dims.dp_replicate > 1:
            return self.root["dp_replicate", "dp_shard"]
        return self.dp


def build_mesh(dims: MeshDims, device_type: str) -> JobMesh:
    """Make the job's DeviceMesh. Size-1 dimensions are kept so callers can always slice by name. Needs the
    default process group; every rank must call it (collective group creation)."""
    from torch.distributed.device_mesh import init_device_mesh

    from dora_dist.parallel.comm_counter import name_mesh_groups

    root = init_device_mesh(device_type, dims.sizes(), mesh_dim_names=DIM_NAMES)
    mesh = JobMesh(dims, root, root["dp_replicate", "dp_shard"]._flatten("dp"))
    # the counter attributes bytes per dimension (a group that serves several keeps the first name: "dp" first)
    names = ["dp"] + [n for n, size in zip(DIM_NAMES, dims.sizes(), strict=True) if size > 1]
    name_mesh_groups({n: mesh[n].get_group() for n in names})
    return mesh


__all__ = ["DIM_NAMES", "MeshDims", "JobMesh", "resolve_dims", "build_mesh", "data_parallel_rank"]
