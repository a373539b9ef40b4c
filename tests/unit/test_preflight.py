"""preflight: what the config and the machine can tell is refused before any process group exists, and nothing a
shipped config asks for is refused (no false alarms)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dora_dist.config import load_config, load_job_config
from dora_dist.errors import ConfigError, UserError
from dora_dist.preflight import RULES, preflight

ROOT = Path(__file__).resolve().parents[2]

#: the world each shipped config is written for (its comments: GPUs × nodes)
SHIPPED = {
    "quickstart.yaml": (1, 2),
    "llama3.1-8b-qdora-1gpu.yaml": (1,),
    "llama3.1-8b-fsdp2-8gpu.yaml": (8,),
    "llama3.1-8b-qdora-zero2.yaml": (8,),
    "llama3.1-8b-zero3.yaml": (8,),
    "llama3.1-70b-fsdp2-2nodes.yaml": (16,),
    "llama3.1-70b-qdora-fsdp2-2nodes.yaml": (16,),
    "llama3.1-70b-zero3-offload.yaml": (16,),
}


def test_every_shipped_config_passes_at_its_world_size(monkeypatch):
    pytest.importorskip("deepspeed")
    pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(ROOT)  # deepspeed_config paths are relative to the repository
    assert sorted(SHIPPED) == sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    for name, worlds in SHIPPED.items():
        cfg = load_config(ROOT / "configs" / name)
        for world in worlds:
            preflight(cfg, world)


def test_a_bad_config_fails_before_any_process_group(monkeypatch):
    import dora_dist.train as train_mod

    def no_group(*args, **kwargs):
        raise AssertionError("a process group was about to be created")

    monkeypatch.setattr(train_mod.DistEnv, "from_environ", no_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_job_config(None, ["parallel.engine=zero3", "quantization.mode=nf4"])
    with pytest.raises(ConfigError, match="zero3 cannot train a quantization.mode=nf4"):
        train_mod.train(cfg)


def test_the_engine_checks_the_same_rule_late(monkeypatch):
    """ZeRO-3's own model_init_context gives the preflight message (one rule, two places)."""
    from dora_dist.parallel.dist_env import DistEnv
    from dora_dist.parallel.zero import Zero3Engine

    cfg = load_job_config(None, ["parallel.engine=zero3", "quantization.mode=fp4"])
    with pytest.raises(ConfigError) as early:
        preflight(cfg, 2)
    with pytest.raises(ConfigError) as late:
        Zero3Engine(cfg, DistEnv(world_size=2)).model_init_context()
    assert str(early.value) == str(late.value)


def test_deepspeed_json_that_contradicts_the_config(tmp_path):
    pytest.importorskip("deepspeed")
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    cfg = load_job_config(None, ["parallel.engine=zero2", f"parallel.deepspeed_config={user}"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        preflight(cfg, 2)
    cfg = load_job_config(None, ["parallel.engine=zero2", f"parallel.deepspeed_config={tmp_path / 'none.json'}"])
    with pytest.raises(ConfigError, match="file not found"):
        preflight(cfg, 2)


def test_compile_with_a_zero_engine():
    pytest.importorskip("deepspeed")
    with pytest.raises(ConfigError, match="training.compile=true is supported with"):
        preflight(load_job_config(None, ["parallel.engine=zero2", "training.compile=true"]), 2)


def test_engine_none_on_several_processes_and_auto_on_any():
    with pytest.raises(ConfigError, match="parallel.engine=none cannot run 4 processes"):
        preflight(load_job_config(None, ["parallel.engine=none"]), 4)
    for world in (1, 2):  # quickstart: global batch 8 = micro 4 × 2 ranks (× accumulation 1 or 2)
        preflight(load_job_config(None, []), world)


def test_every_rule_raises_only_user_errors():
    """The rules are plain functions of (cfg, world_size); a rule may only raise a UserError."""
    cfg = load_job_config(None, [])
    for rule in RULES:
        try:
            rule(cfg, 3)  # quickstart's global batch 8 does not split over 3 ranks × micro 4
        except UserError:
            pass


@pytest.mark.parametrize("visible, local, refused", [(1, 8, False), (8, 8, False), (2, 4, True), (0, 1, False)])
def test_gpus_per_node(monkeypatch, visible, local, refused):
    """One GPU per process (srun --gpus-per-task=1) or one per rank of the node is fine; 2 GPUs for 4 processes
    is not (two ranks would share one under nccl)."""
    import torch

    from dora_dist.preflight import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    cfg = load_job_config(None, [])
    if refused:
        with pytest.raises(ConfigError, match=f"{local} processes on this node but {visible} CUDA GPU"):
            check_device(cfg, local)
    else:
        check_device(cfg, local)


@pytest.mark.parametrize(
    "rule, overrides, fragment",
    [
        ("check_engine_choice", ["parallel.engine=megatron"], "parallel.engine: expected one of"),
        ("check_logger_choice", ["output.loggers=[jsonl,mlflow]"], "unknown logger"),
        (
            "check_fsdp2_quant_storage",
            ["parallel.engine=fsdp2", "quantization.mode=nf4", "quantization.quant_storage=bfloat16"],
            "quant_storage",
        ),
    ],
)
def test_rules_on_engines_and_loggers_live_here_and_run_on_load(monkeypatch, rule, overrides, fragment):
    """The config rules that read the engine registry and the loggers are preflight's (config is a leaf); the
    loader runs them, so load_config refuses what it refused before. Without the registration it would not."""
    from dora_dist import config
    from dora_dist import preflight as module

    assert getattr(module, rule) in module.LOAD_RULES
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)
    monkeypatch.setattr(config, "_LOAD_RULES", [r for r in config._LOAD_RULES if r is not getattr(module, rule)])
    load_config(None, overrides)
