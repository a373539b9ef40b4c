"""bf16 training keeps DoRA's magnitude at work (issue 21), through the trainer and in a magnitude-only run.

1. The quickstart, fp32 and bf16 (`training.precision=bf16`: bf16 base, fp32 adapters), same seed and data, a few
   steps through `python -m dora_dist.train`: the magnitudes' updates Δm = m − ‖W‖ agree in direction
   (cos ≥ 0.98) and size (‖Δm_bf16‖ / ‖Δm_fp32‖ within 5%). Why these bounds: AdamW's first updates are
   ≈ −lr·sign(dL/dm) per element, whatever the gradient's scale, so the two runs differ only where bf16 rounding
   flips the sign of a gradient component that is within its rounding noise (a few 2^-8 relative). Each flipped
   element of k costs about 2/k of the cosine; 0.98 allows 1% of them to flip (0.5% do here), and the size, a
   sum of equal-sized steps, moves by at most that fraction.
2. Only the magnitude trains (A and B frozen, B ≠ 0 as after some training, m = ‖W + sBA‖ so every scale starts at
   exactly 1): lr 2e-4 keeps |Δm|/m below bf16's half-ulp at 1 (2^-9) for the whole run. The loss must fall in bf16
   as in fp32: drop ratio within [0.8, 1.2]. The bf16 losses carry rounding noise of about 3e-4 here (their
   difference from the fp32 losses at the same step) against a drop of ~1e-2 over the run, so the ratio's noise is
   ~5%: the bound is 4σ. Before the fix the bf16 loss did not move (ratio 0.03): every scale rounded to 1.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dora_dist import DoRAConfig, apply_dora, dora_layers

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def magnitude_updates(run_dir: Path, base_weights: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """All layers' m − ‖W‖ (W in the run's base dtype, norm in fp32, as the trainer initialises m), concatenated."""
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    parts = []
    for key in sorted(adapter):
        if ".lora_magnitude_vector" not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]
        m0 = base_weights[name + ".weight"].to(dtype).float().norm(dim=1)
        parts.append(adapter[key].float() - m0)
    assert parts, "the adapter holds no magnitudes"
    return torch.cat(parts)


def test_quickstart_bf16_magnitude_updates_match_fp32(tmp_path):
    from dora_dist import models
    from dora_dist.config import load_config

    overrides = [
        "training.max_steps=3",
        "data.seq_len=64",
        "training.global_batch_size=4",
        "training.micro_batch_size=4",
        "checkpoint.every_steps=1000",
    ]
    for precision in ("fp32", "bf16"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "dora_dist.train",
                "--config",
                "configs/quickstart.yaml",
                *overrides,
                f"training.precision={precision}",
                f"output.dir={tmp_path / precision}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"), [])
    base = load_file(str(Path(models.resolve_model_path(cfg)) / "model.safetensors"))
    d32 = magnitude_updates(tmp_path / "fp32", base, torch.float32)
    d16 = magnitude_updates(tmp_path / "bf16", base, torch.bfloat16)
    assert d32.abs().mean() > 1e-3, "the magnitudes did not train in fp32"
    cos = float(d16 @ d32 / (d16.norm() * d32.norm()))
    size = float(d16.norm() / d32.norm())
    assert cos >= 0.98, f"bf16 magnitude updates point elsewhere: cos {cos:.4f}"
    assert 0.95 <= size <= 1.05, f"bf16 magnitude updates have another size: ratio {size:.4f}"


def tiny_llama_with_trained_looking_adapter() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dora_dist.models.builtin import TINY_LLAMA

    arch = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, **arch))
    apply_dora(model, DoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in dora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.015)
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)
    return model


def magnitude_only_losses(model: torch.nn.Module, dtype: torch.dtype, ids: torch.Tensor, steps: int) -> list[float]:
    model = copy.deepcopy(model)
    for name, p in model.named_parameters():
        if "lora_" not in name and "magnitude" not in name:
            p.data = p.data.to(dtype)
    for _, layer in dora_layers(model):
        layer.invalidate_cache()
        layer.init_magnitude()  # m = ‖W + sBA‖ in the base's dtype: every scale exactly 1
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dim() == 1 for p in params), "only the magnitudes train"
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        losses.append(model(ids, labels=ids).loss.item())
    with torch.no_grad():
        worst = max(
            float(((layer.magnitude - layer.weight_norm()).abs() / layer.weight_norm()).max())
            for _, layer in dora_layers(model)
        )
    assert worst < 2**-9, f"|Δm|/m reached {worst:.2e}: the case must stay below bf16's half-ulp at 1"
    return losses


def test_magnitude_only_bf16_run_moves_the_loss_as_fp32():
    model = tiny_llama_with_trained_looking_adapter()
    ids = torch.randint(0, 1024, (4, 32), generator=torch.Generator().manual_seed(2))
    fp32 = magnitude_only_losses(model, torch.float32, ids, steps=4)
    bf16 = magnitude_only_losses(model, torch.bfloat16, ids, steps=4)
    drop32, drop16 = fp32[0] - fp32[-1], bf16[0] - bf16[-1]
    assert drop32 > 3e-3, f"the fp32 run must move the loss for the comparison to mean anything: {fp32}"
    ratio = drop16 / drop32
    assert 0.8 <= ratio <= 1.2, f"bf16 loss fell {drop16:.2e} where fp32 fell {drop32:.2e} (ratio {ratio:.3f})"
