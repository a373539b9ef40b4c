"""bitsandbytes 4-bit (NF4/FP4, optional double quant) and 8-bit (LLM.int8) bases as DoRA weight sources.

The row norms and W·Aᵀ are computed by dequantizing a few rows at a time: a chunk is a whole number of
quantization blocks, so each chunk is dequantized with bitsandbytes' own kernel on a slice of the packed bytes
and absmax, and the result is bit-identical to dequantizing the whole weight. Peak extra memory is one fp32
chunk (CHUNK_ELEMENTS values), never a full fp32 copy of the layer.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from copy import copy

import torch
from torch import nn

from dora_dist.nn.weight_source import WeightSource, at_least_fp32


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("4-bit/8-bit bases need bitsandbytes: pip install 'dora_dist[quant]'") from exc
    return bnb


def dequantize_absmax(quant_state) -> torch.Tensor:
    """Per-block absmax of a 4-bit weight as fp32, undoing double quantization (n/blocksize values)."""
    bnb = _bnb()
    if not quant_state.nested:
        return quant_state.absmax.float()
    absmax = bnb.functional.dequantize_blockwise(quant_state.absmax, quant_state.state2)
    return (absmax + quant_state.offset).float()


class _Dequant4bitMatmul(torch.autograd.Function):
    """x @ Wᵀ and W·Aᵀ from one dequantization of a 4-bit W; backward gives dX only (W is frozen, W·Aᵀ feeds the
    detached norm). Like bitsandbytes' MatMul4Bit it holds the dequantized weight only inside forward and
    dequantizes again in backward, so it saves nothing but the packed codes."""

    @staticmethod
    def forward(ctx, x, packed, quant_state, a_t, rows_per_chunk):
        bnb = _bnb()
        weight = bnb.functional.dequantize_4bit(packed, quant_state).to(x.dtype)
        out = torch.nn.functional.linear(x, weight)
        wa = torch.empty(weight.shape[0], a_t.shape[1], dtype=a_t.dtype, device=weight.device)
        for start in range(0, weight.shape[0], rows_per_chunk):  # fp32 per chunk: no full fp32 copy
            rows = weight[start : start + rows_per_chunk]
            wa[start : start + rows.shape[0]] = rows.to(a_t.dtype) @ a_t
        del weight
        ctx.quant_state = quant_state
        ctx.save_for_backward(packed)
        ctx.mark_non_differentiable(wa)
        return out, wa

    @staticmethod
    def backward(ctx, grad_out, _grad_wa):
        grad_x = None
        if ctx.needs_input_grad[0]:
            (packed,) = ctx.saved_tensors
            weight = _bnb().functional.dequantize_4bit(packed, ctx.quant_state).to(grad_out.dtype)
            grad_x = grad_out @ weight
        return grad_x, None, None, None, None


class BnB4bitWeight(WeightSource):
    """`bitsandbytes.nn.Linear4bit`: packed uint8 codes (two per byte) with per-block absmax."""

    def _quant_state(self):
        bnb = _bnb()
        # Only ask bitsandbytes to recover a lost quant_state when the module kept one: on a weight that was never
        # quantized, its helper fails with a bare AssertionError instead of our message below.
        fix = getattr(bnb.nn.modules, "fix_4bit_weight_quant_state_from_module", None)
        if fix is not None and getattr(self.module.weight, "quant_state", None) is None \
                and getattr(self.module, "quant_state", None) is not None:
            fix(self.module)
        qs = getattr(self.module.weight, "quant_state", None)
        if qs is None:
            raise ValueError(f"{type(self.module).__name__} weight is not quantized yet (no quant_state): move the "
                             "model to its device (or load it quantized) before applying DoRA")
        return qs

    @property
    def in_features(self) -> int:
        return self._quant_state().shape[1]

    @property
    def out_features(self) -> int:
        return self._quant_state().shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.module.compute_dtype or self._quant_state().dtype

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        qs = self._quant_state()
        cd = self.module.compute_dtype or x.dtype
        # Call the kernel directly (not module.forward): that would add the bias, and on some CPUs repack the
        # weight into a layout our chunked dequantization cannot slice.
        return bnb.matmul_4bit(x.to(cd), self.module.weight.t(), bias=None, quant_state=qs).to(x.dtype)

    def matmul_and_times_A(self, x: torch.Tensor, lora_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One dequantization for both products (bitsandbytes' training matmul dequantizes the whole weight anyway)."""
        qs = self._quant_state()
        if getattr(qs, "packing_format_for_cpu", False):
            return super().matmul_and_times_A(x, lora_A)
        cd = self.module.compute_dtype or x.dtype
        a_t = at_least_fp32(lora_A.detach()).t()
        out, wa = _Dequant4bitMatmul.apply(x.to(cd), self.module.weight.data, qs, a_t, self.rows_per_chunk())
        return out.to(x.dtype), wa

    def rows_per_chunk(self) -> int:
        qs = self._quant_state()
        align = qs.blocksize // math.gcd(self.in_features, qs.blocksize)  # rows per whole number of blocks
        rows = max(align, (super().rows_per_chunk() // align) * align)
        return min(rows, self.out_features)

    def row_chunk(self, start: int, stop: int) -> torch.Tensor:
        bnb = _bnb()
        qs = self._quant_state()
        n_in, bs = self.in_features, qs.blocksize
        if getattr(qs, "packing_format_for_cpu", False):
            # bitsandbytes repacked this weight for its CPU inference kernel; slicing is impossible, so fall back.
            return bnb.functional.dequantize_4bit(self.module.weight.data, qs)[start:stop].float()
        e0, e1 = start * n_in, stop * n_in
        if e0 % bs or (e1 % bs and stop != self.out_features):
            raise ValueError(f"row chunk [{start}, {stop}) is not aligned to 4-bit blocks of {bs}")
        absmax = self._absmax()[e0 // bs : -(-e1 // bs)]
        # e0 is even (a block boundary); an odd e1 (odd out*in, last chunk) still needs its final half byte.
        packed = self.module.weight.data.reshape(-1)[e0 // 2 : (e1 + 1) // 2]
        chunk_state = copy(qs)
        chunk_state.absmax, chunk_state.shape, chunk_state.dtype = absmax, torch.Size((stop - start, n_in)), torch.float32
        chunk_state.nested, chunk_state.state2, chunk_state.offset = False, None, None
        return bnb.functional.dequantize_4bit(packed, chunk_state).float()

    def _absmax(self) -> torch.Tensor:
        # Recomputed per chunk pass (cheap: in*out/blocksize values); cached for the duration of one reduction.
        cache = getattr(self, "_absmax_cache", None)
        if cache is None:
            cache = dequantize_absmax(self._quant_state())
        return cache

    @contextmanager
    def _absmax_cached(self):
        """Dequantize the absmax once for a whole pass over the row chunks."""
        self._absmax_cache = dequantize_absmax(self._quant_state())
        try:
            yield
        finally:
            self._absmax_cache = None

    def reduce_rows(self, fn, width):
        with self._absmax_cached():
            return super().reduce_rows(fn, width)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        with self._absmax_cached():
            return super().dense(dtype)

    def to_plain_module(self, weight: torch.Tensor, requantize: bool = False) -> nn.Module:
        if not requantize:
            return super().to_plain_module(weight)
        return requantize_4bit(self.module, weight)


def requantize_4bit(template: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new Linear4bit holding `weight` quantized like `template` (lossy: adds a fresh quantization error)."""
    bnb = _bnb()
    qs = template.weight.quant_state
    bias = template.bias
    new = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=bias is not None, compute_dtype=template.compute_dtype,
                            compress_statistics=bool(qs.nested), quant_type=qs.quant_type, device="meta")
    param = bnb.nn.Params4bit(weight.detach().to(qs.dtype).cpu(), requires_grad=False, quant_type=qs.quant_type,
                              blocksize=qs.blocksize, compress_statistics=bool(qs.nested))
    new.weight = param._quantize(weight.device) if hasattr(param, "_quantize") else param.to(weight.device)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return new


class BnB8bitWeight(WeightSource):
    """`bitsandbytes.nn.Linear8bitLt`: int8 codes with one absmax scale per output row (SCB)."""

    def _scb(self) -> torch.Tensor:
        scb = getattr(self.module.weight, "SCB", None)
        if scb is None:
            scb = self.module.state.SCB
        if scb is None:
            raise ValueError("Linear8bitLt weight is not quantized yet (no SCB): move the model to its device first")
        return scb

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None and self.bias.is_floating_point() else torch.float32

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        module = self.module
        module.state.is_training = module.training
        if module.weight.CB is not None:
            module.init_8bit_state()
        out = bnb.matmul(x, module.weight, bias=None, state=module.state)
        if not module.state.has_fp16_weights and module.state.CB is not None:
            module.weight.data = module.state.CB
        return out

    def row_chunk(self, start: int, stop: int) -> torch.Tensor:
        codes = self.module.weight.data[start:stop].float()
        return codes * (self._scb()[start:stop].float().unsqueeze(1) / 127.0)
