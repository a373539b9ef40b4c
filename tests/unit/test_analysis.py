"""`analyze`: exact ΔM/ΔD of hand-built weight changes, chunked (4-bit) bases, adapters against merged models."""

import json
import math

import pytest
import torch

from dora_dist import DoRAConfig, apply_dora, dora_layers, merge_and_unload, save_adapter
from dora_dist.analysis import analyze, correlations, dense_source, layer_change, row_change

EPS32 = torch.finfo(torch.float32).eps


def weights(out_f=24, in_f=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g, dtype=dtype)


def rotated(w: torch.Tensor, angle: float, seed: int = 1) -> torch.Tensor:
    """Every row turned by `angle` in a random plane containing it: its norm is kept and cos = cos(angle)."""
    g = torch.Generator().manual_seed(seed)
    n = w.norm(dim=1, keepdim=True)
    u = w / n
    v = torch.randn(w.shape, generator=g, dtype=w.dtype)
    v = v - (v * u).sum(dim=1, keepdim=True) * u
    v = v / v.norm(dim=1, keepdim=True)
    return n * (math.cos(angle) * u + math.sin(angle) * v)


def test_pure_rescale_has_no_direction_change():
    w = weights()
    c = torch.linspace(0.5, 2.0, w.shape[0], dtype=w.dtype)
    dm, dd = row_change(w, w * c[:, None])
    assert dd == pytest.approx(0.0, abs=1e-14)
    assert dm == pytest.approx(float(((c - 1).abs() * w.norm(dim=1)).mean()), rel=1e-12)


@pytest.mark.parametrize("angle", [0.05, 0.7, math.pi / 2])
def test_pure_rotation_has_no_magnitude_change(angle):
    w = weights()
    dm, dd = row_change(w, rotated(w, angle))
    assert dm == pytest.approx(0.0, abs=1e-12 * float(w.norm(dim=1).mean()))
    assert dd == pytest.approx(1 - math.cos(angle), rel=1e-10, abs=1e-14)


def test_sign_flip_and_zero_rows():
    w = weights(4, 8)
    w[3] = 0
    t = -w.clone()
    t[2] = 0  # a row set to zero: direction lost (cos 0); the zero row stays zero (cos 1)
    dm, dd = row_change(w, t)
    n = w.norm(dim=1)
    assert dm == pytest.approx(float(n[2]) / 4, rel=1e-12)
    assert dd == pytest.approx((2 + 2 + 1 + 0) / 4, rel=1e-12)


def test_fp32_inputs_keep_the_exact_answers():
    """fp32 rounding of the tuned weight moves rows by ~eps: ΔD ~ eps², ΔM ~ eps·‖W‖."""
    w = weights(dtype=torch.float32)
    _, dd = row_change(w, (w.double() * 3.0).float())
    assert dd < 10 * EPS32**2 * w.shape[1]
    dm, _ = row_change(w, rotated(w.double(), 0.3).float())
    assert dm < 10 * EPS32 * float(w.norm(dim=1).mean())


def test_chunked_4bit_base_matches_dense(monkeypatch):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bf

    import dora_dist.nn.weight_source as ws

    monkeypatch.setattr(ws, "CHUNK_ELEMENTS", 8 * 128)  # 8 rows of 128 per chunk: 5 chunks
    w = weights(40, 128, dtype=torch.float32)
    src = dense_source(w, quant="nf4")
    assert src.rows_per_chunk() < src.out_features
    deq = bf.dequantize_4bit(src.module.weight.data, src.module.weight.quant_state).float()
    tuned = rotated(deq.double(), 0.2) * 1.5
    chunked = layer_change("l", src, lambda _c, i, j: tuned[i:j])
    dm, dd = row_change(deq.double(), tuned)
    assert chunked.delta_m == pytest.approx(dm, rel=1e-6) and chunked.delta_d == pytest.approx(dd, rel=1e-6)
    assert dd == pytest.approx(1 - math.cos(0.2), rel=1e-6)


def test_correlation_signs():
    recs = [{"method": "a", "layer": f"l{i % 2}", "delta_m": x, "delta_d": 2 * x + 1} for i, x in enumerate(range(6))]
    recs += [{"method": "b", "layer": "l", "delta_m": x, "delta_d": -x} for x in range(4)]
    c = correlations(recs)
    assert c["a"]["pearson_r"] == pytest.approx(1.0) and c["a"]["slope"] == pytest.approx(2.0)
    assert c["a"]["within_layer_r"] == pytest.approx(1.0) and c["a"]["layers_with_r"] == 2
    assert c["b"]["pearson_r"] == pytest.approx(-1.0)


# --- adapters and checkpoints on disk -----------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(d)
    return d


def test_magnitude_only_dora_adapter_is_a_pure_rescale(base_dir, tmp_path):
    model = apply_dora(tiny_llama(), DoRAConfig(r=2, alpha=4, target_modules=["q_proj"]))
    _, layer = next(dora_layers(model))
    norms = layer.weight_norm().clone()
    with torch.no_grad():
        layer.magnitude.mul_(torch.linspace(0.8, 1.3, layer.out_features))  # B = 0: only m moves
    save_adapter(model, tmp_path / "ad")
    res = analyze(base_dir, [str(tmp_path / "ad")], verbose=False, plot=False)
    (rec,) = res["records"]
    assert rec["method"] == "dora" and rec["layer"].endswith("q_proj")
    assert rec["delta_d"] < 1e-12
    want = float((layer.magnitude.detach().double() - norms.double()).abs().mean())
    assert rec["delta_m"] == pytest.approx(want, rel=1e-5)


def test_adapter_equals_its_merged_model_and_cli_outputs(base_dir, tmp_path):
    from dora_dist.cli import main

    model = apply_dora(tiny_llama(), DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in dora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
            layer.magnitude.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=g))
    save_adapter(model, tmp_path / "dora")
    merge_and_unload(model).save_pretrained(tmp_path / "merged")
    out = tmp_path / "report"
    assert (
        main(
            [
                "analyze",
                "--base",
                str(base_dir),
                "--tuned",
                str(tmp_path / "dora"),
                f"merged={tmp_path / 'merged'}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "changes.json").read_text())
    by = {(r["method"], r["layer"]): r for r in res["records"]}
    adapted = sorted(layer for m, layer in by if m == "dora")
    assert (
        len(adapted) == 3 and sorted(layer for m, layer in by if m == "merged") == adapted
    )  # untouched layers left out
    assert res["unchanged_layers"] > 0
    for layer in adapted:
        a, b = by[("dora", layer)], by[("merged", layer)]
        assert a["delta_m"] == pytest.approx(b["delta_m"], rel=1e-4)
        assert a["delta_d"] == pytest.approx(b["delta_d"], rel=1e-4)
        assert a["delta_d"] > 1e-5 and a["delta_m"] > 1e-4
    assert (out / "changes.csv").read_text().count("\n") == 1 + 6
    assert (out / "scatter_dora.png").stat().st_size > 1000 and (out / "scatter_merged.png").is_file()


def test_gpt2_conv1d_rows_are_output_rows(tmp_path):
    """Conv1D stores (in, out): adapter, merged model and the dense reference agree on output rows."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    model = apply_dora(transformers.GPT2LMHeadModel(cfg), DoRAConfig(r=2, alpha=4, target_modules=["c_attn"]))
    _, layer = next(dora_layers(model))
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    save_adapter(model, tmp_path / "dora")
    merge_and_unload(model).save_pretrained(tmp_path / "merged")
    res = analyze(tmp_path / "base", [str(tmp_path / "dora"), f"m={tmp_path / 'merged'}"], verbose=False, plot=False)
    by = {r["method"]: r for r in res["records"] if r["layer"].endswith("c_attn")}
    assert by["dora"]["rows"] == 96 and by["m"]["rows"] == 96  # out = 3·n_embd rows, not n_embd
    w0 = load_file(str(tmp_path / "base" / "model.safetensors"))["transformer.h.0.attn.c_attn.weight"].t()
    w1 = load_file(str(tmp_path / "merged" / "model.safetensors"))["transformer.h.0.attn.c_attn.weight"].t()
    dm, dd = row_change(w0.double(), w1.double())
    for r in by.values():
        assert r["delta_m"] == pytest.approx(dm, rel=1e-4) and r["delta_d"] == pytest.approx(dd, rel=1e-4)


def test_peft_lora_adapter_on_4bit_base(base_dir, tmp_path):
    """A peft LoRA adapter against the NF4 base: W' = deq(W) + sBA, computed chunk by chunk."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bf
    from safetensors.torch import load_file

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    pm.save_pretrained(str(tmp_path / "lora"))
    (rec,) = analyze(base_dir, [str(tmp_path / "lora")], base_quant="nf4", verbose=False, plot=False)["records"]
    assert rec["method"] == "lora"
    w = load_file(str(base_dir / "model.safetensors"))["model.layers.0.self_attn.o_proj.weight"]
    src = dense_source(w, quant="nf4")
    deq = bf.dequantize_4bit(src.module.weight.data, src.module.weight.quant_state).double()
    ad = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    a = next(v for k, v in ad.items() if "lora_A" in k).double()
    b = next(v for k, v in ad.items() if "lora_B" in k).double()
    dm, dd = row_change(deq, deq + 2.0 * b @ a)
    assert rec["delta_m"] == pytest.approx(dm, rel=1e-4) and rec["delta_d"] == pytest.approx(dd, rel=1e-4)
