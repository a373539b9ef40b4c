"""Count the bytes every collective actually moves, per kind, by intercepting the c10d ops that run.

    with CommCounter() as counter:          # the trainer: parallel/step_probe.py, DORA_DIST_COUNT_COMM=1
        counter.start_step()
        ... forward, backward, optimizer step ...
        stats = counter.end_step()           # {"comm_all_gather_bytes": ..., "comm_all_reduce_calls": ..., ...}

Why a dispatch mode: every path to a process group ends in a dispatcher op of the `c10d` namespace
(`dist.all_reduce` -> `c10d::allreduce_`, FSDP2's all-gather -> `c10d::_allgather_base_`, DDP's C++ reducer ->
`c10d::allreduce_`, DTensor's functional collectives -> `_c10d_functional::all_reduce`, DeepSpeed's `deepspeed.comm`
-> torch.distributed -> c10d). A `TorchDispatchMode` sees all of them, in Python and in C++ callers (the autograd
thread inherits the mode), so the counts are of the collectives that ran, not of a formula. (The same mechanism as
torch's own `CommDebugMode`, which counts calls but not bytes.)

Bytes are the size of the collective's whole logical buffer on one rank, padding included:
all-gather: the gathered output (world × input); reduce-scatter: the input (world × output); all-reduce, broadcast,
reduce: the tensor. What a ring algorithm puts on the wire per rank follows from these ((N-1)/N, 2(N-1)/N; see
dora_dist.plan.comm) — the projection predicts exactly these buffer sizes.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "reduce", "other")
ENV_VAR = "DORA_DIST_COUNT_COMM"

# op name (without namespace/overload) -> (kind, where the counted buffer is: "arg0" | "arg1" | "result")
_C10D = {
    "allgather_": ("all_gather", "arg0"),
    "_allgather_base_": ("all_gather", "arg0"),
    "allgather_coalesced_": ("all_gather", "arg0"),
    "allgather_into_tensor_coalesced_": ("all_gather", "arg0"),
    "reduce_scatter_": ("reduce_scatter", "arg1"),
    "_reduce_scatter_base_": ("reduce_scatter", "arg1"),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "arg1"),
    "allreduce_": ("all_reduce", "arg0"),
    "allreduce_coalesced_": ("all_reduce", "arg0"),
    "broadcast_": ("broadcast", "arg0"),
    "reduce_": ("reduce", "arg0"),
    "alltoall_": ("other", "arg1"),
    "alltoall_base_": ("other", "arg1"),
    "gather_": ("other", "arg1"),
    "scatter_": ("other", "arg0"),
    "send": ("other", "arg0"),
    "recv_": ("other", "arg0"),
}
_FUNCOL = {
    "all_gather_into_tensor": ("all_gather", "result"),
    "all_gather_into_tensor_coalesced": ("all_gather", "result"),
    "reduce_scatter_tensor": ("reduce_scatter", "arg0"),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", "arg0"),
    "all_reduce": ("all_reduce", "arg0"),
    "all_reduce_coalesced": ("all_reduce", "arg0"),
    "broadcast": ("broadcast", "arg0"),
    "all_to_all_single": ("other", "arg0"),
}


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


_NAMESPACES = {"c10d": _C10D, "_c10d_functional": _FUNCOL, "c10d_functional": _FUNCOL}


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) list/tuple (local shards for DTensors and other subclasses)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    return 0


#: process-group name -> mesh dimension ("dp", "dp_shard", "dp_replicate", "tp"; plan.comm.MESH_DIMS), filled by
#: `name_mesh_groups` when the job's mesh is built; the default (world) group counts as "dp", any other as "other"
GROUP_DIMS: dict[str, str] = {}


def name_mesh_groups(groups: dict[str, Any]) -> None:
    """Record which mesh dimension each process group serves ({dim: ProcessGroup}); a group serving several
    dimensions (a size-1 dimension's group, or "dp" = the world when tp = 1) keeps the first name given."""
    for dim, group in groups.items():
        GROUP_DIMS.setdefault(group.group_name, dim)


def _group_dim(args: tuple) -> str:
    """The mesh dimension of the process group a c10d op runs on (a boxed ProcessGroup argument, or a functional
    collective's group-name string)."""
    import torch.distributed as dist

    name = None
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                name = dist.ProcessGroup.unbox(a).group_name
                break
            except (RuntimeError, TypeError):
                continue
    if name is None:
        strs = [a for a in args if isinstance(a, str)]
        name = strs[-1] if strs else None
    if name is not None and name in GROUP_DIMS:
        return GROUP_DIMS[name]
    world = dist.group.WORLD if dist.is_initialized() else None
    return "dp" if world is None or name in (None, world.group_name) else "other"


def classify(func) -> tuple[str, str] | None:
    """(kind, buffer position) of a collective op overload, or None for any other op."""
    ns = getattr(func, "namespace", None)
    table = _NAMESPACES.get(ns)
    if table is None:
        return None
    name = func._schema.name.split("::", 1)[-1]
    return table.get(name)


class CommCounter(TorchDispatchMode):
    """Per-kind byte and call counts of the collectives run while the mode is active (see module doc)."""

    def __init__(self, record_calls: bool = False):
        super().__init__()
        self.totals: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._step_totals: dict[str, int] = {}
        self._step_calls: dict[str, int] = {}
        self.record_calls = record_calls
        self.log: list[tuple[str, str, int]] = []  # (kind, op, bytes) when record_calls
        self.by_dim: dict[tuple[str, str], int] = defaultdict(int)  # (mesh dim, kind) -> bytes
        self._step_by_dim: dict[tuple[str, str], int] = {}

    @classmethod
    def from_env(cls) -> CommCounter | None:
        """A counter when DORA_DIST_COUNT_COMM is set to a true value (what benchmarks/scaling.py sets)."""
        if os.environ.get(ENV_VAR, "").lower() in ("1", "true", "yes"):
            return cls(record_calls=os.environ.get(ENV_VAR + "_LOG", "") == "1")
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(t is _dtensor_type() for t in types):
            # let DTensor run first: its redistributions (e.g. the gradient norm's all-reduce) then come back
            # through this mode as plain-tensor collectives (as torch's CommDebugMode does)
            return NotImplemented
        out = func(*args, **kwargs)
        hit = classify(func)
        if hit is not None:
            kind, where = hit
            if where == "result":
                nbytes = tensor_bytes(out)
            else:
                idx = 0 if where == "arg0" else 1
                nbytes = tensor_bytes(args[idx]) if len(args) > idx else 0
            self.totals[kind] += nbytes
            self.calls[kind] += 1
            self.by_dim[(_group_dim(args), kind)] += nbytes
            if self.record_calls:
                self.log.append((kind, func._schema.name, nbytes))
        return out

    # --- per-step accounting ---------------------------------------------------------------------------
    def start_step(self) -> None:
        self._step_totals = dict(self.totals)
        self._step_calls = dict(self.calls)
        self._step_by_dim = dict(self.by_dim)
        self.log.clear()

    def end_step(self) -> dict[str, int]:
        """Bytes and calls per kind since `start_step`, as flat metric keys."""
        out = {}
        for kind in KINDS:
            out[f"comm_{kind}_bytes"] = self.totals.get(kind, 0) - self._step_totals.get(kind, 0)
            out[f"comm_{kind}_calls"] = self.calls.get(kind, 0) - self._step_calls.get(kind, 0)
        for (dim, kind), total in self.by_dim.items():  # per mesh dimension: comm_<dim>_<kind>_bytes (dim != "dp")
            if dim != "dp":
                out[f"comm_{dim}_{kind}_bytes"] = total - self._step_by_dim.get((dim, kind), 0)
        return out

    def snapshot(self) -> dict[str, int]:
        """Totals since the counter was created (set-up collectives included)."""
        return {
            **{f"comm_{k}_bytes": self.totals.get(k, 0) for k in KINDS},
            **{f"comm_{k}_calls": self.calls.get(k, 0) for k in KINDS},
        }
