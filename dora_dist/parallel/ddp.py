"""DistributedDataParallel: every rank holds the whole model; adapter gradients are all-reduced (averaged).

Frozen base weights are excluded from DDP's parameter set (`_ddp_params_and_buffers_to_ignore`): they are loaded
identically on every rank, so DDP neither broadcasts them at wrap time (a full-model broadcast) nor tracks them.
That also keeps bitsandbytes 4/8-bit weights away from DDP (QDoRA + DDP works).
Collectives: one broadcast of the adapter parameters at wrap; an all-reduce of adapter gradients on the last
micro-step of each optimizer step; one all-reduce of a scalar for the logged loss (trainer).
With parallel.tp > 1 the linears are split over tp first (parallel/tp.py) and the adapters become DTensors, which DDP
cannot hold: this engine then averages their gradients over the data-parallel ranks itself (one all-reduce of one
buffer on the last micro-step), with no DDP wrapper.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dora_dist.parallel.base import Engine
from dora_dist.parallel.capabilities import EngineCapabilities


class DDPEngine(Engine):
    name = "ddp"
    # every rank holds the whole model: any base, 4/8-bit included; DDP's hooks sit outside the compiled blocks
    capabilities = EngineCapabilities(min_world=2, tensor_parallel=True)

    #: parallel.tp > 1: the adapter parameters (DTensors on the tp mesh, which DDP cannot hold), whose gradients this
    #: engine averages over the data-parallel ranks itself, in one buffer (parallel/tp.py average_dp_gradients)
    tp_params: tuple[nn.Parameter, ...] = ()

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.env.distributed:
            raise RuntimeError("parallel.engine=ddp needs several processes (launch with torchrun)")
        if self.cfg.parallel.tp > 1:  # every trainable parameter is then tensor-parallel (tp.py refuses others)
            self.apply_tensor_parallel(model)
            self.tp_params = tuple(p for p in model.parameters() if p.requires_grad)
            return model  # no DDP wrapper: see accumulate
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        model._ddp_params_and_buffers_to_ignore = frozen
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DDP(
            model,
            device_ids=device_ids,
            bucket_cap_mb=self.cfg.parallel.ddp_bucket_mb,
            broadcast_buffers=False,
            find_unused_parameters=False,
            gradient_as_bucket_view=True,
        )

    @contextlib.contextmanager
    def accumulate(self, last: bool):
        wrapped = isinstance(self.model, DDP)
        if last or not wrapped:
            yield
        else:
            with self.model.no_sync():
                yield
        if last and self.tp_params and self.dp_size > 1:
            from dora_dist.parallel.tp import average_dp_gradients

            average_dp_gradients(list(self.tp_params), self.job_mesh()["dp"].get_group(), self.dp_size)
