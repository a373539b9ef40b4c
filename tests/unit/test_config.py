"""Config: defaults, YAML + dotted overrides, validation errors that name the key, every shipped config valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dora_dist.config import Config, ConfigError, config_from_dict, load_config, valid_keys

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_are_the_quickstart():
    cfg = load_config()
    assert cfg.model.name_or_path == "builtin:tiny-llama"
    assert cfg.data.source == "synthetic"
    assert cfg.dora.target_modules == "all-linear"
    assert cfg.parallel.engine == "auto"


def test_dotted_overrides_and_coercion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  lr: 1.0e-4\n  micro_batch_size: 2\ndora:\n  r: 4\n")
    cfg = load_config(
        f,
        [
            "training.lr=1e-3",
            "dora.target_modules=[q_proj, v_proj]",
            "training.precision=bf16",
            "model.config.hidden_size=64",
            "checkpoint.every_steps=10",
            "training.gradient_checkpointing=true",
        ],
    )
    assert cfg.training.lr == pytest.approx(1e-3)  # "1e-3" is a YAML string: coerced to float
    assert cfg.training.micro_batch_size == 2 and cfg.dora.r == 4
    assert cfg.dora.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.precision == "bf16" and cfg.training.gradient_checkpointing is True
    assert cfg.model.config == {"hidden_size": 64}


def test_round_trip_yaml(tmp_path):
    cfg = load_config(None, ["training.lr=3e-4", "data.seq_len=64"])
    cfg.save(tmp_path / "r.yaml")
    again = load_config(tmp_path / "r.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training.lrr=1", "valid keys in section 'training'"),
        ("trainingg.lr=1", "valid keys in the top level"),
        ("training.lr=abc", "training.lr: expected a number"),
        ("training.lr=-1", "training.lr: must be > 0"),
        ("training.micro_batch_size=2.5", "training.micro_batch_size: expected an integer"),
        ("dora.r=0", "dora.r must be a positive integer, got 0"),
        ("dora.dropout=1.5", "dora.dropout must be in [0, 1), got 1.5"),
        ("training.precision=fp8", "training.precision: expected one of"),
        ("parallel.engine=megatron", "parallel.engine: expected one of"),
        ("quantization.mode=nf3", "quantization.mode"),
        ("training.gradient_checkpointing=maybe", "training.gradient_checkpointing: expected a boolean"),
        ("data=3", "data: expected a mapping"),
        ("training.lr", "not of the form"),
    ],
)
def test_validation_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"dora": {"rank": 8}})
    msg = str(err.value)
    assert "dora.rank" in msg and "r, alpha, dropout, target_modules" in msg


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


def test_valid_keys_cover_sections():
    keys = valid_keys()
    assert "training.lr" in keys and "parallel.cpu_offload" in keys and "checkpoint.keep_last" in keys


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


@pytest.mark.slow  # spawns the CLI
def test_cli_reports_config_errors():
    proc = subprocess.run(
        [sys.executable, "-m", "dora_dist.cli", "train", "training.lrr=1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "training.lrr" in proc.stderr and "valid keys" in proc.stderr


@pytest.mark.slow  # spawns the CLI
def test_cli_without_arguments_prints_help():
    proc = subprocess.run(
        [sys.executable, "-m", "dora_dist.cli"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0
    assert "train" in proc.stdout and "merge" in proc.stdout


def test_no_config_is_the_quickstart_file():
    from dora_dist.config import load_job_config

    assert load_job_config(None) == load_config(ROOT / "configs" / "quickstart.yaml")
    assert load_job_config(None, ["training.max_steps=5"]).training.max_steps == 5
