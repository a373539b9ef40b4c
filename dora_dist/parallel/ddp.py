"""DistributedDataParallel: every rank holds the whole model; adapter gradients are all-reduced (averaged).

Frozen base weights are excluded from DDP's parameter set (`_ddp_params_and_buffers_to_ignore`): they are loaded
identically on every rank, so DDP neither broadcasts them at wrap time (a full-model broadcast) nor tracks them.
That also keeps bitsandbytes 4/8-bit weights away from DDP (QDoRA + DDP works).
Collectives: one broadcast of the adapter parameters at wrap; an all-reduce of adapter gradients on the last
micro-step of each optimizer step; one all-reduce of a scalar for the logged loss (trainer).
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

    #: parallel.tp > 1: the tensor-parallel (DTensor) adapter parameters, whose gradients this engine averages over
    #: the data-parallel ranks itself (DDP cannot hold DTensors); the others stay with DDP on the dp group
    tp_params: list = []

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.env.distributed:
            raise RuntimeError("parallel.engine=ddp needs several processes (launch with torchrun)")
        group = None
        if self.cfg.parallel.tp > 1:
            from dora_dist.parallel.tp import dtensor_parameters

            self.apply_tensor_parallel(model)
            group = self.job_mesh()["dp"].get_group()
            self.tp_params = [p for _, p in dtensor_parameters(model) if p.requires_grad]
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad or hasattr(p, "placements")]
        frozen += [n for n, _ in model.named_buffers()]
        if self.tp_params and not any(p.requires_grad and not hasattr(p, "placements") for p in model.parameters()):
            return model  # every trainable parameter is tensor-parallel: no DDP wrapper (see accumulate)
        model._ddp_params_and_buffers_to_ignore = frozen
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DDP(
            model,
            device_ids=device_ids,
            process_group=group,
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

            average_dp_gradients(self.tp_params, self.job_mesh()["dp"].get_group(), self.dp_size)
