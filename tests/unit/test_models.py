"""Models: the built-in tiny Llama is deterministic; every shipped config's model builds on the meta device from
embedded architecture numbers (no download) and takes DoRA on all linear layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dora_dist import models
from dora_dist.adapters import apply_dora, dora_layers
from dora_dist.config import load_config
from dora_dist.parallel import ENGINES, resolve_engine_name
from dora_dist.parallel.dist_env import DistEnv

ROOT = Path(__file__).resolve().parents[2]
REAL_CONFIGS = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if p.name != "quickstart.yaml"]


def test_builtin_model_is_deterministic(tmp_path):
    a = load_config(None, [f"model.cache_dir={tmp_path / 'a'}"])
    b = load_config(None, [f"model.cache_dir={tmp_path / 'b'}"])
    ma, mb = models.load_model(a), models.load_model(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ta, tb = models.load_tokenizer(a), models.load_tokenizer(b)
    text = "count from 7 : 7 8 9 10 .\nthe capital of peru is lima ."
    assert ta(text)["input_ids"] == tb(text)["input_ids"]
    assert ma.config.vocab_size >= len(ta) and ma.config.vocab_size % 64 == 0
    # the built-in tokenizer has pad/eos and a chat template
    assert ta.pad_token_id is not None and ta.eos_token_id is not None
    rendered = ta.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n")
    # a second load reuses the cached files
    assert models.builtin_model_dir(a) == models.builtin_model_dir(
        load_config(None, [f"model.cache_dir={tmp_path / 'a'}"])
    )


def test_builtin_architecture_override(tmp_path):
    cfg = load_config(
        None,
        [
            f"model.cache_dir={tmp_path}",
            "model.config.num_hidden_layers=1",
            "model.config.hidden_size=64",
            "model.config.num_attention_heads=2",
            "model.config.intermediate_size=96",
        ],
    )
    m = models.load_model(cfg)
    assert m.config.num_hidden_layers == 1 and m.config.hidden_size == 64


def test_from_scratch_config_needs_model_type():
    from dora_dist.config import ConfigError

    with pytest.raises(ConfigError, match="model_type"):
        load_config(None, ["model.name_or_path=some/model", "model.config.hidden_size=64"])


def _dora_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=[p.name for p in REAL_CONFIGS])
def test_real_job_configs_build_on_meta(path):
    cfg = load_config(path)
    arch = models.known_architecture(cfg.model.name_or_path)
    assert arch is not None, f"{path.name}: no embedded architecture for {cfg.model.name_or_path}"
    config = models.model_config(cfg)
    model = models.build_on_meta(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    apply_dora(model, models.dora_config_from(cfg), init_magnitude=False)
    layers = dict(dora_layers(model))
    assert len(layers) == 7 * config.num_hidden_layers  # q k v o gate up down
    assert "lm_head" not in layers
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    r = cfg.dora.r
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out)
    expected = config.num_hidden_layers * sum(r * (a + b) + b for a, b in shapes)
    assert _dora_params(model) == expected
    total = sum(p.numel() for p in model.parameters())
    billions = {"llama-3.1-8b.json": 8.03e9, "llama-3.1-70b.json": 70.6e9}[
        models.KNOWN_ARCHITECTURES[cfg.model.name_or_path]
    ]
    assert total - expected == pytest.approx(billions, rel=0.01)
    # the engine named by the config exists (or is registered by an optional helper module)
    name = resolve_engine_name(cfg, DistEnv(world_size=8))
    if name not in ENGINES:
        pytest.skip(f"engine {name!r} is not registered in this checkout")
    if cfg.quantization.mode != "none":
        q = models.quantization_config(cfg)
        assert q.load_in_4bit or q.load_in_8bit
    # global batch is consistent with the micro-batch
    t = cfg.training
    assert t.global_batch_size % t.micro_batch_size == 0


def test_quantization_config_for_nf4():
    cfg = load_config(None, ["quantization.mode=nf4", "quantization.compute_dtype=float32"])
    q = models.quantization_config(cfg)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.float32
    assert models.quantization_config(load_config()) is None


@pytest.mark.parametrize(
    "overrides, key, named",
    [
        (["dora.target_modules=[q_proj, zz_proj]"], "dora.target_modules", "['zz_proj'] match no module"),
        (["dora.target_modules=[q_proj]", "dora.modules_to_save=[nohead]"], "dora.modules_to_save", "['nohead']"),
        (["dora.target_modules=[q_proj]", "dora.modules_to_save=[q_proj]"], "dora.modules_to_save", "DoRA targets"),
    ],
)
def test_add_adapters_names_the_setting_the_model_does_not_fit(overrides, key, named):
    """The key comes from the error's setting (SettingError.name), not from the wording of its message."""
    from torch import nn

    from dora_dist.errors import ConfigError

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.head = nn.Linear(8, 8), nn.Linear(8, 4)

    with pytest.raises(ConfigError) as err:
        models.add_adapters(Toy(), load_config(None, ["dora.r=2", *overrides]))
    assert str(err.value).startswith(f"{key}: ") and named in str(err.value)
