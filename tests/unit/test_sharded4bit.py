"""Sharded4bitTensor: the row-wise re-layout of bitsandbytes 4-bit weights (issue 6, stage 1).

Numerics are compared bit for bit (torch.equal) with a hand decode of bitsandbytes' format
(`reference_dequantize_4bit`, the same on every CPU) for nf4 and fp4, with and without double quantization,
including shapes whose quantization blocks (and 256-block double-quant groups) straddle rows, and for every row
split: a row range must dequantize on its own to the same rows. bitsandbytes' own dequantize_4bit is compared too
where its CPU kernels decode the format exactly (in_features a multiple of the block size; on AVX512 CPUs
bitsandbytes 0.50 decodes other shapes differently).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402
from _dora_helpers import bnb_kernels_agree, reference_dequantize_4bit  # noqa: E402

from dora_dist.nn.dora_linear import DoRALinear  # noqa: E402
from dora_dist.nn.weight_source import weight_source_for  # noqa: E402
from dora_dist.quant.sharded4bit import Sharded4bitTensor  # noqa: E402
from dora_dist.quant.sharded4bit_linear import ShardedLinear4bit, packed_bytes  # noqa: E402
from dora_dist.quant.sharded4bit_source import Sharded4bitWeight  # noqa: E402

SHAPES = [(32, 128), (24, 96), (10, 6), (64, 40), (48, 512), (7, 64)]


def _bnb_pair(shape, quant_type, double_quant, dtype, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g).to(dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    return w, packed, qs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_bit_exact_vs_bnb(shape, quant_type, double_quant, dtype):
    _, packed, qs = _bnb_pair(shape, quant_type, double_quant, dtype)
    ref = reference_dequantize_4bit(packed, qs, dtype)
    t = Sharded4bitTensor.from_bnb(packed, qs)
    assert t.dtype == dtype and tuple(t.shape) == shape
    assert torch.equal(t.dequantize(), ref)
    if bnb_kernels_agree(shape[1]):
        assert torch.equal(t.dequantize(), bnbf.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("shape,blocksize", [((24, 96), 64), ((48, 512), 64), ((30, 40), 128), ((64, 64), 256)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_every_row_range_is_self_contained(shape, blocksize, double_quant):
    """Blocks never straddle a shard: any row split dequantizes to the same rows as the whole tensor."""
    _, packed, qs = _bnb_pair(shape, "nf4", double_quant, torch.float32, blocksize)
    ref = reference_dequantize_4bit(packed, qs)
    t = Sharded4bitTensor.from_bnb(packed, qs)
    for parts in (2, 3, 6):
        if shape[0] % parts:
            continue
        chunks = torch.chunk(t, parts, dim=0)  # what FSDP2 does (aten.split)
        assert all(isinstance(c, Sharded4bitTensor) for c in chunks)
        assert torch.equal(torch.cat([c.dequantize() for c in chunks]), ref)
    for start, stop in [(0, 1), (1, 5), (3, shape[0]), (shape[0] - 1, shape[0])]:
        assert torch.equal(t.dequantize_rows(start, stop), ref[start:stop])


def test_large_blocksize_nested_groups_straddle_rows():
    # 2 blocks of 64 per row and 256 blocks per double-quant group: groups span 128 rows, a split at row 96 cuts one.
    _, packed, qs = _bnb_pair((192, 128), "nf4", True, torch.bfloat16)
    t = Sharded4bitTensor.from_bnb(packed, qs)
    ref = reference_dequantize_4bit(packed, qs)
    a, b = torch.chunk(t, 2)
    assert torch.equal(b.dequantize(), ref[96:])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_from_dense_equals_bnb_quantize(quant_type, double_quant):
    w, packed, qs = _bnb_pair((40, 192), quant_type, double_quant, torch.bfloat16)
    t = Sharded4bitTensor.from_dense(w, quant_type, 64, double_quant)
    assert torch.equal(t.dequantize(), bnbf.dequantize_4bit(packed, qs))
    assert torch.equal(t.packed.reshape(-1), packed.reshape(-1))


def _linear4bit(w, bias, quant_type="nf4", double_quant=True, compute_dtype=torch.float32):
    m = bnb.nn.Linear4bit(
        w.shape[1],
        w.shape[0],
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    m.weight = bnb.nn.Params4bit(
        w.clone(), requires_grad=False, quant_type=quant_type, compress_statistics=double_quant
    )
    if bias is not None:
        m.bias = nn.Parameter(bias.clone(), requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = m.to("cpu")
    assert m.weight.quant_state is not None
    return m


def test_from_linear4bit_and_dora_parity():
    """DoRA over ShardedLinear4bit == DoRA over the bnb Linear4bit it was converted from (outputs, norms, grads)."""
    torch.manual_seed(0)
    w, b = torch.randn(48, 64), torch.randn(48)
    ref_base = _linear4bit(w, b)
    base = ShardedLinear4bit.from_linear(ref_base)
    assert isinstance(weight_source_for(base), Sharded4bitWeight)
    dense_ref = bnbf.dequantize_4bit(ref_base.weight.data, ref_base.weight.quant_state)
    assert torch.equal(base.weight.dequantize(), dense_ref)
    torch.manual_seed(1)
    ref = DoRALinear(ref_base, r=4, alpha=8)
    torch.manual_seed(1)
    lay = DoRALinear(base, r=4, alpha=8)
    assert torch.equal(lay.magnitude, ref.magnitude)
    with torch.no_grad():
        for l_ in (ref, lay):
            l_.lora_B.copy_(torch.linspace(-0.1, 0.1, 48 * 4).view(48, 4))
    x = torch.randn(5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), lay(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lay.weight_norm(), ref.weight_norm(), rtol=1e-6, atol=1e-6)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    for n in ("lora_A", "lora_B", "magnitude"):
        torch.testing.assert_close(getattr(lay, n).grad, getattr(ref, n).grad, rtol=1e-5, atol=1e-5)


def test_module_forward_backward_matches_dequantized_dense():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = ShardedLinear4bit.from_linear(lin, "nf4", 64, True)
    dense = q.weight.dequantize()
    x = torch.randn(3, 64, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ dense.t() + lin.bias, rtol=0, atol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 32) @ dense, rtol=0, atol=1e-6)
    assert not q.weight.requires_grad


def test_packed_bytes_about_a_quarter_of_bf16():
    q = ShardedLinear4bit.from_linear(nn.Linear(512, 256, bias=False), "nf4", 64, True, torch.bfloat16)
    nbytes = packed_bytes(q)
    bf16 = 256 * 512 * 2
    # codes (in/2) + 8 uint8 absmax codes + 1 fp32 group scale + 8 bytes row metadata per row
    assert nbytes == 256 * (256 + 8 + 4 + 8)
    assert 0.25 <= nbytes / bf16 < 0.28


def test_dtype_change_keeps_codes_and_meta_empty_then_copy():
    torch.manual_seed(0)
    q = ShardedLinear4bit.from_linear(nn.Linear(64, 16), "fp4", 64, True, torch.float32)
    want_bf16, want_fp32 = q.weight.dequantize(torch.bfloat16), q.weight.dequantize()
    q.to(torch.bfloat16)  # in place, as model.to(dtype): only the dequantization dtype changes
    assert q.weight.dtype == torch.bfloat16 and isinstance(q.weight.data, Sharded4bitTensor)
    assert torch.equal(q.weight.dequantize(), want_bf16)
    q.to(torch.float32)
    # the meta-device path of the low-memory loader: empty inner tensors, then copy_ of a quantized shard
    e = Sharded4bitTensor.empty(16, 64, "fp4", 64, True, torch.float32, device="meta")
    assert e.is_meta and e.scales.shape == q.weight.scales.shape
    real = torch.empty_like(e, device="cpu")
    real.copy_(q.weight.data)
    assert torch.equal(real.dequantize(), want_fp32)


def test_clear_errors():
    with pytest.raises(ValueError, match="even in_features"):
        Sharded4bitTensor.from_dense(torch.randn(4, 7), "nf4")
    t = Sharded4bitTensor.from_dense(torch.randn(7, 64), "nf4")
    with pytest.raises(ValueError, match="divisible by the world size"):
        torch.chunk(t, 2)
    with pytest.raises(NotImplementedError, match="dequantize first"):
        t + 1


def test_70b_qdora_fsdp2_config_builds_on_meta_and_shards_over_16_ranks():
    """configs/llama3.1-70b-qdora-fsdp2-2nodes.yaml: the low-memory path builds the 4-bit model on meta
    (no download)."""
    from pathlib import Path

    from dora_dist.adapters import apply_dora, dora_layers
    from dora_dist.config import load_config
    from dora_dist.models import dora_config_from
    from dora_dist.models.lowmem_load import build_lowmem_qdora_model

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(str(root / "configs" / "llama3.1-70b-qdora-fsdp2-2nodes.yaml"))
    assert cfg.parallel.engine == "fsdp2" and cfg.quantization.mode == "nf4"
    model = build_lowmem_qdora_model(cfg)
    assert all(p.is_meta for p in model.parameters())  # nothing read: the engine loads after sharding
    quant = [m for m in model.modules() if isinstance(m, ShardedLinear4bit)]
    assert len(quant) == 7 * 80 and type(model.lm_head) is nn.Linear
    world = 16
    assert all(m.out_features % world == 0 and m.in_features % 64 == 0 for m in quant)
    total = sum(m.weight.qdata.shape[0] * m.weight.qdata.shape[1] for m in quant)  # meta: shapes only
    weights = sum(m.out_features * m.in_features for m in quant)
    assert 0.51 < total / weights < 0.53  # bytes per weight (bf16: 2)
    assert total / world < 2.3e9  # 4-bit linears per GPU
    apply_dora(model, dora_config_from(cfg), init_magnitude=False)
    assert len(dict(dora_layers(model))) == 7 * 80


def test_lowmem_load_names_weights_missing_from_the_checkpoint(tmp_path):
    """Review bug: a load counted as complete when *something* loaded; parameters the checkpoint lacks kept the
    uninitialised memory of to_empty(). Every base weight must be loaded, else the missing ones are named."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dora_dist.adapters import DoRAConfig, apply_dora
    from dora_dist.models.lowmem_load import build_qdora_on_meta, load_safetensors_lowmem, materialize

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    state = {k: v.contiguous() for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))

    def fresh():
        model = build_qdora_on_meta(config, "nf4", 64, True, torch.float32, torch.float32)
        apply_dora(model, DoRAConfig(r=2, target_modules=["q_proj"]), init_magnitude=False)
        return materialize(model, "cpu")

    assert load_safetensors_lowmem(fresh(), tmp_path)["loaded"] == len(state)  # complete: fine
    for missing in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
        partial = {k: v for k, v in state.items() if k != missing}
        (tmp_path / "model.safetensors").unlink()
        save_file(partial, str(tmp_path / "model.safetensors"))
        with pytest.raises(ValueError, match=re.escape(missing.replace(".q_proj.", ".q_proj.base_layer."))):
            load_safetensors_lowmem(fresh(), tmp_path)
