"""The fused DoRA epilogue (nn/dora_epilogue.py): exact math, precision against float64, what it saves.

Tolerances. float64: gradcheck, and 1e-12 against the plain-op reference. fp32 and bf16 against a float64
reference of the same inputs: every output and gradient entry is a short sum of products whose terms are each
rounded once or twice, so its error is bounded by c·u·(Σ|terms|), u = 2⁻²⁴ (fp32) or 2⁻⁸ (bf16, 8 significant bits);
we assert |err| ≤ 8·u·(Σ|terms|) + (accumulation over K tokens) K·2⁻²⁴·(Σ|terms|), with Σ|terms| computed in
float64 from absolute values. That bound does not depend on one machine's rounding.
"""

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from dora_dist import DoRALinear
from dora_dist.nn.dora_epilogue import DoRAEpilogue, dora_epilogue, dora_epilogue_reference, use_fused

T, OUT, R = 7, 6, 3


def _inputs(dtype=torch.float64, zero_m=(), zero_n=(), bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(T, OUT, generator=g, dtype=torch.float64)
    xa = torch.randn(T, R, generator=g, dtype=torch.float64)
    B = torch.randn(OUT, R, generator=g, dtype=torch.float64)
    m = torch.rand(OUT, generator=g, dtype=torch.float64) + 0.5
    n = torch.rand(OUT, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(OUT, generator=g, dtype=torch.float64) if bias else None
    m[list(zero_m)] = 0
    n[list(zero_n)] = 1  # a zero-norm row reaches the epilogue as denominator 1
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(base), cast(xa), cast(B), cast(m), n.to(torch.promote_types(dtype, torch.float32)), cast(b)


@pytest.mark.parametrize("zero_m", [(), (1, 4)], ids=["m>0", "m=0 rows"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(zero_m, bias):
    base, xa, B, m, n, b = _inputs(zero_m=zero_m, bias=bias)
    args = [t.requires_grad_() for t in (base, xa, B, m)]
    bias_t = b.requires_grad_() if b is not None else None
    f = lambda base, xa, B, m, *bb: DoRAEpilogue.apply(base, xa, B, m, n, bb[0] if bb else None, 1.3)
    assert gradcheck(f, tuple(args) + ((bias_t,) if bias else ()), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("zero_m", [(), (0, 5)], ids=["m>0", "m=0 rows"])
def test_float64_equals_plain_ops(zero_m):
    base, xa, B, m, n, b = _inputs(zero_m=zero_m)
    g = torch.randn(T, OUT, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    outs = []
    for fused in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (base, xa, B, m)]
        with use_fused(fused):
            y = dora_epilogue(*leaves, n, b, 0.7)
        grads = torch.autograd.grad(y, leaves, g)
        outs.append((y.detach(), *grads))
    for a, r in zip(*outs, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def _bound(abs_terms: torch.Tensor, u: float, k: int) -> torch.Tensor:
    return (8 * u + k * 2.0**-24) * abs_terms


@pytest.mark.parametrize("dtype,u", [(torch.float32, 2.0**-24), (torch.bfloat16, 2.0**-8)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("zero_m", [(), (2,)], ids=["m>0", "m=0 row"])
def test_precision_against_float64(dtype, u, zero_m):
    """Low-precision activations (base_out, y, g in `dtype`) with fp32 adapters, as in training."""
    s = 0.9
    base, xa, B, m, n, b = _inputs(zero_m=zero_m, bias=False)
    g = torch.randn(T, OUT, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    base_lp = base.to(dtype)  # the inputs as the low-precision run sees them; the reference uses them too
    g_lp = g.to(dtype)
    ref_leaves = [
        base_lp.double().requires_grad_(),
        xa.float().double().requires_grad_(),
        B.float().double().requires_grad_(),
        m.float().double().requires_grad_(),
    ]
    ref = dora_epilogue_reference(*ref_leaves, n.double(), None, s)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g_lp.double())
    leaves = [
        base_lp.clone().requires_grad_(),
        xa.float().requires_grad_(),
        B.float().requires_grad_(),
        m.float().requires_grad_(),
    ]
    y = dora_epilogue(*leaves, n.float(), None, s)
    grads = torch.autograd.grad(y, leaves, g_lp)
    assert y.dtype == dtype and grads[3].dtype == torch.float32
    scale = (m / n).abs()
    # |terms| of each quantity, float64
    y_terms = (base_lp.double().abs() + s * xa.abs() @ B.abs().t()) * scale
    gabs = g_lp.double().abs()
    z_abs = base_lp.double().abs() + s * xa.abs() @ B.abs().t()
    terms = {
        "y": y_terms,
        "d_base": gabs * scale,
        "d_xa": s * (gabs * scale) @ B.abs(),
        "d_B": s * (gabs * scale).t() @ xa.abs(),
        "d_m": (gabs * z_abs).sum(0) / n,
    }
    got = {"y": y, "d_base": grads[0], "d_xa": grads[1], "d_B": grads[2], "d_m": grads[3]}
    want = {"y": ref, "d_base": ref_grads[0], "d_xa": ref_grads[1], "d_B": ref_grads[2], "d_m": ref_grads[3]}
    for key in got:
        err = (got[key].double() - want[key].detach()).abs()
        bound = _bound(terms[key], u, T)
        assert (err <= bound + 1e-300).all(), (key, (err - bound).max().item())


def _saved_storages(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


@pytest.mark.parametrize("bias", [False, True])
def test_layer_saves_its_output_not_z(bias):
    """Of the (tokens × out) activations, a DoRA layer saves exactly one, and it is its output y."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(16, 12, bias=bias), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16, requires_grad=True)
    y, seen = _saved_storages(lambda: layer(x))
    big = {ptr for ptr, (shape, _) in seen.items() if shape == (5, 12)}
    assert big == {y.untyped_storage().data_ptr()}
    with use_fused(False):
        y0, seen0 = _saved_storages(lambda: layer(x))
    big0 = {ptr for ptr, (shape, _) in seen0.items() if shape == (5, 12)}
    assert y0.untyped_storage().data_ptr() not in big0 and len(big0) == 1  # the unfused path saves z
    torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)


def test_llama_mlp_stores_gate_and_up_outputs_once():
    """In a Llama MLP, SiLU saves gate_proj's output and the product saves up_proj's: with DoRA on all three
    projections, the only extra (tokens × out) activation over LoRA is down_proj's output."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from dora_dist.adapters import DoRAConfig, apply_dora

    cfg = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2)
    x = torch.randn(2, 5, 16, requires_grad=True)

    def saved(use_dora):
        torch.manual_seed(0)
        mlp = apply_dora(LlamaMLP(cfg), DoRAConfig(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora))
        params = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
        _, seen = _saved_storages(lambda: mlp(x))
        return sum(
            nbytes for ptr, (_, nbytes) in seen.items() if ptr not in params and ptr != x.untyped_storage().data_ptr()
        )

    extra = saved(True) - saved(False)
    tokens_x_down_out = 10 * 16 * 4
    vectors = 3 * 4 * (40 + 40 + 16)  # scale, m and the norm per layer, fp32 (out,) each
    assert tokens_x_down_out <= extra <= tokens_x_down_out + vectors


def test_zero_magnitude_rows_gradient_is_exact_in_layer():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(8, 6).double(), r=2, alpha=4, adapter_dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude[[1, 3]] = 0
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    fused = layer.magnitude.grad.clone()
    layer.magnitude.grad = None
    with use_fused(False):
        layer(x).pow(2).sum().backward()
    torch.testing.assert_close(fused, layer.magnitude.grad, rtol=1e-12, atol=1e-12)
    assert fused[[1, 3]].abs().min() > 0  # rows with m = 0 still learn
