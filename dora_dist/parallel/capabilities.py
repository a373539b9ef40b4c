"""What an engine can do, declared once on its class (`Engine.capabilities`) and read through the registry.

Everything outside parallel/ that depends on the engine (preflight, compile, resume, the planner) asks
`dora_dist.parallel.capabilities(name)` instead of comparing engine names, so a new engine is a subclass with its
capabilities plus one registry line, and no other module changes. Reading them needs no process group and no
engine object (the planner and preflight run offline, before either exists).
"""

from __future__ import annotations

from dataclasses import dataclass

#: every quantization.mode of the config (a unit test holds this equal to config.QuantizationSection.mode)
QUANT_MODES: tuple[str, ...] = ("none", "nf4", "fp4", "int8")
#: the checkpoint formats engines write: torch.distributed.checkpoint, DeepSpeed's own
CHECKPOINT_FORMATS: tuple[str, ...] = ("dcp", "deepspeed")


@dataclass(frozen=True)
class EngineCapabilities:
    """What one engine can do: read by preflight, compile, resume and the planner without building the engine."""

    #: processes it runs on: min_world ≤ world ≤ max_world (None: no upper bound)
    min_world: int = 1
    max_world: int | None = None
    #: training.compile composes with it (its hooks stay outside the compiled decoder blocks)
    compile: bool = True
    #: each rank holds 1/N of every parameter, frozen base included (FSDP2, ZeRO-3)
    shards_params: bool = False
    #: adapter gradients and optimizer state are partitioned over the ranks (FSDP2, ZeRO-2/3)
    shards_optimizer: bool = False
    #: quantization.mode values whose base it can train ("none" = dense)
    quant_modes: frozenset[str] = frozenset(QUANT_MODES)
    #: it trains a pre-quantized bitsandbytes checkpoint (models/prequantized.py) of a mode it holds
    prequantized: bool = True
    #: the DeepSpeed ZeRO stage it runs (2 or 3), None for the torch engines
    deepspeed_stage: int | None = None
    #: what save_checkpoint writes, which formats load_checkpoint reads, and whether another world size can read
    #: its checkpoints (DCP reshards on load; DeepSpeed's ZeRO checkpoints load at the world size that wrote them)
    checkpoint_format: str = "dcp"
    resumes_from: frozenset[str] = frozenset({"dcp"})
    reshardable_checkpoints: bool = True
    #: parallel.cpu_offload has an effect (optimizer state, and parameters where they are sharded, in CPU memory)
    cpu_offload: bool = False
    #: parallel.shard_group below the data-parallel world: the base sharded inside each group and replicated across
    #: groups (FSDP2's HSDP, DeepSpeed ZeRO++ hpZ); only adapter gradients cross groups
    hybrid_shard: bool = False
    #: parallel.tp > 1 composes with it (a dp × tp mesh: tensor-parallel linears inside each data-parallel rank)
    tensor_parallel: bool = False
    #: packages it imports when used (checked before any process group exists)
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.quant_modes) - set(QUANT_MODES)
        if unknown:
            raise ValueError(f"unknown quantization mode(s) {sorted(unknown)}; known: {QUANT_MODES}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS or not set(self.resumes_from) <= set(CHECKPOINT_FORMATS):
            raise ValueError(f"checkpoint formats must be among {CHECKPOINT_FORMATS}")
        if self.checkpoint_format not in self.resumes_from:
            raise ValueError("an engine must resume from the format it writes")
        if self.max_world is not None and self.max_world < self.min_world:
            raise ValueError(f"max_world {self.max_world} < min_world {self.min_world}")

    def runs_on(self, world_size: int) -> bool:
        """It can run `world_size` processes."""
        return world_size >= self.min_world and (self.max_world is None or world_size <= self.max_world)

    def holds(self, quant_mode: str) -> bool:
        """It can train a base stored as `quant_mode` (quantization.mode)."""
        return quant_mode in self.quant_modes

    @property
    def offloads_params(self) -> bool:
        """Under parallel.cpu_offload its (sharded) parameters live in CPU memory too, not only the optimizer."""
        return self.cpu_offload and self.shards_params
