"""ZeRO engines without processes: the generated DeepSpeed JSON, user-JSON conflicts, the partition row-norm math,
and the ZeRO-3 refusal of 4-bit bases."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dora_dist.config import config_from_dict
from dora_dist.parallel.zero import partial_row_sq_norms
from dora_dist.parallel.zero_config import DeepSpeedConfigError, build_ds_config, describe, generated_config


def cfg_of(**sections):
    return config_from_dict(sections)


# --- generated config --------------------------------------------------------------------------------------
def test_generated_config_follows_our_config():
    cfg = cfg_of(training={"micro_batch_size": 2, "grad_accum": 3, "max_grad_norm": 0.7})
    ds = build_ds_config(cfg, world_size=4, stage=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["gradient_clipping"] == pytest.approx(0.7)
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert "optimizer" not in ds and "scheduler" not in ds  # the trainer's AdamW + LambdaLR are passed in
    assert describe(ds).startswith("ZeRO-2 micro_batch=2 accum=3")


def test_global_batch_size_gives_accumulation_and_must_divide():
    cfg = cfg_of(training={"micro_batch_size": 2, "global_batch_size": 16})
    assert build_ds_config(cfg, world_size=2, stage=3)["gradient_accumulation_steps"] == 4
    with pytest.raises(DeepSpeedConfigError, match="global_batch_size=16"):
        build_ds_config(cfg, world_size=3, stage=3)


def test_cpu_offload_maps_to_optimizer_and_zero3_param_offload():
    cfg = cfg_of(parallel={"cpu_offload": True})
    z2 = build_ds_config(cfg, 2, 2)["zero_optimization"]
    z3 = build_ds_config(cfg, 2, 3)["zero_optimization"]
    assert z2["offload_optimizer"] == {"device": "cpu"} and "offload_param" not in z2
    assert z3["offload_optimizer"] == {"device": "cpu"} and z3["offload_param"] == {"device": "cpu"}
    assert z3["stage3_gather_16bit_weights_on_model_save"] is False
    assert "offload=optimizer+param" in describe(build_ds_config(cfg, 2, 3))


def test_deepspeed_accepts_the_generated_config():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = cfg_of(training={"micro_batch_size": 2, "grad_accum": 3}, parallel={"cpu_offload": True})
    parsed = DeepSpeedConfig(build_ds_config(cfg, world_size=1, stage=3))  # no process group: world size 1
    assert parsed.train_batch_size == 6 and parsed.zero_config.stage == 3
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert parsed.gradient_clipping == 1.0 and not parsed.bfloat16_config.enabled


# --- user JSON ---------------------------------------------------------------------------------------------
def test_user_json_adds_keys_and_auto_takes_ours(tmp_path):
    user = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": False,
            "stage3_param_persistence_threshold": 0,
            "offload_optimizer": {"device": "cpu", "pin_memory": False},
        },
        "bf16": {"enabled": False},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = cfg_of(training={"micro_batch_size": 4}, parallel={"deepspeed_config": str(path)})
    ds = build_ds_config(cfg, world_size=2, stage=3)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    z = ds["zero_optimization"]
    assert z["overlap_comm"] is False and z["stage3_param_persistence_threshold"] == 0
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": False}


@pytest.mark.parametrize(
    "user, key, theirs, ours",
    [
        ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu", "8", "2"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps", "4", "1"),
        ({"train_batch_size": 64}, "train_batch_size", "64", "4"),
        ({"gradient_clipping": 0.3}, "gradient_clipping", "0.3", "1.0"),
        ({"bf16": {"enabled": True}}, "bf16.enabled", "True", "False"),
        ({"fp16": {"enabled": True}}, "fp16.enabled", "True", "False"),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage", "2", "3"),
    ],
)
def test_conflicts_name_the_key_and_both_values(user, key, theirs, ours):
    cfg = cfg_of(training={"micro_batch_size": 2})
    with pytest.raises(DeepSpeedConfigError) as err:
        build_ds_config(cfg, world_size=2, stage=3, user=user)
    msg = str(err.value)
    assert f"'{key}' is {theirs}" in msg and f"gives {ours}" in msg, msg


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_user_optimizer_or_scheduler_is_refused(section):
    with pytest.raises(DeepSpeedConfigError, match=f"'{section}' section is not supported"):
        build_ds_config(cfg_of(), 2, 2, user={section: {"type": "AdamW", "params": {}}})


def test_unreadable_user_json(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match="file not found"):
        build_ds_config(cfg_of(parallel={"deepspeed_config": str(tmp_path / "nope.json")}), 2, 2)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        build_ds_config(cfg_of(parallel={"deepspeed_config": str(bad)}), 2, 2)


def test_stage_must_be_2_or_3():
    with pytest.raises(ValueError, match="stage must be 2 or 3"):
        generated_config(cfg_of(), 2, 1)


# --- ZeRO-3 partition math -----------------------------------------------------------------------------------
def zero3_slices(numel: int, world: int) -> list[tuple[int, torch.Tensor]]:
    """(start, valid length) of each rank's slice, as DeepSpeed's Init._partition_param lays them out."""
    size = math.ceil(numel / world)
    return [(r * size, max(0, min(size, numel - r * size))) for r in range(world)]


@pytest.mark.parametrize("shape", [(7, 5), (10, 30), (75, 30), (3, 1), (1, 9), (5, 1024)])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("conv1d", [False, True])
def test_partial_row_norms_sum_to_full_row_norms(shape, world, conv1d):
    torch.manual_seed(0)
    out_f, in_f = shape
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    storage = w.t().contiguous() if conv1d else w  # Conv1D stores (in, out)
    flat = storage.reshape(-1)
    total = torch.zeros(out_f, dtype=torch.float64)
    for start, n in zero3_slices(flat.numel(), world):
        part = partial_row_sq_norms(
            flat[start : start + n], start, tuple(storage.shape), 1 if conv1d else 0, chunk_rows=2
        )
        assert part.shape == (out_f,)
        total += part
    torch.testing.assert_close(total, w.pow(2).sum(dim=1), rtol=1e-12, atol=1e-12)


def test_partial_row_norms_bf16_accumulates_in_fp32():
    w = torch.randn(6, 50).to(torch.bfloat16)
    part = partial_row_sq_norms(w.reshape(-1), 0, (6, 50), 0)
    assert part.dtype == torch.float32
    torch.testing.assert_close(part, w.float().pow(2).sum(dim=1))


# --- ZeRO-3 and 4-bit bases -------------------------------------------------------------------------------------
def test_zero3_refuses_4bit_base_and_points_to_alternatives():
    bnb = pytest.importorskip("bitsandbytes")
    from dora_dist.nn.dora_linear import DoRALinear
    from dora_dist.parallel.dist_env import DistEnv
    from dora_dist.parallel.zero import Zero2Engine, Zero3Engine

    lin = nn.Linear(64, 32, bias=False)
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")
    model = nn.Sequential(DoRALinear(q, r=2, alpha=4))
    with pytest.raises(ValueError) as err:
        Zero3Engine(cfg_of(), DistEnv()).check_model(model)
    msg = str(err.value)
    assert "zero3" in msg and "Linear4bit" in msg and "parallel.engine=zero2" in msg and "#1731" in msg
    Zero2Engine(cfg_of(), DistEnv()).check_model(model)  # ZeRO-2 keeps 4-bit bases whole: accepted


def test_zero3_refuses_quantized_loading_before_touching_the_model():
    from dora_dist.parallel.dist_env import DistEnv
    from dora_dist.parallel.zero import Zero2Engine, Zero3Engine

    cfg = cfg_of(quantization={"mode": "nf4"})
    with pytest.raises(ValueError, match="quantization.mode=nf4.*parallel.engine=zero2"):
        Zero3Engine(cfg, DistEnv()).model_init_context()
    with Zero2Engine(cfg, DistEnv()).model_init_context():  # ZeRO-2 loads the model as usual
        pass


# --- shipped ZeRO job configs -------------------------------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
ZERO_CONFIGS = sorted((ROOT / "configs").glob("*zero*.yaml"))


@pytest.mark.parametrize("path", ZERO_CONFIGS, ids=[p.name for p in ZERO_CONFIGS])
def test_shipped_zero_configs_give_a_valid_deepspeed_config(path, monkeypatch):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    from dora_dist.config import load_config

    monkeypatch.chdir(ROOT)  # parallel.deepspeed_config paths are relative to the repo root
    cfg = load_config(path)
    stage = {"zero2": 2, "zero3": 3}[cfg.parallel.engine]
    for world in (8, 16):
        if cfg.training.global_batch_size % (cfg.training.micro_batch_size * world) == 0:
            ds = build_ds_config(cfg, world_size=world, stage=stage)
            assert ds["train_batch_size"] == cfg.training.global_batch_size
    ds1 = build_ds_config(cfg, world_size=1, stage=stage)  # DeepSpeed's own parser (world size 1 without a group)
    parsed = DeepSpeedConfig(ds1)
    assert parsed.zero_config.stage == stage
    if cfg.parallel.cpu_offload:
        assert parsed.zero_config.offload_optimizer.device == "cpu"
        if stage == 3:
            assert parsed.zero_config.offload_param.device == "cpu"
    if cfg.quantization.mode != "none":
        assert stage == 2, "4-bit bases need zero2 (zero3 refuses them)"


# --- ZeRO++ hpZ from parallel.shard_group --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shard_group", "world", "local", "hpz"),
    [(0, 4, 2, 2), (2, 4, 2, 2), (4, 4, 2, 1), (0, 4, 4, 1), (0, 16, 8, 8), (2, 16, 8, 2)],
)
def test_zero3_shard_group_below_the_world_is_hpz(shard_group, world, local, hpz):
    """parallel.shard_group (0: one node's processes across nodes) sets zero_hpz_partition_size; one group over the
    world is plain ZeRO-3 (1, DeepSpeed's default); ZeRO-2 never gets the key."""
    cfg = cfg_of(training={"global_batch_size": 16, "micro_batch_size": 1}, parallel={"shard_group": shard_group})
    assert build_ds_config(cfg, world, 3, local_world=local)["zero_optimization"]["zero_hpz_partition_size"] == hpz
    assert "zero_hpz_partition_size" not in build_ds_config(cfg_of(), 4, 2, local_world=2)["zero_optimization"]


def test_zero3_node_layout_from_the_launch_environment(monkeypatch):
    """Without an explicit local_world the launch's LOCAL_WORLD_SIZE, or the deepspeed launcher's LOCAL_SIZE."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert build_ds_config(cfg_of(), 4, 3)["zero_optimization"]["zero_hpz_partition_size"] == 2
    monkeypatch.delenv("LOCAL_SIZE")
    assert build_ds_config(cfg_of(), 4, 3)["zero_optimization"]["zero_hpz_partition_size"] == 1  # one node


def test_user_json_hpz_size_must_agree_with_shard_group():
    cfg = cfg_of(parallel={"shard_group": 2})
    user = {"zero_optimization": {"zero_hpz_partition_size": 4}}
    with pytest.raises(DeepSpeedConfigError, match=r"zero_hpz_partition_size.*parallel\.shard_group"):
        build_ds_config(cfg, 4, 3, user=user, local_world=2)
    agreeing = {"zero_optimization": {"zero_hpz_partition_size": 2}}
    assert build_ds_config(cfg, 4, 3, user=agreeing, local_world=2)["zero_optimization"]["zero_hpz_partition_size"] == 2


def test_deepspeed_accepts_the_hpz_config():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = build_ds_config(cfg_of(parallel={"shard_group": 2}), 4, 3, local_world=2)
    ds.update(train_batch_size=ds["train_micro_batch_size_per_gpu"], gradient_accumulation_steps=1)  # world size 1
    parsed = DeepSpeedConfig(ds)
    assert parsed.zero_config.zero_hpz_partition_size == 2
