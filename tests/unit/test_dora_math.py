"""DoRA math: gradcheck in float64, seed-000 analytic gradients, the expanded norm, zero-norm rows.

The norm ‖W + sBA‖ is detached (a constant in backward), so a finite-difference gradcheck must hold it fixed:
either through the pure `dora_output` with a precomputed constant scale, or by patching `DoRALinear.weight_norm`
to return a fixed tensor.
"""

import pytest
import torch
from _dora_helpers import (
    ALPHA,
    DENSE_KINDS,
    EIGHT_BIT_KINDS,
    FOUR_BIT_KINDS,
    IN,
    OUT,
    R,
    close,
    copy_into_peft,
    dequantized,
    kind_params,
    make_base,
    make_peft_layer,
    randomize_adapter,
)
from torch.autograd import gradcheck

import dora_dist.nn.weight_source as ws
from dora_dist import DoRALinear
from dora_dist.nn import dora_output, safe_divide_norm

GC_OUT, GC_IN, RR = 6, 5, 3  # gradcheck shapes


def _f64(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_gradcheck_dora_output_fixed_scale():
    W, s = _f64(GC_OUT, GC_IN, seed=0), 1.7
    A = _f64(RR, GC_IN, seed=1).requires_grad_()
    B = _f64(GC_OUT, RR, seed=2).requires_grad_()
    m = _f64(GC_OUT, seed=3).abs().add(0.5).requires_grad_()
    x = _f64(4, GC_IN, seed=4).requires_grad_()
    norm = torch.linalg.norm(W + s * B.detach() @ A.detach(), dim=1)  # constant

    def f(x, A, B, m):
        return dora_output(x @ W.t(), (x @ A.t()) @ B.t(), m / norm, s)

    assert gradcheck(f, (x, A, B, m), eps=1e-6, atol=1e-7)


def test_gradcheck_dora_output_dropout_path():
    W, s = _f64(GC_OUT, GC_IN, seed=0), 0.9
    A = _f64(RR, GC_IN, seed=1).requires_grad_()
    B = _f64(GC_OUT, RR, seed=2).requires_grad_()
    m = _f64(GC_OUT, seed=3).abs().add(0.5).requires_grad_()
    x = _f64(4, GC_IN, seed=4).requires_grad_()
    mask = (torch.rand(4, GC_IN, generator=torch.Generator().manual_seed(5)) > 0.3).double() / 0.7
    norm = torch.linalg.norm(W + s * B.detach() @ A.detach(), dim=1)

    def f(x, A, B, m):
        xd = x * mask
        return dora_output(x @ W.t(), (xd @ A.t()) @ B.t(), m / norm, s, base_out_dropped=xd @ W.t())

    assert gradcheck(f, (x, A, B, m), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", kind_params(DENSE_KINDS))
def test_gradcheck_layer_with_fixed_norm(kind, monkeypatch):
    base = make_base(kind, GC_OUT, GC_IN).double()
    layer = DoRALinear(base, r=RR, alpha=2.0, adapter_dtype=torch.float64)
    randomize_adapter(layer)
    fixed = layer.weight_norm().clone()
    monkeypatch.setattr(DoRALinear, "weight_norm", lambda self, exact=False, w_times_a=None: fixed)
    x = _f64(3, GC_IN, seed=9).requires_grad_()
    params = (layer.lora_A, layer.lora_B, layer.magnitude)

    def f(x, A, B, m):
        # route the inputs through the layer's parameters functionally
        return torch.func.functional_call(layer, {"lora_A": A, "lora_B": B, "magnitude": m}, (x,))

    inputs = (x,) + tuple(p.detach().clone().requires_grad_() for p in params)
    assert gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", kind_params(DENSE_KINDS))
def test_backward_matches_seed000_formulas(kind):
    """Seed 000: with β = 1/‖W + sBA‖ held constant, z = x·Wᵀ + s·x·Aᵀ·Bᵀ and y = (m·β) ⊙ z:
    dL/dm = Σ_bs g ⊙ z ⊙ β;  dL/dA = s·Σ g·diag(m·β)·B ⊗ x;  dL/dB = s·Σ diag(m·β)·g ⊗ (x·Aᵀ)."""
    base = make_base(kind, GC_OUT, GC_IN).double()
    layer = DoRALinear(base, r=RR, alpha=2.0, adapter_dtype=torch.float64)
    randomize_adapter(layer)
    x = _f64(4, GC_IN, seed=11)
    gy = _f64(4, GC_OUT, seed=12)
    y = layer(x)
    (y * gy).sum().backward()

    W = dequantized(layer.base_layer).double()
    a, b, mag, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.magnitude.detach(), layer.scaling
    beta = 1 / torch.linalg.norm(W + s * b @ a, dim=1)
    z = x @ W.t() + s * (x @ a.t() @ b.t())
    dy_dmag = z[:, :, None] * torch.diag(beta)  # (bs, m, m)
    dy_da = s * (mag * beta)[None, :, None, None] * x[:, None, None, :] * b[None, :, :, None]  # (bs, m, r, n)
    dy_db = s * torch.diag(mag * beta)[None, :, :, None] * (x @ a.t())[:, None, None, :]  # (bs, m, m, r)
    close(layer.magnitude.grad, torch.einsum("bm,bmk->k", gy, dy_dmag), rtol=1e-10, atol_frac=1e-12)
    close(layer.lora_A.grad, torch.einsum("bm,bmrn->rn", gy, dy_da), rtol=1e-10, atol_frac=1e-12)
    close(layer.lora_B.grad, torch.einsum("bm,bmkr->kr", gy, dy_db), rtol=1e-10, atol_frac=1e-12)
    bias = layer.base_layer.bias.double() if layer.base_layer.bias is not None else 0
    close(y.detach(), (mag * beta) * z + bias, rtol=1e-10, atol_frac=1e-12)


def test_norm_is_detached():
    """Gradients of A and B differ from those of a layer whose norm is differentiated: the norm is a constant."""
    base = make_base(DENSE_KINDS[0], GC_OUT, GC_IN).double()
    layer = DoRALinear(base, r=RR, alpha=2.0, adapter_dtype=torch.float64)
    randomize_adapter(layer)
    x, gy = _f64(4, GC_IN, seed=1), _f64(4, GC_OUT, seed=2)
    (layer(x) * gy).sum().backward()
    W = base.weight.detach()
    A, B, m = (p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude))
    Wp = W + layer.scaling * B @ A
    y_live = x @ Wp.t() * (m / torch.linalg.norm(Wp, dim=1)) + base.bias.detach()
    (y_live * gy).sum().backward()
    close(layer.magnitude.grad, m.grad, rtol=1e-10, atol_frac=1e-12)  # m's gradient does not involve ∂‖·‖
    assert not torch.allclose(layer.lora_A.grad, A.grad)
    assert not torch.allclose(layer.lora_B.grad, B.grad)


@pytest.mark.parametrize("kind", kind_params(DENSE_KINDS + [FOUR_BIT_KINDS[2], EIGHT_BIT_KINDS[0]]))
@pytest.mark.parametrize("b_scale", [0.0, 0.3, 5.0])
def test_expanded_norm_equals_exact_and_linalg(kind, b_scale):
    layer = DoRALinear(make_base(kind), r=R, alpha=ALPHA)
    randomize_adapter(layer, b_scale=b_scale)
    W = dequantized(layer.base_layer).double()
    ref = torch.linalg.norm(W + layer.scaling * layer.lora_B.double() @ layer.lora_A.double(), dim=1)
    fast, exact = layer.weight_norm(), layer.weight_norm(exact=True)
    assert fast.dtype == exact.dtype == torch.float32
    close(exact.double(), ref, rtol=1e-6, atol_frac=1e-7)
    close(fast.double(), ref, rtol=1e-5, atol_frac=1e-6)
    close(fast, exact, rtol=1e-5, atol_frac=1e-6)


def test_expanded_norm_float64():
    base = make_base(DENSE_KINDS[0]).double()
    layer = DoRALinear(base, r=R, alpha=ALPHA, adapter_dtype=torch.float64)
    randomize_adapter(layer, b_scale=2.0)
    W = base.weight.detach()
    ref = torch.linalg.norm(W + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach(), dim=1)
    assert layer.weight_norm().dtype == torch.float64
    close(layer.weight_norm(), ref, rtol=1e-12, atol_frac=1e-13)
    close(layer.weight_norm(exact=True), ref, rtol=1e-12, atol_frac=1e-13)


@pytest.mark.parametrize("chunk", [1, 3 * IN, 1 << 22])
def test_dense_low_precision_norm_chunked(chunk, monkeypatch):
    """A bf16 dense base is read in fp32 row chunks; results match the unchunked reference for any chunk size."""
    monkeypatch.setattr(ws, "CHUNK_ELEMENTS", chunk)
    base = make_base(DENSE_KINDS[0]).to(torch.bfloat16)
    layer = DoRALinear(base, r=R, alpha=ALPHA)
    randomize_adapter(layer)
    W = base.weight.detach().double()
    ref = torch.linalg.norm(W + layer.scaling * layer.lora_B.double() @ layer.lora_A.double(), dim=1)
    close(layer.weight_norm().double(), ref, rtol=1e-5, atol_frac=1e-6)
    close(layer.weight_norm(exact=True).double(), ref, rtol=1e-5, atol_frac=1e-6)
    close(layer.base_row_sq_norms().double(), W.pow(2).sum(1), rtol=1e-6, atol_frac=1e-7)


def test_safe_divide_norm():
    m = torch.tensor([2.0, 3.0, 0.0])
    n = torch.tensor([4.0, 0.0, 0.0])
    out = safe_divide_norm(m, n)
    assert torch.equal(out, torch.tensor([0.5, 3.0, 0.0]))


@pytest.mark.parametrize("kind", kind_params([DENSE_KINDS[0], DENSE_KINDS[2], FOUR_BIT_KINDS[0], EIGHT_BIT_KINDS[0]]))
def test_zero_norm_rows_give_no_nan(kind):
    """Rows of W that are all zero (e.g. pruned) with B's row zero: ‖W + sBA‖ = 0. Ours gives finite outputs and
    gradients (the row outputs its bias); peft divides m by 0 and gives NaN."""
    w, b = make_base(DENSE_KINDS[0]).weight.detach().clone(), torch.linspace(-0.2, 0.2, OUT)
    zero_rows = [0, 5, OUT - 1]
    w[zero_rows] = 0
    ours = DoRALinear(make_base(kind, weight=w, bias_t=b), r=R, alpha=ALPHA, dropout=0.1)
    theirs = make_peft_layer(make_base(kind, weight=w, bias_t=b), dropout=0.1)
    randomize_adapter(ours)
    with torch.no_grad():
        ours.lora_B[zero_rows] = 0
    copy_into_peft(ours, theirs)
    assert torch.equal(ours.magnitude[zero_rows], torch.zeros(3))
    for training in (True, False):
        ours.train(training)
        x = torch.randn(4, IN, requires_grad=True)
        y = ours(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        for p in (ours.lora_A, ours.lora_B, ours.magnitude):
            assert torch.isfinite(p.grad).all()
            p.grad = None
        bias = ours.base_layer.bias.detach()
        close(y.detach()[:, zero_rows], bias[zero_rows].expand(4, -1).to(y.dtype), rtol=1e-6, atol_frac=1e-6)
        assert torch.isfinite(ours.weight_norm()).all() and (ours.weight_norm()[zero_rows] == 0).all()
    theirs.eval()
    with torch.no_grad():
        y_peft = theirs(torch.randn(4, IN))
    assert torch.isnan(y_peft[:, zero_rows]).all(), "peft is expected to produce NaN for zero-norm rows"


def test_zero_norm_rows_merge_no_nan():
    w = make_base(DENSE_KINDS[0]).weight.detach().clone()
    w[[1, 2]] = 0
    layer = DoRALinear(make_base(DENSE_KINDS[0], weight=w), r=R, alpha=ALPHA)
    layer.eval()
    x = torch.randn(3, IN)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert torch.isfinite(layer.base_layer.weight).all()
        close(layer(x), y)
