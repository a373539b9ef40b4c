"""Parallel engines. One module per engine, all implementing `dora_dist.parallel.base.Engine`.

Add an engine: subclass `Engine` (declare its `capabilities`, implement `wrap`) and add "name": "module:Class" to
ENGINES (imported lazily, so optional dependencies such as deepspeed are only imported when that engine is used).
Nothing else changes: preflight, compile, resume and the planner read `capabilities(name)`, and `resolve_engine`
is the one place `parallel.engine=auto` is decided.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dora_dist.dist_env import DistEnv
from dora_dist.errors import ConfigError
from dora_dist.parallel.base import Engine
from dora_dist.parallel.capabilities import EngineCapabilities

if TYPE_CHECKING:
    from dora_dist.config import Config

ENGINES: dict[str, str] = {
    "none": "dora_dist.parallel.none:SingleProcessEngine",
    "ddp": "dora_dist.parallel.ddp:DDPEngine",
    "fsdp2": "dora_dist.parallel.fsdp2:FSDP2Engine",
    "zero2": "dora_dist.parallel.zero:Zero2Engine",  # DeepSpeed ZeRO-2 (needs deepspeed)
    "zero3": "dora_dist.parallel.zero:Zero3Engine",  # DeepSpeed ZeRO-3 (needs deepspeed)
}

ENGINE_CHOICES = ("auto", *ENGINES)

#: what parallel.engine=auto picks: one process; several with a 4/8-bit base (kept whole on every rank); several
#: with a dense base (sharded)
AUTO_ONE_PROCESS = "none"
AUTO_QUANTIZED = "ddp"
AUTO_DENSE = "fsdp2"


def resolve_engine(name: str, world_size: int, quant_mode: str = "none") -> str:
    """The engine a job runs: `name` itself, or for 'auto' none on one process, and on several ddp for QDoRA
    (4/8-bit) bases, else fsdp2. Used by the trainer (make_engine), preflight and the planner alike."""
    if name != "auto":
        return name
    if world_size <= 1:
        return AUTO_ONE_PROCESS
    return AUTO_QUANTIZED if quant_mode != "none" else AUTO_DENSE


def resolve_engine_name(cfg: Config, env: DistEnv | int) -> str:
    """`resolve_engine` for a job config; `env` is the DistEnv, or just the world size (preflight, before any
    process group exists)."""
    world = env if isinstance(env, int) else env.world_size
    return resolve_engine(cfg.parallel.engine, world, cfg.quantization.mode)


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise ConfigError(f"unknown parallel.engine {name!r}; valid: {', '.join(ENGINE_CHOICES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def capabilities(name: str) -> EngineCapabilities:
    """What the registered engine `name` can do (its class's declaration), without building it or any process
    group: the planner and preflight read it offline. Imports the engine's module, never its optional packages."""
    return engine_class(name).capabilities


def engines_for(world_size: int, quant_mode: str = "none") -> list[str]:
    """The registered engines that can run `world_size` processes over a `quant_mode` base (registry order)."""
    return [n for n in ENGINES if capabilities(n).runs_on(world_size) and capabilities(n).holds(quant_mode)]


def engines_with(flag: str) -> list[str]:
    """The registered engines whose capabilities set `flag` (e.g. "hybrid_shard", "tensor_parallel")."""
    return [n for n in ENGINES if getattr(capabilities(n), flag)]


def make_engine(cfg: Config, env: DistEnv, batching=None, optimizer_factory=None) -> Engine:
    """The job's engine (parallel.engine, 'auto' resolved), checked against the config. `optimizer_factory`
    (dora_dist/optim.py) builds the optimizer and LR schedule over the wrapped model; default: the config's."""
    cls = engine_class(resolve_engine_name(cfg, env))
    problem = cls.config_problem(cfg, env.world_size)  # preflight checked it already; kept for library callers
    if problem is not None:
        raise ConfigError(problem)
    return cls(cfg, env, batching, optimizer_factory)


__all__ = [
    "Engine",
    "DistEnv",
    "EngineCapabilities",
    "ENGINES",
    "ENGINE_CHOICES",
    "capabilities",
    "engines_for",
    "engines_with",
    "make_engine",
    "engine_class",
    "resolve_engine",
    "resolve_engine_name",
]
