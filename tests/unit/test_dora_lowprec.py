"""bf16/fp16 DoRA layers stay finite and close to a float64 reference of the same math (issue 16, numerics):
rows whose norm is zero (W = 0 and B = 0; W = -s·B·A), a row whose ‖·‖² overflows fp16 (4096 entries of ~200:
Σ w² ≈ 1.6e8 > 65504, while ‖w‖ ≈ 1.28e4 fits), and magnitudes of 1e4. The norm accumulates in fp32.

Reference: the same function in float64 (inputs are the 16-bit values, upcast exactly), norm n = ‖W + s·B·A‖ per
row straight from the summed matrix, denominator n with zeros replaced by 1 (`nonzero_norm`), detached:

    y = (m / n) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ),  gradients of lora_A, lora_B, magnitude from autograd for an upstream g.

Tolerance (why these numbers). The layer computes with fp32 accumulation (torch's CPU and CUDA 16-bit GEMMs
accumulate in fp32) and rounds partial results to the 16-bit format a few times on each path (base matmul output,
x·Aᵀ, the scale m/n, s·(m/n)⊙B, y, d(x·Aᵀ), dB; a 4-bit base: the weight dequantized to 16 bits): k ≤ 8
roundings, each a relative error ≤ u (unit roundoff: 2^-11 for fp16, 2^-8 for bf16) of a partial result whose
magnitude is bounded by the same expression evaluated on absolute values |x|, |W|, |A|, |B|, |m|, |g| (every term
is a product of inputs, so that is Σ|terms|). To first order |layer - reference| ≤ 8·u·bound elementwise. The
norm's own error (fp32 sums of ≤ 4096 squares, relative ≤ 4096·2^-24 ≈ 2.4e-4 worst case) is below u for fp16
and bf16 once divided into the scale, and is covered by the same factor. An absolute floor of 8·2^-24 covers fp16
subnormal results (spacing 2^-24).

The norm itself is compared with rtol (in_features + 8)·2^-24: the worst-case relative error of an fp32 sum of
in_features squares (plus the few terms of the expansion ‖W‖² + 2s·B·(W·Aᵀ) + s²·‖B·A‖², whose B is small here, so
nothing cancels).

Each case runs through the fused epilogue (eager default) and the plain-op one (torch.compile's path). 4-bit
(bitsandbytes NF4, CPU): the norm against the float64 norm of the dequantized weight, and the layer against the
reference built on that weight.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _dora_helpers import dequantized
from torch import nn

from dora_dist.nn.dora_epilogue import use_fused
from dora_dist.nn.dora_linear import DoRALinear

DTYPES = [torch.bfloat16, torch.float16]
FP16_MAX = torch.finfo(torch.float16).max


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def make_layer(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor | None, dtype: torch.dtype, alpha: float
) -> DoRALinear:
    """A bias-free DoRA layer over a `dtype` nn.Linear with adapters in `dtype` (m=None: initialised, ‖W + sBA‖)."""
    base = nn.Linear(w.shape[1], w.shape[0], bias=False).to(dtype)
    with torch.no_grad():
        base.weight.copy_(w)
    layer = DoRALinear(base, r=a.shape[0], alpha=alpha, adapter_dtype=dtype, init_magnitude=False)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    if m is None:
        layer.init_magnitude()
    else:
        with torch.no_grad():
            layer.magnitude.copy_(m)
    return layer


def reference(w, a, b, m, x, g, s: float, denom: torch.Tensor | None = None):
    """(y, dA, dB, dm, denom) of the DoRA function in float64; `denom` given: that one (for the |·| bound)."""
    w, x, g = w.double(), x.double(), g.double()
    a, b, m = (t.double().clone().requires_grad_(True) for t in (a, b, m))
    if denom is None:
        n = (w + s * (b.detach() @ a.detach())).norm(dim=1)
        denom = torch.where(n == 0, torch.ones_like(n), n)
    y = (m / denom) * (x @ w.t() + s * (x @ a.t()) @ b.t())
    y.backward(g)
    return y.detach(), a.grad, b.grad, m.grad, denom


def check_against_reference(
    layer: DoRALinear, x: torch.Tensor, g: torch.Tensor, fused: bool = True, w: torch.Tensor | None = None
) -> dict[str, float]:
    """Run the layer forward + backward with upstream g; assert every output is finite and within 8·u·bound of the
    float64 reference (on base weight `w`, default the layer's); returns the worst error / tolerance per quantity."""
    dtype = layer.lora_A.dtype
    u = unit_roundoff(dtype)
    with use_fused(fused):
        y = layer(x)
        y.backward(g)
    got = {"y": y.detach(), "dA": layer.lora_A.grad, "dB": layer.lora_B.grad, "dm": layer.magnitude.grad}
    w = layer.base_layer.weight.detach() if w is None else w
    params = (layer.lora_A.detach(), layer.lora_B.detach(), layer.magnitude.detach())
    ref = reference(w, *params, x, g, layer.scaling)
    bound = reference(w.abs(), *(p.abs() for p in params), x.abs(), g.abs(), layer.scaling, denom=ref[4])
    ratios = {}
    for i, key in enumerate(("y", "dA", "dB", "dm")):
        assert got[key].dtype == dtype
        assert torch.isfinite(got[key]).all(), f"{key} is not finite in {dtype}"
        assert torch.isfinite(ref[i]).all() and ref[i].abs().max() < FP16_MAX / 2, "the case must be representable"
        tol = 8 * u * bound[i] + 8 * 2.0**-24
        err = (got[key].double() - ref[i]).abs()
        ratios[key] = float((err / tol).max())
        assert bool((err <= tol).all()), f"{key}: max error / tolerance = {ratios[key]:.3g} in {dtype}"
    # the norm the layer divides by: fp32 accumulation, relative error ≪ u, also where ‖·‖² overflows fp16
    norm = layer.weight_norm()
    assert norm.dtype == torch.float32 and torch.isfinite(norm).all()
    n64 = (w.double() + layer.scaling * (params[1].double() @ params[0].double())).norm(dim=1)
    assert torch.allclose(norm.double(), n64, rtol=(w.shape[1] + 8) * 2.0**-24, atol=0)
    return ratios


def inputs(tokens: int, in_f: int, out_f: int, dtype: torch.dtype, x_std: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, in_f, generator=gen) * x_std).to(dtype)
    g = torch.randn(tokens, out_f, generator=gen).to(dtype)
    return x, g


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_row_of_w_and_b(dtype, fused):
    """Row 2 of W and of B is zero: ‖·‖ = 0, the initialised magnitude is 0, the row's output and dm are 0."""
    gen = torch.Generator().manual_seed(1)
    out_f, in_f, r = 8, 64, 4
    w = torch.randn(out_f, in_f, generator=gen).to(dtype)
    a = (torch.randn(r, in_f, generator=gen) * 0.1).to(dtype)
    b = (torch.randn(out_f, r, generator=gen) * 0.1).to(dtype)
    w[2], b[2] = 0, 0
    layer = make_layer(w, a, b, None, dtype, alpha=8)
    assert float(layer.magnitude.detach()[2]) == 0 and float(layer.weight_norm()[2]) == 0
    x, g = inputs(16, in_f, out_f, dtype, 1.0)
    check_against_reference(layer, x, g, fused)
    assert float(layer.magnitude.grad[2]) == 0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_zero_only_after_adding_sBA(dtype, fused):
    """W_3 = -s·(B·A)_3 with small integers and s = 1 (all exact in 16 bits and fp32): the expanded norm
    ‖W‖² + 2s·B·(W·Aᵀ) + s²·B·(A·Aᵀ)·Bᵀ is exactly 0 in fp32, the row's direction is zero, m_3 = 1 is kept."""
    gen = torch.Generator().manual_seed(2)
    out_f, in_f, r = 8, 64, 4
    a = torch.randint(-2, 3, (r, in_f), generator=gen).to(dtype)
    b = torch.randint(-2, 3, (out_f, r), generator=gen).to(dtype)
    w = torch.randint(-3, 4, (out_f, in_f), generator=gen).to(dtype)
    b[3] = torch.tensor([1.0, -1.0, 2.0, 0.0])
    w[3] = -(b[3].double() @ a.double()).to(dtype)  # s = alpha / r = 1
    m = torch.full((out_f,), 1.0, dtype=dtype)
    layer = make_layer(w, a, b, m, dtype, alpha=r)
    assert layer.scaling == 1.0 and float(layer.weight_norm()[3]) == 0
    x, g = inputs(16, in_f, out_f, dtype, 0.05)
    check_against_reference(layer, x, g, fused)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_norm_overflowing_fp16_squares(dtype, fused):
    """in_features 4096, entries ±(150..250): Σ w² ≈ 1.6e8 overflows fp16 (max 65504), ‖w‖ ≈ 1.28e4 does not."""
    gen = torch.Generator().manual_seed(3)
    out_f, in_f, r = 8, 4096, 4
    sign = torch.randint(0, 2, (out_f, in_f), generator=gen) * 2 - 1
    w = (sign * (150 + 100 * torch.rand(out_f, in_f, generator=gen))).to(dtype)
    assert float((w.double() ** 2).sum(1).min()) > FP16_MAX
    a = (torch.randn(r, in_f, generator=gen) * 0.02).to(dtype)
    b = (torch.randn(out_f, r, generator=gen) * 0.5).to(dtype)
    layer = make_layer(w, a, b, None, dtype, alpha=8)
    assert float(layer.magnitude.detach().float().min()) > 1e4
    x, g = inputs(8, in_f, out_f, dtype, 1e-3)  # outputs ~ 1e-3·200·64 ≈ 13: representable
    check_against_reference(layer, x, g, fused)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitudes_of_1e4(dtype, fused):
    """m = 1e4 over rows of norm ~1 (scale m/‖·‖ ~ 1e4): outputs ~1e4 and Σ_t g ⊙ y for dm run near the fp16 range
    while every result (dm ~ Σ g·z / ‖·‖) is well inside it."""
    gen = torch.Generator().manual_seed(4)
    out_f, in_f, r, tokens = 8, 64, 4, 64
    w = (torch.randn(out_f, in_f, generator=gen) / 8).to(dtype)
    a = (torch.randn(r, in_f, generator=gen) * 0.01).to(dtype)
    b = (torch.randn(out_f, r, generator=gen) * 1e-3).to(dtype)
    m = torch.full((out_f,), 1e4, dtype=dtype)
    layer = make_layer(w, a, b, m, dtype, alpha=8)
    x, g = inputs(tokens, in_f, out_f, dtype, 1.0)
    check_against_reference(layer, x, g, fused)


def overflow_rows(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """±(150..250) entries: Σ w² ≈ in_f·4e4 (1.6e8 for 4096) overflows fp16, ‖w‖ ≈ 200·√in_f does not."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (out_f, in_f), generator=gen) * 2 - 1
    return sign * (150 + 100 * torch.rand(out_f, in_f, generator=gen))


@pytest.mark.parametrize("dtype", DTYPES)
def test_4bit_norm_overflowing_fp16_squares(dtype):
    """An NF4 base (compute dtype fp16/bf16) whose dequantized rows have Σ w² > 65504: the layer's norm (fp32 from
    the dequantized row chunks) equals the float64 norm of dequantized W + s·B·A; forward and gradients are finite
    and match the reference on the dequantized weight."""
    bnb = pytest.importorskip("bitsandbytes")
    out_f, in_f, r = 8, 4096, 4
    w = overflow_rows(out_f, in_f, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4")
        base.load_state_dict({"weight": w.to(dtype)})
        base = base.to("cpu")
    base.support_avx512bf16_for_cpu = False  # as dora_dist does (see tests/unit/_dora_helpers.make_base)
    w_deq = dequantized(base)  # the hand-decoded fp32 weight: the reference
    assert float((w_deq.double() ** 2).sum(1).min()) > FP16_MAX
    gen = torch.Generator().manual_seed(6)
    layer = DoRALinear(base, r=r, alpha=8, adapter_dtype=dtype)  # magnitude initialised from the norm
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(r, in_f, generator=gen) * 0.02)
        layer.lora_B.copy_(torch.randn(out_f, r, generator=gen) * 0.5)
    x, g = inputs(8, in_f, out_f, dtype, 1e-3)
    check_against_reference(layer, x, g, w=w_deq)  # (also: the fp32 norm vs float64)
    assert torch.isfinite(layer.magnitude.detach()).all() and float(layer.magnitude.detach().float().min()) > 1e4
