"""Config: defaults, YAML + dotted overrides, validation errors that name the key, every shipped config valid."""

from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import fields
from pathlib import Path

import pytest

from dora_dist import DoRAConfig
from dora_dist.config import Config, ConfigError, ModelConfig, config_from_dict, identity_keys, load_config, valid_keys
from dora_dist.errors import SettingError

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


# --- the adapter settings: one dataclass ---------------------------------------------------------------------------
def test_the_job_dora_section_is_the_library_doraconfig():
    from dora_dist.config_keys import describe_keys
    from dora_dist.models import dora_config_from

    cfg = load_config(
        None, ["dora.r=4", "dora.alpha=8", "dora.target_modules=[q_proj, v_proj]", "dora.use_rslora=true"]
    )
    assert type(cfg.dora) is DoRAConfig
    assert cfg.dora == DoRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], use_rslora=True)
    assert cfg.dora.scaling == pytest.approx(8 / 4**0.5)  # the library's own property: alpha/√r with rsLoRA
    assert dora_config_from(cfg) is cfg.dora  # nothing copied field by field
    # every field is a job key (dora.<field>) with its `#:` doc for `dora-dist keys`
    dora_keys = [k.split(".", 1)[1] for k in valid_keys() if k.startswith("dora.")]
    assert dora_keys == [f.name for f in fields(DoRAConfig)]
    docs = {k["key"]: k["doc"] for k in describe_keys()}
    assert all(docs[f"dora.{f.name}"] for f in fields(DoRAConfig)), docs


@pytest.mark.parametrize(
    "name, value, override",
    [
        ("r", 0, "dora.r=0"),
        ("alpha", -1.0, "dora.alpha=-1"),
        ("dropout", 1.0, "dora.dropout=1.0"),
        ("target_modules", [], "dora.target_modules=[]"),
        ("modules_to_save", [1], "dora.modules_to_save=[1]"),
    ],
)
def test_adapter_settings_are_validated_once_for_library_and_job(name, value, override):
    """One check (DoRAConfig.__post_init__): the library gets it as a ValueError naming DoRAConfig.<field>, the job
    config as a ConfigError naming dora.<field>, with the same words."""
    with pytest.raises(SettingError) as lib:
        DoRAConfig(**{name: value})
    assert isinstance(lib.value, ValueError) and lib.value.name == name
    assert str(lib.value) == f"DoRAConfig.{name} {lib.value.problem}"
    with pytest.raises(ConfigError) as job:
        load_config(None, [override])
    assert str(job.value) == f"dora.{name} {lib.value.problem}"


def test_identity_keys_come_from_field_metadata(monkeypatch):
    from dora_dist.run_state import IDENTITY_KEYS

    assert IDENTITY_KEYS == identity_keys()
    marked = [f"dora.{f.name}" for f in fields(DoRAConfig) if f.metadata.get("identity")]
    assert marked == [k for k in IDENTITY_KEYS if k.startswith("dora.")]
    # the keys that defined a run before they were read from metadata, unchanged
    assert set(IDENTITY_KEYS) == {
        "model.name_or_path", "model.config", "model.revision", "model.dtype", "quantization.mode",
        "quantization.double_quant", "dora.r", "dora.alpha", "dora.target_modules", "dora.use_rslora",
        "dora.use_dora", "dora.adapter_dtype", "dora.modules_to_save", "data.source", "data.format",
        "data.text_field", "data.prompt_field", "data.completion_field", "data.messages_field", "data.split",
        "data.subset", "data.seq_len", "data.packing", "data.max_samples", "data.synthetic_samples", "data.add_eos",
        "data.eval_fraction", "training.seed", "training.global_batch_size",
    }  # fmt: skip
    # marking a field is all it takes for a new option to define the run
    dropout = DoRAConfig.__dataclass_fields__["dropout"]
    monkeypatch.setattr(dropout, "metadata", types.MappingProxyType({"identity": True}))
    assert "dora.dropout" in identity_keys() and "dora.dropout" not in IDENTITY_KEYS


def test_builds_from_scratch_is_one_rule():
    assert ModelConfig(name_or_path="org/model", config={"model_type": "llama"}).builds_from_scratch
    assert not ModelConfig(config={"hidden_size": 64}).builds_from_scratch  # reshapes the built-in model
    assert not ModelConfig(name_or_path="org/model").builds_from_scratch
    with pytest.raises(ConfigError, match="needs a 'model_type' key"):
        load_config(None, ["model.name_or_path=org/model", "model.config.hidden_size=64"])


def test_a_job_refuses_float16_adapters_the_library_accepts():
    assert DoRAConfig(adapter_dtype="float16").adapter_dtype == "float16"  # e.g. a peft adapter saved in fp16
    with pytest.raises(ConfigError, match="dora.adapter_dtype=float16"):
        load_config(None, ["dora.adapter_dtype=float16"])
