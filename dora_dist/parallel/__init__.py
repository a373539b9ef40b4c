"""Parallel engines. One module per engine, all implementing `dora_dist.parallel.base.Engine`.

Register a new engine by adding "name": "module:Class" to ENGINES (imported lazily, so optional dependencies such
as deepspeed are only imported when that engine is chosen).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dora_dist.errors import ConfigError
from dora_dist.parallel.base import Engine
from dora_dist.parallel.dist_env import DistEnv

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


def resolve_engine_name(cfg: Config, env: DistEnv | int) -> str:
    """'auto' -> none for one process; several processes: ddp for QDoRA (4/8-bit) bases, else fsdp2.
    `env` is the DistEnv, or just the world size (preflight, before any process group exists)."""
    name = cfg.parallel.engine
    if name != "auto":
        return name
    if getattr(env, "world_size", env) <= 1:
        return "none"
    return "ddp" if cfg.quantization.mode != "none" else "fsdp2"


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise ConfigError(f"unknown parallel.engine {name!r}; valid: {', '.join(ENGINE_CHOICES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_engine(cfg: Config, env: DistEnv, batching=None) -> Engine:
    cls = engine_class(resolve_engine_name(cfg, env))
    problem = cls.config_problem(cfg, env.world_size)  # preflight checked it already; kept for library callers
    if problem is not None:
        raise ConfigError(problem)
    return cls(cfg, env, batching)


__all__ = ["Engine", "DistEnv", "ENGINES", "ENGINE_CHOICES", "make_engine", "engine_class", "resolve_engine_name"]
