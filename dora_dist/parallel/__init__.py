"""Parallel engines. One module per engine, all implementing `dora_dist.parallel.base.Engine`.

Register a new engine by adding "name": "module:Class" to ENGINES (imported lazily, so optional dependencies such
as deepspeed are only imported when that engine is chosen).
"""
from __future__ import annotations

import importlib

from dora_dist.parallel.base import Engine
from dora_dist.parallel.dist_env import DistEnv

ENGINES: dict[str, str] = {
    "none": "dora_dist.parallel.none:SingleProcessEngine",
    "ddp": "dora_dist.parallel.ddp:DDPEngine",
    "fsdp2": "dora_dist.parallel.fsdp2:FSDP2Engine",
    "zero2": "dora_dist.parallel.zero:Zero2Engine",    # DeepSpeed ZeRO-2 (needs deepspeed)
    "zero3": "dora_dist.parallel.zero:Zero3Engine",    # DeepSpeed ZeRO-3 (needs deepspeed)
}

ENGINE_CHOICES = ("auto", *ENGINES)


def resolve_engine_name(cfg, env: DistEnv) -> str:
    """'auto' -> none for one process; several processes: ddp for QDoRA (4/8-bit) bases, else fsdp2."""
    name = cfg.parallel.engine
    if name != "auto":
        return name
    if env.world_size <= 1:
        return "none"
    return "ddp" if cfg.quantization.mode != "none" else "fsdp2"


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise ValueError(f"unknown parallel.engine {name!r}; valid: {', '.join(ENGINE_CHOICES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_engine(cfg, env: DistEnv, batching=None) -> Engine:
    name = resolve_engine_name(cfg, env)
    if name == "none" and env.world_size > 1:
        raise ValueError(f"parallel.engine=none cannot run {env.world_size} processes; use auto, ddp or fsdp2")
    return engine_class(name)(cfg, env, batching)


__all__ = ["Engine", "DistEnv", "ENGINES", "ENGINE_CHOICES", "make_engine", "engine_class", "resolve_engine_name"]
