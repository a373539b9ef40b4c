"""Single process: no wrapping, no collectives."""

from __future__ import annotations

from torch import nn

from dora_dist.parallel.base import Engine


class SingleProcessEngine(Engine):
    name = "none"
    runs_many = False

    @property
    def loss_scale(self) -> float:
        return 1.0

    def wrap(self, model: nn.Module) -> nn.Module:
        return model
