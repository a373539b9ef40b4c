"""How a rank gets the base model's weights: chosen once, by the engine, before anything is built.

torchtitan's order is build on meta -> shard -> allocate -> load. Engines that replicate the model (none, ddp,
zero2) can simply load the weights where they will run; the sharding engines need the other orders:

| kind              | engine                  | load_model builds                 | after sharding, the engine... |
|-------------------|-------------------------|-----------------------------------|-------------------------------|
| `direct`          | none, ddp, zero2, fsdp2 | real weights on the rank's device | nothing more                  |
| `zero_init`       | zero3                   | real weights, inside zero.Init    | nothing (already partitioned) |
| `rank0_broadcast` | fsdp2 `load_on_rank0`   | rank 0: CPU weights; others: meta | allocates shards, broadcasts  |
| `sharded_4bit`    | fsdp2 with nf4/fp4      | meta, 4-bit linears row-shardable | allocates, streams its rows   |

The plan is explicit data passed from the engine to the loader and back to the engine's `wrap`: no hidden state on
the model decides how it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LoadKind = Literal["direct", "zero_init", "rank0_broadcast", "sharded_4bit"]


@dataclass(frozen=True)
class LoadPlan:
    kind: LoadKind
    #: where `load_model` puts this rank's parameters ("meta" where the engine fills them after sharding)
    device: torch.device

    @property
    def fills_after_shard(self) -> bool:
        """The engine allocates and loads the weights inside `wrap`, after sharding."""
        return self.kind in ("rank0_broadcast", "sharded_4bit")
