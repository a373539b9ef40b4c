"""Pre-quantized bitsandbytes checkpoints of the built-in tiny Llama, as users download them: the dense model loaded by
transformers with a BitsAndBytesConfig (CPU) and written back with save_pretrained (packed bytes + quant state in
the safetensors, `quantization_config` in config.json), the tokenizer beside it. Shared by the unit, integration
and dist tests (tests/ is on sys.path through its conftest)."""

from __future__ import annotations

from pathlib import Path

#: (quant_type, double_quant) combinations the tests cover
COMBOS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def combo_name(quant_type: str, double_quant: bool) -> str:
    return f"{quant_type}{'-dq' if double_quant else ''}"


def dense_dir(cache: Path) -> Path:
    """The built-in tiny Llama checkpoint (built once in `cache`)."""
    from dora_dist.config import load_config
    from dora_dist.models import ensure_builtin_model

    return Path(ensure_builtin_model(load_config(None, [f"model.cache_dir={cache}"])))


def save_prequantized(
    cache: Path,
    out: Path,
    quant_type: str,
    double_quant: bool,
    compute_dtype: str = "float32",
    quant_storage: str = "uint8",
) -> Path:
    """Quantize the tiny Llama (loaded in float32, as the on-the-fly jobs with model.dtype=float32 do) with
    transformers + bitsandbytes on the CPU and save it to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    src = dense_dir(cache)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, quant_storage),
    )
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=q, dtype=torch.float32, device_map={"": "cpu"}
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def job_overrides(cache: Path) -> list[str]:
    """A tiny, short float32 job (the same for the pre-quantized and the on-the-fly runs)."""
    return [
        f"model.cache_dir={cache}",
        "data.seq_len=32",
        "data.synthetic_samples=64",
        "training.max_steps=3",
        "training.global_batch_size=4",
        "training.micro_batch_size=2",
        "training.lr=5e-3",
        "training.warmup_steps=1",
        "output.progress_bar=false",
        "output.plot=false",
        "checkpoint.resume=none",
        "checkpoint.every_steps=0",
        "model.dtype=float32",
        "training.precision=fp32",
    ]


def on_the_fly(quant_type: str, double_quant: bool) -> list[str]:
    """The quantization section that quantizes the dense model as the pre-quantized checkpoint was."""
    return [
        f"quantization.mode={quant_type}",
        f"quantization.double_quant={str(double_quant).lower()}",
        "quantization.compute_dtype=float32",
    ]
