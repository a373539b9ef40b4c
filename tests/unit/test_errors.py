"""Bad input gives clear errors that name the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapters import Toy
from torch import nn

from dora_dist import DoRAConfig, DoRALinear, apply_dora, load_adapter, save_adapter


@pytest.mark.parametrize("r", [0, -3, 2.5, True])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=r"\br\b.*positive integer"):
        DoRAConfig(r=r)
    with pytest.raises(ValueError, match="positive integer"):
        DoRALinear(nn.Linear(4, 4), r=r if r is not True else 0, alpha=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(target_modules=[]), "target_modules"),
        (dict(adapter_dtype="int8"), "adapter_dtype"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DoRAConfig(**kwargs)


def test_unknown_target_modules_lists_what_exists():
    with pytest.raises(ValueError) as err:
        apply_dora(Toy(), DoRAConfig(target_modules=["q_proj", "qkv_proj"]))
    msg = str(err.value)
    assert "qkv_proj" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"):
        assert name in msg


def test_unmatched_regex_lists_what_exists():
    with pytest.raises(ValueError) as err:
        apply_dora(Toy(), DoRAConfig(target_modules=r".*\.gate_proj"))
    assert "gate_proj" in str(err.value) and "q_proj" in str(err.value)


def test_unsupported_base_type():
    with pytest.raises(TypeError, match="Embedding"):
        apply_dora(Toy(), DoRAConfig(target_modules=["embed"]))
    with pytest.raises(TypeError, match="Conv2d"):
        DoRALinear(nn.Conv2d(3, 3, 1), r=2, alpha=2)
    with pytest.raises(TypeError, match="LayerNorm"):
        apply_dora(Toy(), DoRAConfig(target_modules=[r"norm"]))


def test_model_without_supported_layers():
    model = nn.Sequential(nn.Embedding(3, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no linear layer"):
        apply_dora(model, DoRAConfig(target_modules="all-linear"))


@pytest.fixture
def saved(tmp_path):
    model = apply_dora(Toy(), DoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    return save_adapter(model, tmp_path / "ad")


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(Toy(), tmp_path / "nope")


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_adapter_dir_missing_a_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_adapter(Toy(), saved)


def test_pickle_only_adapter_dir_refused_without_unpickling(saved, monkeypatch):
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.bin").write_bytes(b"not even a pickle")

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load must not be called on an adapter")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(ValueError, match="safetensors"):
        load_adapter(Toy(), saved)


def test_wrong_shape_names_key_and_both_shapes(saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.layers.1.attn.q_proj.lora_B.weight"
    assert tensors[key].shape == (16, 4)
    tensors[key] = torch.zeros(16, 3)
    save_file(tensors, str(path))
    with pytest.raises(ValueError) as err:
        load_adapter(Toy(), saved)
    msg = str(err.value)
    assert key in msg and "(16, 3)" in msg and "(16, 4)" in msg


def test_missing_tensor_named(saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.layers.0.attn.q_proj.lora_magnitude_vector"
    del tensors[key]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_adapter(Toy(), saved)


def test_adapter_for_absent_module(saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="layers.7.attn.q_proj"):
        load_adapter(Toy(), saved)


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"peft_type": "IA3"}, "peft_type"),
        ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
        ({"use_dora": False}, "use_dora"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"bias": "all"}, "bias"),
    ],
)
def test_non_dora_config_refused(saved, patch, match):
    path = saved / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(patch)
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_adapter(Toy(), saved)


def test_invalid_json_config(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_adapter(Toy(), saved)


def test_save_without_dora_layers(tmp_path):
    with pytest.raises(ValueError):
        save_adapter(Toy(), tmp_path, config=DoRAConfig())


def test_unquantized_4bit_base_refused():
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear4bit(64, 8, quant_type="nf4")  # not moved to a device yet: not quantized
    assert base.weight.quant_state is None
    with pytest.raises(ValueError, match="not quantized"):
        DoRALinear(base, r=2, alpha=2)
