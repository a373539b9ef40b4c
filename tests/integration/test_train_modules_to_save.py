"""dora.modules_to_save in the trainer: the named module is trained in full next to the adapters, saved in the
adapter under peft's key, and loaded back by `dora-dist generate`; bad names are config errors naming the key.
(Every engine: tests/dist/test_eval.py trains with modules_to_save=[lm_head] under ddp, fsdp2, zero2, zero3.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dora_dist.config import ConfigError, load_config


def test_bad_values_are_config_errors(builtin_cache, tmp_path):
    with pytest.raises(ConfigError, match="dora.modules_to_save must be a list"):
        load_config(None, ["dora.modules_to_save=[1]"])
    from dora_dist.train import train

    with pytest.raises(ConfigError, match=r"dora.modules_to_save: .*\['nohead'\] match no module"):
        train(
            load_config(
                None,
                [
                    f"model.cache_dir={builtin_cache}",
                    "training.max_steps=1",
                    "dora.modules_to_save=[nohead]",
                    f"output.dir={tmp_path / 'x'}",
                    "output.progress_bar=false",
                ],
            )
        )


def test_head_trained_saved_and_loaded(builtin_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from dora_dist.generate import load_for_generation
    from dora_dist.train import train

    out = tmp_path / "run"
    train(
        load_config(
            None,
            [
                f"model.cache_dir={builtin_cache}",
                "data.seq_len=32",
                "data.synthetic_samples=60",
                "training.max_steps=2",
                "training.micro_batch_size=2",
                "training.global_batch_size=2",
                "training.lr=1e-2",
                "output.progress_bar=false",
                "output.plot=false",
                "checkpoint.resume=none",
                "dora.modules_to_save=[lm_head]",
                f"output.dir={out}",
            ],
        )
    )
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    saved = load_file(str(adapter / "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    from dora_dist.models import resolve_base

    base_dir = resolve_base(
        json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"], str(builtin_cache)
    )
    base_head = AutoModelForCausalLM.from_pretrained(base_dir).lm_head.weight.detach()
    assert saved.shape == base_head.shape
    # trained: two AdamW steps move each element by up to lr per step, most by about lr
    moved = (saved - base_head).abs()
    assert float(moved.max()) <= 2 * 1e-2 * 1.01 and float(moved.mean()) > 1e-3
    model, _ = load_for_generation(str(adapter))
    assert torch.equal(model.lm_head.weight.detach(), saved)
