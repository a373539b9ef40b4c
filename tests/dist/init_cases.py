"""The jobs of the same-initial-adapter test (review bug: FSDP2 with a 4-bit base drew lora_A in another order)."""

from __future__ import annotations

# (name, engine, quantization) — ZeRO-3 refuses 4-bit bases by design
CASES = [
    ("ddp", "ddp", "none"),
    ("fsdp2", "fsdp2", "none"),
    ("zero2", "zero2", "none"),
    ("zero3", "zero3", "none"),
    ("ddp_nf4", "ddp", "nf4"),
    ("fsdp2_nf4", "fsdp2", "nf4"),
    ("zero2_nf4", "zero2", "nf4"),
]


def overrides(cache: str, quant: str) -> list[str]:
    """The reported case: r=4 on q_proj, v_proj, down_proj (a target order unlike the module order), seed 7."""
    out = [
        f"model.cache_dir={cache}",
        "data.seq_len=64",
        "data.synthetic_samples=200",
        "training.max_steps=2",
        "training.global_batch_size=4",
        "training.micro_batch_size=2",
        "training.seed=7",
        "dora.r=4",
        "dora.target_modules=[q_proj,v_proj,down_proj]",
        "output.progress_bar=false",
        "output.plot=false",
        "checkpoint.resume=none",
    ]
    if quant != "none":
        out += [f"quantization.mode={quant}", "quantization.compute_dtype=float32"]
    return out
