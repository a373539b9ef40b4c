"""The tied-embeddings job shared by the modules_to_save tests (tests/ is on sys.path through its conftest)."""

from __future__ import annotations

import torch

#: engine -> dtype: DeepSpeed's ZeRO optimizers take fp32 adapters (no fp64 flattening), the others fp64
ENGINES = {"fsdp2": "float64", "ddp": "float64", "zero2": "float32", "zero3": "float32"}


def tied_overrides(cache, dtype: str = "float64") -> list[str]:
    """The built-in tiny Llama with lm_head tied to the input embeddings, lm_head trained in full (2 short steps)."""
    return [
        f"model.cache_dir={cache}",
        "model.config.tie_word_embeddings=true",
        "dora.modules_to_save=[lm_head]",
        "data.seq_len=32",
        "data.synthetic_samples=64",
        "training.max_steps=2",
        "training.global_batch_size=4",
        "training.micro_batch_size=2",
        "training.lr=1e-2",
        "training.warmup_steps=0",
        "output.progress_bar=false",
        "output.plot=false",
        "checkpoint.resume=none",
        "checkpoint.every_steps=0",
        f"model.dtype={dtype}",
        f"dora.adapter_dtype={dtype}",
        "training.precision=fp32",
    ]


def probe_ids() -> torch.Tensor:
    """Fixed token ids the trained model and peft's reload are compared on."""
    return torch.randint(3, 800, (2, 24), generator=torch.Generator().manual_seed(7))


def peft_logits(adapter_dir, dtype: torch.dtype) -> torch.Tensor:
    """Logits of the base (tied) model with the saved adapter loaded by peft (PeftModel.from_pretrained)."""
    import json
    import warnings
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    assert base.lm_head.weight is base.model.embed_tokens.weight  # the base is tied, as trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's ensure_weight_tying notice
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=probe_ids()).logits
