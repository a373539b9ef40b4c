"""The process's place in the job: rank, world size, device, backend.

Read from the variables torchrun, the deepspeed launcher and SLURM-wrapped torchrun all set (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without them the job is one process and no process group is created.
Backend: nccl when CUDA is available, gloo otherwise (the CPU path used by the tests).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _attempt_store(restart: str, rank: int, world: int, timeout: datetime.timedelta):
    """torchrun's store, under a prefix of its own for each restart of the workers (--max-restarts): the agent's
    store outlives a failed attempt, and without the prefix the restarted ranks read the dead ranks' addresses from
    it (gloo's connectFullMesh then times out connecting to them). Single node only: each node's agent counts its
    own restarts (a membership change does not count), so across nodes the counts can differ."""
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    return dist.PrefixStore(f"dora_dist/attempt_{restart}", store)


def launch_local_world_size(world_size: int) -> int:
    """LOCAL_WORLD_SIZE (processes per node) as torchrun sets it, or as the launch scripts pass it to --check
    (LOCAL_SIZE under the deepspeed launcher); the whole world when unset (one node). Read before any process
    group exists (preflight, the DeepSpeed config)."""
    value = (os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "").strip()
    return int(value) if value else world_size


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    initialized_here: bool = False

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_environ(cls, device: str = "auto", init_process_group: bool = True, timeout_s: float = 1800.0) -> DistEnv:
        """Build from torchrun/deepspeed variables; creates the default process group when world_size > 1."""
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", 0)
        local_world = launch_local_world_size(world if world > 0 else 1)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))
            dev = torch.device("cuda", torch.cuda.current_device())
            backend = "nccl"
        else:
            dev = torch.device("cpu")
            backend = "gloo"
        env = cls(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            local_world_size=local_world,
            device=dev,
            backend=backend if world > 1 else None,
        )
        if world > 1 and init_process_group:
            if dist.is_initialized():
                env.backend = dist.get_backend()
            else:
                timeout = datetime.timedelta(seconds=timeout_s)
                kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
                if backend == "nccl":
                    kwargs["device_id"] = dev
                restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
                if restart is not None and local_world == world:  # one agent: its count is every rank's
                    kwargs.update(store=_attempt_store(restart, rank, world, timeout), rank=rank, world_size=world)
                dist.init_process_group(**kwargs)
                env.initialized_here = True
        return env

    # --- properties --------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- small collectives (no-ops in one process) -------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def _all_reduce_scalar(self, value: float | torch.Tensor, op: Any) -> float:
        """One all_reduce of one float64 (a no-op in one process)."""
        if not self.distributed:
            return float(value)
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).detach().clone().reshape(1)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def all_reduce_sum(self, value: float | torch.Tensor) -> float:
        """Sum of a scalar over ranks."""
        return self._all_reduce_scalar(value, dist.ReduceOp.SUM)

    def all_reduce_max(self, value: float) -> float:
        return self._all_reduce_scalar(value, dist.ReduceOp.MAX)

    def all_reduce_min(self, value: float) -> float:
        return self._all_reduce_scalar(value, dist.ReduceOp.MIN)

    def all_gather_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's copy of a small tensor of the same shape, stacked (world, *shape), on the CPU."""
        if not self.distributed:
            return t.unsqueeze(0)
        buf = t.detach().to(self.device).contiguous()
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(parts, buf)
        return torch.stack(parts).cpu()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills a cache), then the others."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def destroy(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized_here = False
