"""bitsandbytes 4-bit bases in the states bitsandbytes itself can leave them in, on any CPU.

- Repacked: on AVX512-BF16 CPUs `Linear4bit.forward` in eval mode re-lays the codes out for its inference kernel and
  keeps the absmax in bf16. The repacking is pure torch (`_convert_weight_packed_for_cpu`), so these tests apply it
  directly and hold on every CPU: a DoRA layer over such a base must normalise the weight it multiplies by.
- `quant_storage` other than uint8 (bfloat16 is the FSDP-QLoRA convention): the packed bytes are stored in another
  dtype and must be read as bytes, also by the chunked decode of a layer bigger than one chunk.
"""

from __future__ import annotations

import warnings
from copy import copy

import pytest
import torch
from _dora_helpers import close, reference_dequantize_4bit
from torch import nn

import dora_dist.nn.weight_source as ws
from dora_dist import DoRALinear

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402


def linear4bit(out_f: int, in_f: int, quant_type="nf4", double_quant=True, storage=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    m = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=False,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=storage,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.load_state_dict({"weight": w})
        m = m.to("cpu")
    assert m.weight.quant_state is not None and m.weight.dtype == storage
    return m


def repack_like_bnb_cpu_inference(m: nn.Module) -> torch.Tensor:
    """Repack as bitsandbytes' eval forward does on AVX512-BF16 CPUs; returns the weight that kernel multiplies by
    (codes as before, absmax rounded to bf16), decoded by hand before the repacking."""
    qs = m.weight.quant_state
    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    kernel_state = copy(qs)
    kernel_state.absmax, kernel_state.nested = absmax.float().to(torch.bfloat16).float(), False
    expected = reference_dequantize_4bit(m.weight.data, kernel_state, torch.float32)
    m.weight.data, m.weight.quant_state = bnbf._convert_weight_packed_for_cpu(m.weight.data, qs)
    assert m.weight.quant_state.packing_format_for_cpu
    return expected


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dora_over_a_repacked_base_uses_the_repacked_weight(quant_type, double_quant):
    base = linear4bit(64, 128, quant_type, double_quant)
    expected_w = repack_like_bnb_cpu_inference(base)
    layer = DoRALinear(base, r=4, alpha=8)
    qs = base.weight.quant_state
    assert not getattr(qs, "packing_format_for_cpu", False), "the layer should undo the repacking"
    assert base.support_avx512bf16_for_cpu is False, "the layer should keep bitsandbytes from repacking again"
    w = reference_dequantize_4bit(base.weight.data, qs, torch.float32)
    assert torch.equal(w, expected_w)
    close(layer.magnitude, torch.linalg.norm(expected_w.double(), dim=1).float())
    x = torch.randn(3, 128)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    close(y, x @ expected_w.t(), rtol=1e-5, atol_frac=1e-5)  # B = 0 and m = ‖W‖: the base output


def test_base_repacked_after_wrapping_is_unpacked_before_use():
    """A direct call of the base layer after DoRA wrapped it (bitsandbytes repacking it behind our back) is seen."""
    base = linear4bit(32, 64, "nf4", False)
    layer = DoRALinear(base, r=2, alpha=4)
    expected_w = repack_like_bnb_cpu_inference(base)
    x = torch.randn(2, 64)
    with torch.no_grad():
        close(layer.weight_source.matmul(x), x @ expected_w.t(), rtol=1e-5, atol_frac=1e-5)
    close(layer.weight_source.row_sq_norms(), expected_w.pow(2).sum(1))


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(256, 512), (24, 96)])
def test_quant_storage_dtypes_in_chunks(storage, shape, monkeypatch):
    """Review bug: a non-uint8 quant_storage crashed the chunked decode of any layer bigger than one chunk."""
    monkeypatch.setattr(ws, "CHUNK_ELEMENTS", 1 << 14)
    base = linear4bit(*shape, "nf4", True, storage)
    full = reference_dequantize_4bit(base.weight.data, base.weight.quant_state, torch.float32)
    layer = DoRALinear(base, r=4, alpha=8)
    src = layer.weight_source
    assert src.rows_per_chunk() < shape[0] or shape[0] * shape[1] <= 1 << 14
    assert torch.equal(src.dense(torch.float32), full)
    assert torch.equal(src.row_sq_norms(), full.pow(2).sum(1))
    close(layer.magnitude, torch.linalg.norm(full.double(), dim=1).float())
    x = torch.randn(4, shape[1], requires_grad=True)
    y = layer(x)
    close(y, x.detach() @ full.t(), rtol=1e-5, atol_frac=1e-5)
    y.sum().backward()
    close(x.grad, full.sum(0).expand_as(x), rtol=1e-5, atol_frac=1e-5)
