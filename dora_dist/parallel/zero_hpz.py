"""ZeRO++ hierarchical partitioning (hpZ) under `parallel.engine=zero3`: what the ZeRO-3 engine does about it.

`parallel.shard_group` below the world size puts `zero_hpz_partition_size` = the group in the generated DeepSpeed
JSON (zero_config.py). DeepSpeed then keeps, besides each rank's 1/world primary partition of every parameter, a
secondary partition split over the rank's shard group only (consecutive ranks: one node), and runs the per-layer
all-gathers from it, inside the group. Three things follow for us:

- the row norms of DoRA (‖W‖² per output row) are read from the secondary partition, so their (out,) all-reduce
  stays inside the group (`norm_slice`);
- DeepSpeed's hpZ group lives in a module global (deepspeed.utils.groups) that outlives the engine and is reused by
  every later ZeRO-3 engine of the process whatever its size, so a flat run after an hpZ run would still gather
  inside the old groups: the engine drops a group that does not match its own size, and its own on close
  (`sync_group`, `release_group`);
- the collective counter attributes bytes per mesh dimension by process group: the hpZ group is named "dp_shard",
  the world stays "dp" (`register_group`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def hpz_size(ds_config: dict | None) -> int:
    """zero_hpz_partition_size of a DeepSpeed config (1: no hpZ)."""
    return int((ds_config or {}).get("zero_optimization", {}).get("zero_hpz_partition_size", 1) or 1)


def norm_slice(p: Any, primary: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, int, object]:
    """(this rank's valid elements, their flat start, the group whose slices cover the weight) for the row norms of a
    ZeRO-3 parameter (DeepSpeed's ds_* attributes): its secondary (shard-group) partition under hpZ, else `primary`
    (slice, start) over p.ds_process_group. Quantized secondary copies (zero_quantized_nontrainable_weights) are
    not read."""
    sec = getattr(p, "ds_secondary_tensor", None)
    group = getattr(p, "ds_zero_param_process_group", None)
    if sec is None or group is None or hasattr(sec, "ds_quant_scale"):
        return primary[0], primary[1], p.ds_process_group
    size = int(sec.ds_numel)
    start = dist.get_rank(group=group) * size
    stop = max(start, min(start + size, int(p.ds_numel)))
    return sec.view(-1).narrow(0, 0, stop - start), start, group


def sync_group(size: int) -> None:
    """Drop DeepSpeed's current hpZ group unless it has `size` ranks (before zero.Init / deepspeed.initialize,
    which create one only when there is none)."""
    from deepspeed.utils import groups

    current = groups._get_zero_param_intra_parallel_group()
    if current is not None and (size <= 1 or dist.get_world_size(current) != size):
        groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None


def release_group() -> None:
    """Forget DeepSpeed's hpZ group (an engine's close)."""
    from deepspeed.utils import groups

    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None


def register_group() -> list[int]:
    """Name DeepSpeed's hpZ group "dp_shard" for the collective counter; returns its ranks."""
    from deepspeed.utils import groups

    from dora_dist.parallel.comm_counter import name_mesh_groups

    intra = groups._get_zero_param_intra_parallel_group()
    name_mesh_groups({"dp_shard": intra})
    return dist.get_process_group_ranks(intra)
