"""`dora-dist merge` writes a model that plain transformers loads, with the logits of base + adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dora_dist.config import load_config
from dora_dist.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, builtin_cache):
    from dora_dist.train import train

    out = tmp_path_factory.mktemp("run")
    train(
        load_config(
            ROOT / "configs" / "quickstart.yaml",
            [
                "training.max_steps=3",
                "training.lr=2e-2",
                "training.warmup_steps=0",
                "data.synthetic_samples=200",
                "data.seq_len=64",
                "output.progress_bar=false",
                f"model.cache_dir={builtin_cache}",
                f"output.dir={out}",
                "checkpoint.every_steps=0",
            ],
        )
    )
    return out


def test_outputs_written(trained):
    recs = read_metrics(trained)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes"} <= recs[0].keys()
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "loss.png", "config.yaml"):
        assert (trained / name).is_file(), name
    saved = load_config(trained / "config.yaml")  # the config as given: never rewritten by the run
    assert saved.training.max_steps == 3 and saved.training.global_batch_size == 8 and saved.training.grad_accum == 1
    import json

    batching = json.loads((trained / "summary.json").read_text())["batching"]  # what the run resolved
    assert batching == {"micro_batch_size": 4, "grad_accum": 2, "world_size": 1, "max_steps": 3, "global_batch_size": 8}


def test_merge_loads_in_transformers_and_matches(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dora_dist.adapters import load_adapter
    from dora_dist.cli import main

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained / "adapter"), "--out", str(merged_dir)]) == 0
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(merged_dir)
    import json

    from dora_dist.generate import training_config
    from dora_dist.models import resolve_base

    base_name = json.loads((trained / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_name == "builtin:tiny-llama"  # portable: resolved on each machine
    base_path = resolve_base(base_name, training_config(trained / "adapter")["model"]["cache_dir"])
    adapted = load_adapter(AutoModelForCausalLM.from_pretrained(base_path), trained / "adapter")
    base = AutoModelForCausalLM.from_pretrained(base_path)
    ids = tok("17 + 5 = 22 .\ncount from 3 : 3 4 5", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
