"""The DoRA epilogue as one autograd node: y = (m/n) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b, with n = ‖W + sBA‖ detached.

Why a custom autograd function. Written with plain torch ops the epilogue runs several elementwise passes over the
(tokens × out) output in forward and backward, and autograd keeps the pre-scale output z = x·Wᵀ + s·x·Aᵀ·Bᵀ alive
for dL/dm: one (tokens × out) activation more than LoRA. This node

- computes y with one elementwise pass (``addcmul``: b + base ⊙ m/n) and folds the low-rank product into the GEMM
  epilogue (``addmm_`` accumulates (x·Aᵀ)·(s·(m/n) ⊙ B)ᵀ into y in place), so z is never materialised;
- saves its *output* y instead of z. With y = (m/n) ⊙ z + b:

      dL/dz = g ⊙ m/n,       dL/dm = Σ_tokens g ⊙ z / n = Σ_tokens g ⊙ (y - b) / m          (m ≠ 0)

  The op after a DoRA layer often saves y as well (in a Llama block v_proj feeds attention, gate_proj the SiLU and
  up_proj the gate product); autograd then stores one tensor for both, and DoRA's extra activation is gone there.
- Rows with m = 0 lose z in y (their output is the bias); for those rows alone z is saved at forward time (a
  (tokens × k) slice, k = number of zero magnitudes, usually 0). Deciding that reads one boolean from the device
  (a host sync per layer and forward on a GPU, free on a CPU).
- **16-bit outputs keep the magnitude.** m/n differs from 1 by |Δm|/m ≈ 1e-4 … 1e-2 in a trained adapter, below
  bf16's half-ulp at 1 (2^-9 ≈ 2e-3) for most rows: rounding the scale to bf16 before it multiplies, as a plain
  ``base * scale.to(bf16)`` does, turns the forward into LoRA with a staircase magnitude while dL/dm assumes
  otherwise. So for bf16/fp16 the scale stays fp32 and ``scale ⊙ base + (x·Aᵀ)·(s·scale ⊙ B)ᵀ`` is summed in fp32
  and rounded once (`compose_16bit`), block by block over tokens so the fp32 temporaries stay small (on a CPU,
  cache-sized; one 16-bit tensor in and out, as before). The low-rank GEMM accumulates into that fp32 block (on
  CUDA a 16-bit GEMM with an fp32 output). dL/dz = g ⊙ m/n is formed the same way in backward. What survives is
  then what any 16-bit output can hold: the magnitude's effect on y arrives unbiased, and is exact on average over
  elements, as in peft's ``base + ((m/n − 1) ⊙ base + (m/n) ⊙ s·lora)`` whose bracket is fp32.
- For 16-bit outputs a bias is added *after* this node: recovering z from y − b would then cancel catastrophically
  when |b| ≫ |m/n·z| (y carries only 8 bits of mantissa), so y is saved before the bias (one extra activation, only
  for biased layers in bf16/fp16; Llama has no biases).

Under torch.compile the same math is written with plain ops (the data-dependent m = 0 branch would break the graph)
and inductor fuses the elementwise work and chooses what to save. With dropout active the layer keeps the
reference ``dora_output`` path (two base matmuls, as in peft).
"""

from __future__ import annotations

from typing import Any, Literal

import torch


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(…, features) -> (tokens, features) without copying when possible."""
    return t.reshape(-1, t.shape[-1])


#: tokens per block of the Σ_tokens g ⊙ y reduction for 16-bit tensors (the product stays in cache)
_DOT_BLOCK = 64


def _column_dot(g: torch.Tensor, y: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Σ_t g[t] ⊙ y[t] (per column) accumulated in `acc`. fp32/fp64: one product and one reduction; 16-bit: over
    blocks of tokens, each block's product formed in `acc` while the block is in cache (a 16-bit product overflows
    fp16 for |g·y| > 65504, e.g. outputs ~1e4 from magnitudes ~1e4, although the sum / m it feeds is small)."""
    if g.dtype in (torch.float32, torch.float64):
        return (g * y).sum(0, dtype=acc)
    out = torch.zeros(g.shape[1], dtype=acc, device=g.device)
    for start in range(0, g.shape[0], _DOT_BLOCK):
        out += (g[start : start + _DOT_BLOCK].to(acc) * y[start : start + _DOT_BLOCK].to(acc)).sum(0)
    return out


#: fp32 elements per block of `compose_16bit` / `backward_16bit_cpu`: on a CPU a block's fp32 temporaries stay in L2;
#: on a GPU a block is a whole large kernel (the launches are then few)
_BLOCK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 22}
_MM_FP32_OUT: dict[str, bool] = {}  # device type -> torch.mm(..., out_dtype=float32) works for 16-bit inputs


def _rows_per_block(t: torch.Tensor) -> int:
    return max(1, _BLOCK_ELEMENTS.get(t.device.type, 1 << 24) // max(1, t.shape[-1]))


def _lowrank_fp32(xa: torch.Tensor, b_scaled: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """(tokens, r) · (out, r)ᵀ with fp32 accumulation *and* an fp32 result. On CUDA the 16-bit GEMM with
    out_dtype=float32 (tensor cores; an fp32 GEMM there is ~10x slower); elsewhere (a CPU's fp32 GEMM is at least
    as fast as its bf16 one) an fp32 GEMM over the fp32 inputs."""
    dev = xa.device.type
    if dev == "cuda" and _MM_FP32_OUT.get(dev, True):
        try:
            return torch.mm(xa.to(dt), b_scaled.to(dt).t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # an older torch: plain fp32 from now on
            _MM_FP32_OUT[dev] = False
    return torch.mm(xa.float(), b_scaled.float().t())


def compose_16bit(
    base: torch.Tensor, scale: torch.Tensor, xa: torch.Tensor, b_scaled: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out = round(scale ⊙ base + xa·b_scaledᵀ) for 2-D 16-bit `base`/`out` (they may be the same tensor), with the
    scale, the products and the sum in fp32: one rounding, so a scale within half an ulp of 1 still reaches out."""
    dt = out.dtype
    scale = scale.float()
    step = _rows_per_block(out)
    # A CPU runs a mixed-dtype elementwise op ~25x slower than a cast plus an fp32 op (no vectorised dynamic
    # casting); a GPU reads the 16-bit block directly.
    upcast = out.device.type == "cpu"
    for i in range(0, out.shape[0], step):
        j = min(i + step, out.shape[0])
        acc = _lowrank_fp32(xa[i:j], b_scaled, dt)
        acc.addcmul_(base[i:j].float() if upcast else base[i:j], scale)
        out[i:j].copy_(acc)
    return out


def scale_rows_16bit(g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(g ⊙ scale) for a 2-D 16-bit g with the fp32 scale (the backward's dL/dz; not g ⊙ round(scale)): one
    kernel on an accelerator, fp32 math and a 16-bit store (a CPU takes backward_16bit_cpu instead)."""
    return torch.mul(g, scale.float(), out=torch.empty_like(g))


def backward_16bit_cpu(
    g: torch.Tensor,
    y: torch.Tensor,
    xa: torch.Tensor,
    b_scaled: torch.Tensor,
    scale: torch.Tensor,
    need_base: bool,
    need_xa: bool,
    need_b: bool,
    need_m: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The node's backward for 16-bit g, y on a CPU, in one pass over cache-sized token blocks, everything in fp32:
    (round(g ⊙ scale), g·b_scaled, gᵀ·xa, Σ_t g ⊙ y), None where not needed. A CPU without native bf16 runs the
    16-bit skinny GEMMs (out × r) many times slower than fp32 ones (LoRA's own path is fp32 there), and each block's
    fp32 copy of g serves all four products while it is in cache."""
    acc = scale.dtype
    tokens, out = g.shape
    d_base = torch.empty_like(g) if need_base else None
    d_xa = torch.empty(tokens, b_scaled.shape[1], dtype=acc) if need_xa else None
    g_xa = torch.zeros(out, b_scaled.shape[1], dtype=acc) if need_b else None
    gy = torch.zeros(out, dtype=acc) if need_m else None
    b_scaled, xa = b_scaled.to(acc), xa.to(acc)
    step = _rows_per_block(g)
    for i in range(0, tokens, step):
        j = min(i + step, tokens)
        gb = g[i:j].to(acc)
        if need_xa:
            assert d_xa is not None
            torch.mm(gb, b_scaled, out=d_xa[i:j])
        if need_b:
            assert g_xa is not None
            g_xa.addmm_(gb.t(), xa[i:j])
        if need_m:
            assert gy is not None
            gy += (gb * y[i:j].to(acc)).sum(0)
        if need_base:
            assert d_base is not None
            d_base[i:j].copy_(gb.mul_(scale))
    return d_base, d_xa, g_xa, gy


def is_16bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


class DoRAEpilogue(torch.autograd.Function):
    """y = scale ⊙ base_out + (x·Aᵀ)·(s·scale ⊙ B)ᵀ [+ bias], scale = m / denom (denom: detached norm, 0 -> 1)."""

    @staticmethod
    def forward(
        ctx: Any,
        base_out: torch.Tensor,
        xa: torch.Tensor,
        lora_B: torch.Tensor,
        magnitude: torch.Tensor,
        denom: torch.Tensor,
        bias: torch.Tensor | None,
        scaling: float,
        consume_base: bool = False,
    ) -> torch.Tensor:
        dt = base_out.dtype
        acc = torch.promote_types(magnitude.dtype, torch.float32)
        scale = magnitude.to(acc) / denom.to(acc)  # (out,), ≥ fp32
        xa2 = _flat(xa)
        zero_idx = z_zero = None
        if ctx.needs_input_grad[3] and bool((magnitude == 0).any()):
            # y has no z for these rows: keep z's columns (tokens × k), computed without the scale.
            zero_idx = (magnitude == 0).nonzero().squeeze(1)
            z_zero = _flat(base_out)[:, zero_idx].to(acc) + scaling * (xa2.to(acc) @ lora_B.to(acc)[zero_idx].t())
        # base_out is the base matmul's fresh output, used by nothing else: scale it in place (no new
        # (tokens × out) buffer, whose first touch costs page faults on a CPU) and mark it dirty for autograd.
        in_place = (
            consume_base
            and base_out.is_contiguous()
            and base_out._base is None
            and not (base_out.is_leaf and base_out.requires_grad)
        )
        b_scaled = lora_B.to(acc) * (scaling * scale)[:, None]  # (out, r): s·(m/n) ⊙ B, ≥ fp32
        if is_16bit(dt) and bias is None:
            # scale and low-rank term summed in fp32, one rounding (see the module docstring)
            y = base_out if in_place else torch.empty_like(base_out, memory_format=torch.contiguous_format)
            compose_16bit(_flat(base_out), scale, xa2, b_scaled, _flat(y))
            if in_place:
                ctx.mark_dirty(base_out)
        else:
            scale_dt = scale.to(dt)  # fp32/fp64: exact enough (no 16 bits)
            if bias is not None:
                y = torch.addcmul(bias.to(dt), base_out, scale_dt)  # one pass: b + base ⊙ m/n
            elif in_place:
                y = base_out.mul_(scale_dt)
                ctx.mark_dirty(base_out)
            else:
                y = base_out * scale_dt
            _flat(y).addmm_(xa2.to(dt), b_scaled.to(dt).t())  # low-rank term accumulated in the GEMM
        safe_m = torch.where(magnitude == 0, torch.ones_like(magnitude), magnitude).to(acc)
        ctx.save_for_backward(
            y, xa, lora_B, scale, safe_m, denom, bias.detach().clone() if bias is not None else None, zero_idx, z_zero
        )
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.m_dtype = magnitude.dtype
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, xa, lora_B, scale, safe_m, denom, bias, zero_idx, z_zero = ctx.saved_tensors
        s = ctx.scaling
        dt = y.dtype
        g2 = _flat(g.to(dt))
        need_base, need_xa, need_b, need_m, _, need_bias = ctx.needs_input_grad[:6]
        # dL/dz = g ⊙ m/n is only materialised for the base path; the low-rank grads take the scale on the
        # small side: d(xa) = g·(s·m/n ⊙ B), dB = s·m/n ⊙ (gᵀ·xa)   (no (tokens × out) pass when x needs no grad)
        d_xa = d_b = d_m = d_bias = gy = None
        s_scale = scale * s  # (out,), ≥ fp32
        xa_shape = (*xa.shape[:-1], xa.shape[-1])
        if is_16bit(dt) and g2.device.type == "cpu":
            b_scaled = lora_B.to(s_scale.dtype) * s_scale[:, None]
            d_base, d_xa, g_xa, gy = backward_16bit_cpu(
                g2, _flat(y), _flat(xa), b_scaled, scale, need_base, need_xa, need_b, need_m
            )
            # each is None exactly when it is not needed
            d_base = d_base.view(y.shape) if need_base else None  # type: ignore[union-attr]
            d_xa = d_xa.view(xa_shape).to(xa.dtype) if need_xa else None  # type: ignore[union-attr]
            d_b = (g_xa * s_scale[:, None]).to(lora_B.dtype) if need_b else None
        else:
            if not need_base:
                d_base = None
            elif is_16bit(dt):
                d_base = scale_rows_16bit(g2, scale).view(y.shape)  # fp32 scale, one rounding
            else:
                d_base = (g2 * scale.to(dt)).view(y.shape)
            if need_xa:
                b_scaled = (lora_B.to(s_scale.dtype) * s_scale[:, None]).to(dt)
                d_xa = (g2 @ b_scaled).view(xa_shape).to(xa.dtype)
            if need_b:
                d_b = ((g2.t() @ _flat(xa).to(dt)).to(s_scale.dtype) * s_scale[:, None]).to(lora_B.dtype)
        if need_m or need_bias:
            acc = scale.dtype
            g_sum = g2.sum(0, dtype=acc) if (ctx.has_bias or need_bias) else None
            if need_m:
                if gy is None:
                    gy = _column_dot(g2, _flat(y), acc)  # Σ g ⊙ y, fp32 accumulation
                if ctx.has_bias:
                    gy = gy - bias.to(acc) * g_sum  # Σ g ⊙ (y - b)
                d_m = gy / safe_m
                if zero_idx is not None:
                    d_m[zero_idx] = (g2[:, zero_idx].to(acc) * z_zero).sum(0) / denom.to(acc)[zero_idx]
                d_m = d_m.to(ctx.m_dtype)
            if need_bias:
                d_bias = g_sum
        return (d_base, d_xa, d_b, d_m, None, d_bias) + (None,) * (len(ctx.needs_input_grad) - 6)


def dora_epilogue_reference(
    base_out: torch.Tensor,
    xa: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    denom: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """The same function with plain torch ops (autograd and inductor see every op; used under torch.compile)."""
    dt = base_out.dtype
    scale = magnitude / denom  # ≥ fp32: denom is the fp32 norm
    # s·(m/n) folded into B, as in the fused node: autograd then never forms s·(m/n) ⊙ g over (tokens × out) in
    # 16 bits (it overflows fp16 for m/n ~ 1e4 although every gradient is small). base·scale + lora, not
    # torch.add(alpha=): torch 2.13's inductor folds an alpha-add of a matmul output into the GEMM with wrong
    # results on the CPU (tests/unit/test_compile.py holds this)
    b_scaled = (lora_B * (scaling * scale)[:, None]).to(xa.dtype)
    low_rank = torch.nn.functional.linear(xa, b_scaled)
    if is_16bit(dt):
        # fp32 scale and sum, one rounding (inductor fuses the casts into one elementwise kernel)
        acc = torch.promote_types(scale.dtype, torch.float32)
        y = (base_out.to(acc) * scale + low_rank.to(acc)).to(dt)
    else:
        y = base_out * scale.to(dt) + low_rank.to(dt)
    return y if bias is None else y + bias.to(dt)


def dora_epilogue(
    base_out: torch.Tensor,
    xa: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    denom: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    consume_base: bool = False,
) -> torch.Tensor:
    """y = (m/denom) ⊙ (base_out + s·xa·Bᵀ) + b; denom is the detached row norm with zeros replaced by 1.

    consume_base=True lets the fused node write y into base_out's memory (the caller must not use base_out again;
    DoRALinear passes its fresh base-matmul output). Dispatches to the fused node in eager mode and to plain ops
    while torch.compile traces."""
    if not _FUSED or torch.compiler.is_compiling():
        return dora_epilogue_reference(base_out, xa, lora_B, magnitude, denom, bias, scaling)
    denom = denom.detach()
    if bias is not None and base_out.dtype not in (torch.float32, torch.float64):
        # torch's Function.apply is unannotated
        y: torch.Tensor = DoRAEpilogue.apply(  # type: ignore[no-untyped-call]
            base_out, xa, lora_B, magnitude, denom, None, scaling, consume_base
        )
        return y + bias.to(base_out.dtype)
    out: torch.Tensor = DoRAEpilogue.apply(  # type: ignore[no-untyped-call]
        base_out, xa, lora_B, magnitude, denom, bias, scaling, consume_base
    )
    return out


_FUSED = True


class use_fused:
    """Context manager (benchmarks, tests): `with use_fused(False):` runs the plain-op epilogue in eager mode too,
    i.e. the pre-fusion behaviour that saves z."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> use_fused:
        global _FUSED
        self.prev, _FUSED = _FUSED, self.enabled
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        global _FUSED
        _FUSED = self.prev
        return False
