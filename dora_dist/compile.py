"""`training.compile=true`: torch.compile each decoder block, DoRA layers included (as torchtitan does).

Why per block, and why the block's `forward`. A whole-model graph is slow to compile and breaks at the loss and the
engine's hooks; a decoder block is the repeated unit, so one compiled graph serves every layer (same code, same
shapes). Compiling the bound `forward` (not wrapping the block in an OptimizedModule) keeps parameter names
unchanged (adapters, checkpoints, DDP's ignore list, FSDP2's per-block `fully_shard` all see the same module
tree) and leaves module hooks — FSDP2's unshard/reshard, DDP — running eagerly around the compiled code, which is
how FSDP2 expects to be composed with compile. Inside a block the DoRA epilogue is traced as plain ops
(`nn/dora_epilogue.py`), so inductor fuses it with its neighbours; a DoRA layer has no graph break.

Compile before the engine wraps the model (the trainer does). DeepSpeed ZeRO registers hooks on every submodule,
which would run inside the compiled code; the trainer refuses compile with the engines whose capabilities say
`compile=False` (zero2, zero3).
"""

from __future__ import annotations

import torch
from torch import nn


def compile_decoder_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Replace each decoder block's forward by its torch.compile'd version; returns the number of blocks."""
    from dora_dist.parallel.fsdp2 import decoder_blocks

    blocks = decoder_blocks(model)
    for block in blocks:
        if not getattr(block, "_dora_dist_compiled", False):
            block.forward = torch.compile(block.forward, **compile_kwargs)
            block._dora_dist_compiled = True
    return len(blocks)


def compile_engines() -> list[str]:
    """The engines whose hooks live outside the compiled blocks (capability `compile`; ZeRO hooks every submodule)."""
    from dora_dist.parallel import ENGINES, capabilities

    return [name for name in ENGINES if capabilities(name).compile]


def compile_problem(engine_name: str) -> str | None:
    """Why training.compile=true cannot be used with this engine, or None (checked by preflight too)."""
    from dora_dist.parallel import capabilities

    if not capabilities(engine_name).compile:
        return (
            f"training.compile=true is supported with parallel.engine in {compile_engines()}, not "
            f"{engine_name!r} (DeepSpeed ZeRO's per-module hooks would run inside the compiled blocks)"
        )
    return None


def compile_for_engine(model: nn.Module, engine_name: str) -> int:
    """compile_decoder_blocks for the engines that compose with it; a clear error for the others."""
    from dora_dist.errors import ConfigError

    problem = compile_problem(engine_name)
    if problem is not None:
        raise ConfigError(problem)
    n = compile_decoder_blocks(model)
    if n == 0:
        raise ConfigError(
            "training.compile=true found no decoder blocks to compile in this model; set training.compile=false"
        )
    return n
