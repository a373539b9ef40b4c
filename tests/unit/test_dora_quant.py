"""DoRALinear over bitsandbytes bases (Linear4bit NF4/FP4 × double quant × fp32/bf16 compute, Linear8bitLt).

Both layers sit on quantized bases built from the same dense weights (load_state_dict, then `.to("cpu")`, which is
where bitsandbytes quantizes); `make_base` asserts the weight has a quant_state (4-bit) or SCB (8-bit).

Tolerances: fp32 compute dtype — rtol 1e-5, atol 1e-6·max, as for dense bases. bf16 compute dtype — rtol 2e-2,
atol 2e-2·max: the base matmul runs in bf16 in both layers, but peft runs it *with* the bias inside the bf16 kernel
and then subtracts the bias in fp32 (`result - bias`), while we run it without the bias and add it afterwards. The
two bf16 roundings differ by up to one bf16 ulp (2⁻⁸ relative) of the base output, which then propagates to the
output and to every gradient through (m/‖·‖)·(x·Wᵀ). Observed: ~4e-3 of max, ~7e-3 with dropout, where peft's
extra x_d·Wᵀ is an fp32 matmul on the dequantized weight and ours the bf16 kernel.
"""

import math

import pytest
import torch
from _dora_helpers import (
    ALPHA,
    EIGHT_BIT_KINDS,
    FOUR_BIT_KINDS,
    IN,
    OUT,
    BaseKind,
    R,
    Wrap,
    assert_parity,
    bnb_kernels_agree,
    close,
    dequantized,
    kind_params,
    make_base,
    randomize_adapter,
    reference_dequantize_4bit,
    run_parity,
)

import dora_dist.nn.weight_source as ws
from dora_dist import DoRALinear, merge_and_unload

bnb = pytest.importorskip("bitsandbytes")

QUANT_KINDS = FOUR_BIT_KINDS + EIGHT_BIT_KINDS
NF4_DQ = BaseKind("nf4_dq1", "4bit", quant_type="nf4", double_quant=True)


def tolerances(kind):
    return dict(rtol=2e-2, atol_frac=2e-2) if kind.low_precision else dict(rtol=1e-5, atol_frac=1e-6)


@pytest.mark.parametrize("mode", ["train", "train_dropout", "eval_dropout"])
@pytest.mark.parametrize("kind", kind_params(QUANT_KINDS))
def test_parity_with_peft(kind, mode):
    _, _, results = run_parity(kind, mode)
    assert_parity(results, **tolerances(kind))


@pytest.mark.parametrize("kind", kind_params([FOUR_BIT_KINDS[0], EIGHT_BIT_KINDS[0]]))
def test_plain_lora_mode_matches_peft_lora(kind):
    _, _, results = run_parity(kind, "train_dropout", use_dora=False)
    assert_parity(results)


@pytest.mark.parametrize("kind", kind_params(QUANT_KINDS))
def test_magnitude_init_from_dequantized_weight(kind):
    layer = DoRALinear(make_base(kind), r=R, alpha=ALPHA)
    W = dequantized(layer.base_layer)
    close(layer.magnitude, torch.linalg.norm(W, dim=1))
    # B = 0: the adapter starts as the identity on top of the quantized base
    ref = make_base(kind)
    x = torch.randn(3, IN)
    close(layer(x), ref(x), **tolerances(kind))


@pytest.mark.parametrize("shape", [(OUT, IN), (7, 33), (5, 63), (3, 100), (9, 96), (130, 24), (24, 96)])
@pytest.mark.parametrize("kind", kind_params([FOUR_BIT_KINDS[0], FOUR_BIT_KINDS[6]]))  # nf4, fp4+dq
@pytest.mark.parametrize("chunk", [1, 1 << 22])
def test_4bit_chunked_dequant_is_exact(kind, shape, chunk, monkeypatch):
    """Row chunks of the packed weight dequantize bit-identically to the reference decode of the whole weight, for
    every chunk size, including shapes whose rows do not line up with the 64-value blocks and odd out·in; and the
    forward multiplies by that same weight. bitsandbytes' own dequantize_4bit is compared only where its CPU
    kernels decode the format exactly (in_features a multiple of 64; AVX512 CPUs decode other shapes otherwise)."""
    out_f, in_f = shape
    base = make_base(kind, out_f, in_f)
    layer = DoRALinear(base, r=2, alpha=4)
    full = reference_dequantize_4bit(base.weight.data, base.weight.quant_state, torch.float32)
    if bnb_kernels_agree(in_f):
        assert torch.equal(full, bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float())
    monkeypatch.setattr(ws, "CHUNK_ELEMENTS", chunk)
    src = layer.weight_source
    rows = src.rows_per_chunk()
    assert (rows * in_f) % base.weight.quant_state.blocksize == 0 or rows == out_f
    assert torch.equal(src.dense(torch.float32), full)
    assert torch.equal(src.row_sq_norms(), full.pow(2).sum(dim=1))
    close(layer.magnitude, torch.linalg.norm(full, dim=1))
    x = torch.randn(5, in_f)
    for grad in (False, True):  # the inference and the training matmul both multiply by the norm's weight
        with torch.set_grad_enabled(grad):
            close(src.matmul(x), x @ full.t(), rtol=1e-5, atol_frac=1e-5)


@pytest.mark.parametrize("kind", kind_params([FOUR_BIT_KINDS[3], FOUR_BIT_KINDS[4], EIGHT_BIT_KINDS[0]]))
def test_norms_independent_of_chunk_size(kind, monkeypatch):
    """‖W‖², the magnitude init and ‖W + sBA‖ do not depend on the chunk size: ‖W‖² and the init are bit-exact
    (per-row reductions), W·Aᵀ and the full norm agree to fp32 rounding (the matmul blocks differently)."""

    def measure():
        layer = DoRALinear(make_base(kind), r=R, alpha=ALPHA)
        m0 = layer.magnitude.detach().clone()
        randomize_adapter(layer)
        src = layer.weight_source
        return dict(
            m0=m0,
            sq=src.row_sq_norms(),
            wa=src.times_A(layer.lora_A),
            fast=layer.weight_norm(),
            exact=layer.weight_norm(exact=True),
            rows=src.rows_per_chunk(),
            dense=src.dense(torch.float32),
        )

    big = measure()
    assert big["rows"] == OUT
    for chunk in (IN * 3, IN * 16):
        monkeypatch.setattr(ws, "CHUNK_ELEMENTS", chunk)
        small = measure()
        assert small["rows"] < OUT
        assert torch.equal(small["m0"], big["m0"])
        assert torch.equal(small["sq"], big["sq"])
        assert torch.equal(small["dense"], big["dense"])
        for key in ("wa", "fast", "exact"):
            close(small[key], big[key], rtol=1e-6, atol_frac=1e-7, msg=key)


@pytest.mark.parametrize("kind", kind_params([NF4_DQ, EIGHT_BIT_KINDS[0]]))
def test_no_full_fp32_weight_for_norms(kind, monkeypatch):
    """Memory rule: magnitude init and the norms never build an (out, in) fp32 temporary of a quantized base."""
    monkeypatch.setattr(ws, "CHUNK_ELEMENTS", IN * 8)
    seen = []
    cls = type(ws.weight_source_for(make_base(kind)))
    orig_chunk = cls.row_chunk

    def spy_chunk(self, start, stop):
        out = orig_chunk(self, start, stop)
        seen.append(tuple(out.shape))
        return out

    orig_dq = bnb.functional.dequantize_4bit

    def spy_dq(A, quant_state=None, *args, **kwargs):
        out = orig_dq(A, quant_state, *args, **kwargs)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(cls, "row_chunk", spy_chunk)
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", spy_dq)
    layer = DoRALinear(make_base(kind), r=R, alpha=ALPHA)  # magnitude init
    randomize_adapter(layer)
    layer.weight_norm()
    layer.weight_norm(exact=True)
    layer.invalidate_cache()
    layer.dora_scale()
    assert seen, "no chunk was read"
    assert max(math.prod(s) for s in seen) <= IN * 8 < OUT * IN, seen


@pytest.mark.parametrize("kind", kind_params(QUANT_KINDS))
def test_norm_fast_equals_exact_equals_reference(kind):
    layer = DoRALinear(make_base(kind), r=R, alpha=ALPHA)
    randomize_adapter(layer)
    W = dequantized(layer.base_layer).double()
    ref = torch.linalg.norm(W + layer.scaling * layer.lora_B.double() @ layer.lora_A.double(), dim=1)
    close(layer.weight_norm().double(), ref, rtol=1e-5, atol_frac=1e-6)
    close(layer.weight_norm(exact=True).double(), ref, rtol=1e-5, atol_frac=1e-6)


@pytest.mark.parametrize("kind", kind_params(QUANT_KINDS))
def test_merge_in_place_refused_and_merge_and_unload_gives_dense(kind):
    layer = DoRALinear(make_base(kind), r=R, alpha=ALPHA)
    randomize_adapter(layer)
    layer.eval()
    with pytest.raises(TypeError, match="merge_and_unload"):
        layer.merge()
    assert not layer.merged
    x = torch.randn(5, IN)
    with torch.no_grad():
        y = layer(x)
        W = dequantized(layer.base_layer).double()
        Wp = W + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        Wp = Wp * (layer.magnitude.double() / torch.linalg.norm(Wp, dim=1))[:, None]
        bias = layer.base_layer.bias.detach().clone() if kind.bias else None
        model = merge_and_unload(Wrap(layer), dtype=torch.float32)
    plain = model.proj
    assert type(plain) is torch.nn.Linear and plain.weight.dtype == torch.float32
    assert (plain.bias is None) == (bias is None)
    if bias is not None:
        assert torch.equal(plain.bias.detach(), bias.float())
    close(plain.weight.detach().double(), Wp, rtol=1e-5, atol_frac=1e-6)
    with torch.no_grad():
        ym = model(x)
    if kind.kind == "8bit":
        # LLM.int8 also quantizes the activations, so the kernel output is only int8-accurate
        close(ym, y, rtol=2e-2, atol_frac=2e-2)
    else:
        close(ym, y, **tolerances(kind))


@pytest.mark.parametrize("kind", kind_params(FOUR_BIT_KINDS))
def test_merge_and_unload_4bit_default_dtype_is_compute_dtype(kind):
    layer = DoRALinear(make_base(kind), r=R, alpha=ALPHA)
    model = merge_and_unload(Wrap(layer))
    assert type(model.proj) is torch.nn.Linear
    assert model.proj.weight.dtype == kind.compute_dtype


@pytest.mark.parametrize("kind", kind_params(FOUR_BIT_KINDS))
def test_merge_and_unload_requantize_4bit_is_lossy_linear4bit(kind):
    layer = DoRALinear(make_base(kind), r=R, alpha=ALPHA)
    randomize_adapter(layer)
    merged = layer.merged_weight(torch.float32)
    qs = layer.base_layer.weight.quant_state
    model = merge_and_unload(Wrap(layer), requantize=True)
    new = model.proj
    assert type(new).__name__ == "Linear4bit"
    nqs = new.weight.quant_state
    assert nqs is not None
    assert (nqs.quant_type, nqs.blocksize, bool(nqs.nested), tuple(nqs.shape)) == (
        qs.quant_type,
        qs.blocksize,
        bool(qs.nested),
        (OUT, IN),
    )
    assert new.compute_dtype == kind.compute_dtype
    # exactly what bitsandbytes makes of the merged weight: lossy, one fresh quantization error
    expected = make_base(kind, weight=merged)
    assert torch.equal(dequantized(new), dequantized(expected))
    err = (dequantized(new) - merged).norm() / merged.norm()
    assert 0 < err < 0.2
    x = torch.randn(3, IN)
    with torch.no_grad():
        close(new(x), expected(x))


def test_4bit_merged_output_close_to_adapter_output():
    layer = DoRALinear(make_base(NF4_DQ), r=R, alpha=ALPHA)
    randomize_adapter(layer)
    layer.eval()
    x = torch.randn(4, IN)
    with torch.no_grad():
        y = layer(x)
        ym = merge_and_unload(Wrap(layer))(x)
    close(ym, y)
