"""Shared helpers for the DoRA layer tests: deterministic bases of every kind and the matching peft layer.

Every base factory builds a *fresh* module from the same dense weights each time it is called, so our layer and
peft's layer sit on identical (bit-equal) but distinct base modules. Quantized bases are quantized the way
bitsandbytes does it on load: `load_state_dict` of the dense weights, then `.to("cpu")`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

IN, OUT, R = 64, 48, 4  # tiny shapes: 4-bit blocks of 64 divide IN, so chunks can be checked
ALPHA = 8.0


@dataclass(frozen=True)
class BaseKind:
    name: str
    kind: str  # linear | conv1d | 4bit | 8bit
    bias: bool = True
    quant_type: str = "nf4"
    double_quant: bool = False
    compute_dtype: torch.dtype | None = torch.float32

    @property
    def quantized(self) -> bool:
        return self.kind in ("4bit", "8bit")

    @property
    def low_precision(self) -> bool:
        return self.compute_dtype == torch.bfloat16


DENSE_KINDS = [
    BaseKind("linear", "linear"),
    BaseKind("linear_nobias", "linear", bias=False),
    BaseKind("conv1d", "conv1d"),
]
FOUR_BIT_KINDS = [
    BaseKind(
        f"{qt}_dq{int(dq)}_{'bf16' if cd == torch.bfloat16 else 'fp32'}",
        "4bit",
        quant_type=qt,
        double_quant=dq,
        compute_dtype=cd,
    )
    for qt in ("nf4", "fp4")
    for dq in (False, True)
    for cd in (torch.float32, torch.bfloat16)
]
EIGHT_BIT_KINDS = [BaseKind("int8", "8bit"), BaseKind("int8_nobias", "8bit", bias=False)]
ALL_KINDS = DENSE_KINDS + FOUR_BIT_KINDS + EIGHT_BIT_KINDS
FP32_KINDS = [k for k in ALL_KINDS if not k.low_precision]


def kind_params(kinds):
    return [pytest.param(k, id=k.name) for k in kinds]


def dense_weights(out_f: int = OUT, in_f: int = IN, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) * 0.1 if bias else None
    return w, b


def make_base(
    kind: BaseKind,
    out_f: int = OUT,
    in_f: int = IN,
    seed: int = 0,
    weight: torch.Tensor | None = None,
    bias_t: torch.Tensor | None = None,
) -> nn.Module:
    """A fresh base module of the given kind holding deterministic weights (out_f, in_f)."""
    w, b = dense_weights(out_f, in_f, seed, kind.bias)
    if weight is not None:
        w = weight
    if bias_t is not None:
        b = bias_t
    if kind.kind == "linear":
        m = nn.Linear(in_f, out_f, bias=kind.bias)
        with torch.no_grad():
            m.weight.copy_(w)
            if kind.bias:
                m.bias.copy_(b)
        return m
    if kind.kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        m = Conv1D(out_f, in_f)
        with torch.no_grad():
            m.weight.copy_(w.t())
            m.bias.copy_(b)
        return m
    import bitsandbytes as bnb

    state = {"weight": w.clone()}
    if kind.bias:
        state["bias"] = b.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind.kind == "4bit":
            m = bnb.nn.Linear4bit(
                in_f,
                out_f,
                bias=kind.bias,
                compute_dtype=kind.compute_dtype,
                compress_statistics=kind.double_quant,
                quant_type=kind.quant_type,
            )
            m.load_state_dict(state)
            m = m.to("cpu")
            assert m.weight.quant_state is not None, "4-bit weight was not quantized"
            # On AVX512-BF16 CPUs bitsandbytes' eval-mode forward repacks the weight in place for an inference
            # kernel that multiplies with a bf16 copy of the absmax: another weight than the quantized one, and an
            # assertion for out_features % 32 != 0. dora_dist switches that off on the bases it wraps; reference
            # layers built here (peft's) get the same, so both sides multiply by the same weight on every CPU.
            m.support_avx512bf16_for_cpu = False
            assert m.weight.quant_state.nested == kind.double_quant
            assert m.weight.quant_state.quant_type == kind.quant_type
        else:
            m = bnb.nn.Linear8bitLt(in_f, out_f, bias=kind.bias, has_fp16_weights=False, threshold=0.0)
            m.load_state_dict(state)
            m = m.to("cpu")
            assert m.weight.dtype == torch.int8 and m.weight.SCB is not None, "8-bit weight was not quantized"
    return m


def reference_dequantize_4bit(packed: torch.Tensor, qs, dtype: torch.dtype | None = None) -> torch.Tensor:
    """bitsandbytes' 4-bit format decoded by hand, the same on every CPU: code table × absmax of the block, blocks
    of `blocksize` consecutive values of the *flattened* weight (as bitsandbytes quantizes), two codes per byte high
    nibble first; with double quant the absmax is code2[q] × absmax2[block // 256] + offset, in fp32 and in that
    order (bitsandbytes' dequantize_blockwise). Computed in fp32, then cast to dtype (default: the quantized dtype).

    bitsandbytes' own CPU kernels agree with this only when in_features is a multiple of the block size (then no
    block straddles two rows: every real LLM layer); on AVX512 CPUs they decode other shapes differently, so tests
    compare with bitsandbytes' kernels only for such shapes, and with this reference always."""
    import bitsandbytes.functional as bf

    n = int(qs.shape[0]) * int(qs.shape[1])
    data = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([data >> 4, data & 0xF], dim=-1).reshape(-1)[:n].long()
    code = bf.get_4bit_type(qs.quant_type, device="cpu").float()
    if qs.nested:
        q = qs.absmax.reshape(-1).long()
        absmax2 = qs.state2.absmax.float()[torch.arange(q.numel()) // qs.state2.blocksize]
        absmax = qs.state2.code.float()[q] * absmax2 + torch.tensor(float(qs.offset), dtype=torch.float32)
    else:
        absmax = qs.absmax.float().reshape(-1)
    values = code[codes] * absmax[torch.arange(n) // qs.blocksize]
    return values.reshape(tuple(qs.shape)).to(dtype or qs.dtype)


def bnb_kernels_agree(in_features: int, blocksize: int = 64) -> bool:
    """Where every bitsandbytes dequantize kernel gives the reference values (see reference_dequantize_4bit)."""
    return in_features % blocksize == 0


def dequantized(base: nn.Module) -> torch.Tensor:
    """The reference dense (out, in) fp32 weight of a base: 4-bit decoded by hand (reference_dequantize_4bit),
    8-bit as codes × SCB / 127."""
    name = type(base).__name__
    if name == "Linear4bit":
        return reference_dequantize_4bit(base.weight.data, base.weight.quant_state, torch.float32)
    if name == "Linear8bitLt":
        import bitsandbytes.functional as bf

        scb = base.weight.SCB if getattr(base.weight, "SCB", None) is not None else base.state.SCB
        return bf.int8_vectorwise_dequant(base.weight.data, scb).float()
    if name == "Conv1D":
        return base.weight.detach().t().float()
    return base.weight.detach().float()


class Wrap(nn.Module):
    """A one-layer model so peft can inject into `proj`."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.proj = base
        self.is_loaded_in_4bit = type(base).__name__ == "Linear4bit"
        self.is_loaded_in_8bit = type(base).__name__ == "Linear8bitLt"

    def forward(self, x):
        return self.proj(x)


def make_peft_layer(
    base: nn.Module,
    r: int = R,
    alpha: float = ALPHA,
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = True,
) -> nn.Module:
    """peft's LoRA/DoRA layer over `base` (built by peft's own dispatch, as get_peft_model would)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=["proj"],
        use_dora=use_dora,
        use_rslora=use_rslora,
        fan_in_fan_out=type(base).__name__ == "Conv1D",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = inject_adapter_in_model(cfg, Wrap(base))
    layer = model.proj
    expected = {"Linear4bit": "Linear4bit", "Linear8bitLt": "Linear8bitLt"}.get(type(base).__name__, "Linear")
    assert type(layer).__name__ == expected, f"peft dispatched {type(layer).__name__}, expected {expected}"
    # peft creates the adapter in the base's dtype (bf16 for a bf16-compute 4-bit base); get_peft_model then
    # upcasts bf16/fp16 adapters to fp32 (autocast_adapter_dtype=True, its default). inject_adapter_in_model does
    # not, so do the same here: both layers then hold fp32 adapters, as ours does by default.
    with torch.no_grad():
        for p in peft_params(layer).values():
            p.data = p.data.float()
    return layer


def peft_params(layer: nn.Module) -> dict[str, nn.Parameter]:
    out = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight}
    if layer.lora_magnitude_vector:
        out["magnitude"] = layer.lora_magnitude_vector["default"].weight
    return out


def randomize_adapter(layer: nn.Module, seed: int = 1, b_scale: float = 0.3) -> None:
    """Give a DoRALinear a non-trivial adapter: random A, non-zero B, magnitude perturbed away from ‖W‖."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) / layer.in_features**0.5)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * b_scale)
        if layer.magnitude is not None:
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))


def copy_into_peft(ours: nn.Module, peft_layer: nn.Module) -> None:
    with torch.no_grad():
        for key, p in peft_params(peft_layer).items():
            p.copy_(getattr(ours, key))


def close(actual, expected, rtol=1e-5, atol_frac=1e-6, msg=""):
    """assert_close with rtol and an atol scaled to the expected tensor's magnitude."""
    atol = atol_frac * float(expected.detach().abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


MODES = {  # name: (dropout, training)
    "train": (0.0, True),
    "eval": (0.0, False),
    "train_dropout": (0.25, True),
    "eval_dropout": (0.25, False),
}


def forward_backward(
    layer: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, g: torch.Tensor, seed: int = 1234
) -> dict[str, torch.Tensor]:
    """Output and gradients (A, B, m, x) of one forward/backward; the RNG is seeded so dropout masks agree."""
    for p in params.values():
        p.grad = None
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    (y.float() * g).sum().backward()
    out = {"out": y.detach()}
    out.update({f"grad_{k}": p.grad.detach().clone() for k, p in params.items()})
    out["grad_x"] = x.grad.detach()
    return out


def ours_params(layer) -> dict[str, nn.Parameter]:
    out = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}
    if layer.magnitude is not None:
        out["magnitude"] = layer.magnitude
    return out


def run_parity(kind: BaseKind, mode: str, use_rslora: bool = False, use_dora: bool = True, steps: int = 2):
    """Build our layer and peft's on identical bases with identical adapters; return both results per step.

    Two forward/backward steps with different seeds, so the second dropout mask differs from the first.
    """
    from dora_dist import DoRALinear

    dropout, training = MODES[mode]
    ours = DoRALinear(make_base(kind), r=R, alpha=ALPHA, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora)
    theirs = make_peft_layer(make_base(kind), dropout=dropout, use_rslora=use_rslora, use_dora=use_dora)
    if use_dora:  # magnitude initialised from the same (dequantized) base weight
        close(ours.magnitude, peft_params(theirs)["magnitude"], msg="initial magnitude")
    assert ours.scaling == theirs.scaling["default"]
    randomize_adapter(ours)
    copy_into_peft(ours, theirs)
    ours.train(training)
    theirs.train(training)
    g = torch.Generator().manual_seed(7)
    results = []
    for step in range(steps):
        x = torch.randn(2, 3, IN, generator=g)
        gy = torch.randn(2, 3, OUT, generator=g)
        a = forward_backward(ours, ours_params(ours), x, gy, seed=100 + step)
        if step and kind.kind == "8bit" and use_dora:
            # peft 0.21 + bitsandbytes 0.50 on the CPU: peft's DoRA path re-assigns `module.weight` of a
            # Linear8bitLt after dequantizing it, which loses the SCB, and its second forward raises
            # "'NoneType' object has no attribute 'unsqueeze'". Compare our later steps with a fresh peft layer.
            theirs = make_peft_layer(make_base(kind), dropout=dropout, use_rslora=use_rslora, use_dora=use_dora)
            copy_into_peft(ours, theirs)
            theirs.train(training)
        b = forward_backward(theirs, peft_params(theirs), x, gy, seed=100 + step)
        results.append((a, b))
    return ours, theirs, results


def assert_parity(results, rtol=1e-5, atol_frac=1e-6):
    for step, (a, b) in enumerate(results):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.isfinite(a[key]).all(), f"{key} not finite"
            close(a[key], b[key], rtol=rtol, atol_frac=atol_frac, msg=f"step {step}: {key} differs from peft")
