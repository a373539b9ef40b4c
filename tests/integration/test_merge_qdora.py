"""QDoRA merges (bitsandbytes 4-bit on the CPU): by default the streamed merge is made against the dequantized 4-bit
weights the adapter was trained with, quantizing the dense base tensor by tensor as training's loader does, or
reading a pre-quantized checkpoint. Its weights equal the in-memory merge of the 4-bit model bit for bit, and its
logits equal the 4-bit model + adapter to fp32 rounding; `--onto original` merges into the dense weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow  # trains nothing, but loads and merges 4-bit models several times (~50 s each)

from prequant_fixture import save_prequantized  # noqa: E402

from dora_dist import DoRAConfig, apply_dora, dora_layers, save_adapter  # noqa: E402
from dora_dist.cli import main  # noqa: E402
from dora_dist.config import load_config  # noqa: E402

QUANT = [
    "quantization.mode=nf4",
    "quantization.double_quant=true",
    "quantization.compute_dtype=float32",
    "model.dtype=float32",
    "training.precision=fp32",
]


def job(cache: Path, name: str = "builtin:tiny-llama"):
    return load_config(None, [f"model.cache_dir={cache}", f"model.name_or_path={name}", *QUANT])


def adapted_4bit_model(cfg, adapter_dir: Path, base_name: str, targets=("q_proj", "v_proj", "down_proj")):
    """The 4-bit base as training loads it (models.load_model), a perturbed DoRA adapter on it, saved with the
    training config beside it (as the trainer does)."""
    from dora_dist.models import load_model

    model = apply_dora(load_model(cfg), DoRAConfig(r=4, alpha=8, target_modules=list(targets)))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # a non-trivial adapter: random A and B, magnitudes moved off ‖W‖
        for _, layer in dora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) / layer.in_features**0.5)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))
    save_adapter(model, adapter_dir, base_model_name_or_path=base_name)
    cfg.save(adapter_dir / "training_config.yaml")
    return model.eval()


def written(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in out_dir.glob("*.safetensors") for k, v in load_file(str(f)).items()}


def check_against_4bit_model(model, out_dir: Path, transpose: tuple[str, ...] = ()) -> None:
    """Adapted weights = the 4-bit layer's merged_weight (fp32), other 4-bit linears = their dequantized weights,
    bit for bit; logits = the 4-bit model + adapter's to fp32 rounding."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from dora_dist.nn.dora_linear import DoRALinear
    from dora_dist.nn.weight_source import weight_source_for

    got = written(out_dir)
    got = {k: v.t() if k.endswith(tuple(f"{t}.weight" for t in transpose)) else v for k, v in got.items()}
    n_4bit = 0
    for name, module in model.named_modules():
        if isinstance(module, DoRALinear):
            assert torch.equal(got[name + ".weight"], module.merged_weight(torch.float32)), name
        elif isinstance(module, bnb.nn.Linear4bit) and not name.endswith("base_layer"):
            assert torch.equal(got[name + ".weight"], weight_source_for(module).dense(torch.float32)), name
            n_4bit += 1
    assert n_4bit > 0
    merged = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, have = model(input_ids=ids).logits, merged(input_ids=ids).logits
    # fp32 evaluation order only (W'x against m/‖·‖ ⊙ (Wx + sBAx)): ≤ (in + r + 8)·2^-24 ≈ 3e-5 relative per linear,
    # compounded over the 3 layers' 7 linears each; 1e-3 of the logits' scale bounds it
    torch.testing.assert_close(have, want, rtol=0, atol=1e-3 * float(want.abs().max()))


def test_on_the_fly_4bit_base(tmp_path, capsys):
    cache = tmp_path / "cache"
    model = adapted_4bit_model(job(cache), tmp_path / "adapter", "builtin:tiny-llama")
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "onto its nf4 4-bit weights, as trained" in out and "verified:" in out
    check_against_4bit_model(model, tmp_path / "merged")
    # the report: per weight and in logits, against the merge onto the original weights (both > 0: NF4 moves W)
    rel = float(out.split("differ by up to ")[1].split(" ")[0])
    diff = float(out.split("merged onto original| = ")[1].split(" ")[0])
    assert 1e-3 < rel < 0.5 and diff > 0, out
    # --verify's end-to-end line: the merged model against the 4-bit model + adapter (fp32 evaluation order only)
    unmerged = float(out.split("max |merged − (base + adapter)| = ")[1].split(" ")[0])
    effect = float(out.split("max |merged − (base + adapter)| = ")[1].split("up to ")[1].split(")")[0])
    assert unmerged < 1e-3 * effect, out
    adapter, original = str(tmp_path / "adapter"), str(tmp_path / "original")
    assert main(["merge", "--adapter", adapter, "--out", original, "--onto", "original"]) == 0
    orig = written(tmp_path / "original")
    from transformers import AutoModelForCausalLM

    from dora_dist.adapters import load_adapter, merge_and_unload
    from dora_dist.models import resolve_base

    dense = AutoModelForCausalLM.from_pretrained(resolve_base("builtin:tiny-llama", str(cache)))
    expected = merge_and_unload(load_adapter(dense, tmp_path / "adapter")).state_dict()
    for name, want in expected.items():
        assert torch.equal(orig[name], want), name


def test_prequantized_base(tmp_path, capsys):
    cache = tmp_path / "cache"
    base = save_prequantized(cache, tmp_path / "prequantized", "nf4", True)
    model = adapted_4bit_model(job(cache, str(base)), tmp_path / "adapter", str(base))
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), "--verify"]) == 0
    got = written(tmp_path / "merged")
    assert not any(k.endswith(("absmax", "quant_map")) or "quant_state" in k for k in got)
    assert all(t.dtype == torch.float32 for t in got.values())
    import json

    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    check_against_4bit_model(model, tmp_path / "merged")
    capsys.readouterr()
    assert (
        main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "o"), "--onto", "original"]) == 2
    )
    assert "holds no original weights" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_gpt2_conv1d_4bit_base(tmp_path):
    """GPT-2's Conv1D weights are stored (in, out): transformers transposes them before quantizing, so the merge
    does too, and writes the merged weight back as (in, out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    cfg = load_config(None, [f"model.name_or_path={tmp_path / 'gpt2'}", *QUANT])
    model = adapted_4bit_model(cfg, tmp_path / "adapter", str(tmp_path / "gpt2"), ["c_attn", "c_fc"])
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), "--verify"]) == 0
    check_against_4bit_model(model, tmp_path / "merged", transpose=("c_attn", "c_fc", "c_proj"))
