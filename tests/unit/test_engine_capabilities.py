"""Engine capabilities and the one `auto` rule: declared on the engine classes, read through the registry without
an engine or a process group, and the same answer for the trainer, preflight and the planner. Adding an engine is a
subclass plus one registry line."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

from dora_dist import parallel
from dora_dist.config import ConfigError, QuantizationConfig, load_config
from dora_dist.parallel import (
    ENGINES,
    EngineCapabilities,
    capabilities,
    engines_for,
    resolve_engine,
    resolve_engine_name,
)
from dora_dist.parallel.base import Engine
from dora_dist.parallel.capabilities import QUANT_MODES
from dora_dist.parallel.dist_env import DistEnv

ROOT = Path(__file__).resolve().parents[2]


def test_quant_modes_are_the_configs():
    assert set(QUANT_MODES) == set(typing.get_args(typing.get_type_hints(QuantizationConfig)["mode"]))


@pytest.mark.parametrize("name", list(ENGINES))
def test_every_registered_engine_declares_frozen_capabilities(name):
    caps = capabilities(name)
    assert isinstance(caps, EngineCapabilities)
    assert parallel.engine_class(name).name == name
    assert caps.holds("none") and caps.checkpoint_format in caps.resumes_from
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.compile = not caps.compile  # type: ignore[misc]


def test_capabilities_need_no_engine_process_group_or_deepspeed(monkeypatch):
    """The planner and preflight read them offline: with deepspeed unimportable and the ZeRO modules imported
    afresh, every engine's capabilities are read, and no process group is started."""
    import torch.distributed as dist

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    for module in ("dora_dist.parallel.zero", "dora_dist.parallel.zero_base"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    assert [capabilities(n).deepspeed_stage for n in ENGINES] == [None, None, None, 2, 3]
    assert not dist.is_initialized()


def test_declared_capabilities_of_the_shipped_engines():
    """The facts the rest of the code used to spell as engine names."""
    assert [n for n in ENGINES if capabilities(n).compile] == ["none", "ddp", "fsdp2"]
    assert [n for n in ENGINES if capabilities(n).shards_params] == ["fsdp2", "zero3"]
    assert [n for n in ENGINES if capabilities(n).shards_optimizer] == ["fsdp2", "zero2", "zero3"]
    assert [n for n in ENGINES if capabilities(n).cpu_offload] == ["fsdp2", "zero2", "zero3"]
    assert {n: capabilities(n).checkpoint_format for n in ENGINES} == {
        "none": "dcp",
        "ddp": "dcp",
        "fsdp2": "dcp",
        "zero2": "deepspeed",
        "zero3": "deepspeed",
    }
    assert [n for n in ENGINES if not capabilities(n).prequantized] == ["zero3"]


@pytest.mark.parametrize(
    "world, mode, engines",
    [
        (1, "none", ["none"]),
        (1, "nf4", ["none"]),
        (2, "none", ["ddp", "fsdp2", "zero2", "zero3"]),
        (8, "nf4", ["ddp", "fsdp2", "zero2"]),
        (2, "fp4", ["ddp", "fsdp2", "zero2"]),
        (2, "int8", ["ddp", "zero2"]),
    ],
)
def test_engines_for_a_world_and_a_base(world, mode, engines):
    assert engines_for(world, mode) == engines


@pytest.mark.parametrize(
    "name, world, mode, expected",
    [
        ("auto", 1, "none", "none"),
        ("auto", 1, "nf4", "none"),
        ("auto", 2, "none", "fsdp2"),
        ("auto", 4, "nf4", "ddp"),
        ("auto", 2, "int8", "ddp"),
        ("zero3", 1, "none", "zero3"),  # an explicit name is kept (preflight then names what is wrong with it)
        ("ddp", 8, "nf4", "ddp"),
    ],
)
def test_resolve_engine(name, world, mode, expected):
    assert resolve_engine(name, world, mode) == expected
    cfg = load_config(None, [f"parallel.engine={name}", f"quantization.mode={mode}"])
    assert resolve_engine_name(cfg, world) == resolve_engine_name(cfg, DistEnv(world_size=world)) == expected


@pytest.mark.parametrize("world", [1, 2, 3, 16])
@pytest.mark.parametrize("mode", QUANT_MODES)
def test_auto_always_picks_an_engine_that_can_run_the_job(world, mode):
    caps = capabilities(resolve_engine("auto", world, mode))
    assert caps.runs_on(world) and caps.holds(mode)


def _two_block_spec():
    """A small synthetic model for the planner (two blocks, one DoRA linear each): no model is built."""
    from dora_dist.plan.model_spec import ModelSpec, ParamSpec

    params = [ParamSpec("embed.weight", (64, 16), "base", -1, False)]
    for b in range(2):
        params += [
            ParamSpec(f"layers.{b}.proj.base_layer.weight", (16, 16), "linear", b, False),
            ParamSpec(f"layers.{b}.proj.lora_A.weight", (2, 16), "lora_A", b, True),
            ParamSpec(f"layers.{b}.proj.lora_B.weight", (16, 2), "lora_B", b, True),
            ParamSpec(f"layers.{b}.proj.magnitude", (16,), "magnitude", b, True),
        ]
    return ModelSpec(params, n_blocks=2, hidden=16, intermediate=32, vocab=64, n_heads=2, n_kv_heads=2, head_dim=8)


@pytest.mark.parametrize("world, mode", [(1, "none"), (2, "none"), (2, "nf4"), (4, "int8")])
def test_the_planner_resolves_auto_as_the_trainer(world, mode):
    from dora_dist.plan.hardware import make_cluster
    from dora_dist.plan.project import project, valid_engines

    cfg = load_config(None, ["parallel.engine=auto", f"quantization.mode={mode}", "training.global_batch_size=0"])
    proj = project(cfg, make_cluster("a100-80gb", 1, world), spec=_two_block_spec())
    assert proj.engine == resolve_engine_name(cfg, world) and proj.runnable
    assert valid_engines(cfg, world) == engines_for(world, mode)


def test_a_base_an_engine_cannot_hold_is_refused_before_any_work():
    from dora_dist.preflight import check_engine

    with pytest.raises(ConfigError, match="parallel.engine=fsdp2 cannot train a quantization.mode=int8 base.*ddp"):
        check_engine(load_config(None, ["parallel.engine=fsdp2", "quantization.mode=int8"]), 2)
    check_engine(load_config(None, ["parallel.engine=ddp", "quantization.mode=int8"]), 2)


def test_compile_and_deepspeed_rules_read_capabilities():
    from dora_dist.compile import compile_problem

    assert compile_problem("fsdp2") is None
    assert "['none', 'ddp', 'fsdp2'], not 'zero2'" in compile_problem("zero2")


# --- adding an engine is a subclass and one registry line ------------------------------------------------------
class ToyEngine(Engine):
    """Every rank holds the whole model; it cannot be compiled, holds dense bases only, needs 3+ processes."""

    name = "toy"
    capabilities = EngineCapabilities(min_world=3, compile=False, quant_modes=frozenset({"none"}))

    def wrap(self, model: nn.Module) -> nn.Module:
        return model


def test_a_registered_engine_is_known_everywhere_without_other_changes(monkeypatch):
    from dora_dist.compile import compile_problem
    from dora_dist.preflight import check_engine

    monkeypatch.setitem(ENGINES, "toy", f"{__name__}:ToyEngine")
    assert capabilities("toy").min_world == 3
    assert "toy" in engines_for(4, "none") and "toy" not in engines_for(2, "none") + engines_for(4, "nf4")
    assert "not 'toy'" in compile_problem("toy")
    check_engine(_cfg_with_engine("toy"), 3)
    with pytest.raises(ConfigError, match="toy needs several processes"):
        check_engine(_cfg_with_engine("toy"), 1)
    with pytest.raises(ConfigError, match="toy cannot train a quantization.mode=nf4 base"):
        check_engine(_cfg_with_engine("toy", "nf4"), 3)


def _cfg_with_engine(name: str, mode: str = "none"):
    """A job config naming an engine that config's choices do not list (registered by the test at run time)."""
    cfg = load_config(None, [f"quantization.mode={mode}"])
    cfg.parallel.engine = name
    return cfg


# --- the optimizer is the trainer's ----------------------------------------------------------------------------
def _tiny_model() -> nn.Module:
    from dora_dist.adapters import DoRAConfig, apply_dora

    torch.manual_seed(0)
    return apply_dora(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), DoRAConfig(r=2, target_modules=["0", "1"]))


def test_the_engine_builds_its_optimizer_with_the_factory_it_is_given():
    from dora_dist.parallel.none import SingleProcessEngine

    cfg = load_config(None, ["training.max_steps=4", "training.lr=0.5"])
    built = []

    def sgd(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        built.append(opt)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    engine = SingleProcessEngine(cfg, DistEnv(), optimizer_factory=sgd)
    engine.prepare(_tiny_model())
    assert engine.optimizer is built[0] and isinstance(engine.optimizer, torch.optim.SGD)
    default = SingleProcessEngine(cfg, DistEnv())
    default.prepare(_tiny_model())
    assert isinstance(default.optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in default.optimizer.param_groups] == [cfg.training.weight_decay, 0.0]
