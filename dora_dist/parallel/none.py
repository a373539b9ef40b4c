"""Single process: no wrapping, no collectives."""

from __future__ import annotations

from torch import nn

from dora_dist.parallel.base import Engine
from dora_dist.parallel.capabilities import EngineCapabilities


class SingleProcessEngine(Engine):
    name = "none"
    capabilities = EngineCapabilities(min_world=1, max_world=1)

    @property
    def loss_scale(self) -> float:
        return 1.0

    def wrap(self, model: nn.Module) -> nn.Module:
        return model
