"""bitsandbytes 4-bit (NF4/FP4, optional double quant) and 8-bit (LLM.int8) bases as DoRA weight sources.

The row norms and W·Aᵀ are computed by dequantizing a few rows at a time: a chunk is a whole number of
quantization blocks, so each chunk is dequantized with bitsandbytes' own kernel on a slice of the packed bytes
and absmax, and the result is bit-identical to dequantizing the whole weight. Peak extra memory is one fp32
chunk (CHUNK_ELEMENTS values), never a full fp32 copy of the layer.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import copy
from typing import Any

import torch
from torch import nn

from dora_dist.nn.weight_source import RowsView, WeightSource, at_least_fp32, register_weight_source
from dora_dist.quant.decode4bit import bnb_decode_is_exact, decode_elements, packed_bytes, unpack_cpu_repacked


def _bnb() -> Any:  # bitsandbytes ships no type information
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("4-bit/8-bit bases need bitsandbytes: pip install 'dora_dist[quant]'") from exc
    return bnb


def dequantize_absmax(quant_state: Any) -> torch.Tensor:
    """Per-block absmax of a 4-bit weight as fp32, undoing double quantization (n/blocksize values)."""
    bnb = _bnb()
    if not quant_state.nested:
        return quant_state.absmax.float()
    absmax = bnb.functional.dequantize_blockwise(quant_state.absmax, quant_state.state2)
    return (absmax + quant_state.offset).float()


class _Dequant4bitMatmul(torch.autograd.Function):
    """x @ Wᵀ and W·Aᵀ from one dequantization of a 4-bit W; backward gives dX only (W is frozen, W·Aᵀ feeds the
    detached norm). Like bitsandbytes' MatMul4Bit it holds the dequantized weight only inside forward and
    dequantizes again in backward, so it saves nothing but a reference to the packed codes."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, source: BnB4bitWeight, a_t: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = source.dequantize_full(x.dtype)
        out = torch.nn.functional.linear(x, weight)
        wa = None
        if a_t is not None:
            wa = torch.empty(weight.shape[0], a_t.shape[1], dtype=a_t.dtype, device=weight.device)
            step = source.rows_per_chunk()
            for start in range(0, weight.shape[0], step):  # fp32 per chunk: no full fp32 copy
                rows = weight[start : start + step]
                wa[start : start + rows.shape[0]] = rows.to(a_t.dtype) @ a_t
            ctx.mark_non_differentiable(wa)
        del weight
        ctx.source = source
        return out, wa

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_wa: Any) -> tuple[torch.Tensor | None, None, None]:
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.source.dequantize_full(grad_out.dtype)
        return grad_x, None, None


class BnB4bitWeight(WeightSource):
    """`bitsandbytes.nn.Linear4bit`: packed 4-bit codes (two per byte, any `quant_storage` dtype) with per-block
    absmax. bitsandbytes' kernels are used where they decode the format exactly (see quant/decode4bit.py), the
    reference decode elsewhere, for the forward and the norms alike."""

    quantized = True
    fsdp_shardable = False

    def __init__(self, module: nn.Module | RowsView):
        super().__init__(module)
        self._absmax_cache: torch.Tensor | None = None

    def take_ownership(self) -> None:
        """Called once by the DoRA layer that wraps this base: undo a CPU repacking bitsandbytes may already have
        done (an eval-mode forward on an AVX512-BF16 CPU), and keep it from repacking the weight again, so the
        weight DoRA normalises is the one every forward multiplies by."""
        qs = self._quant_state()
        if getattr(qs, "packing_format_for_cpu", False):
            unpack_cpu_repacked(self.module.weight)
        if hasattr(self.module, "support_avx512bf16_for_cpu"):
            self.module.support_avx512bf16_for_cpu = False

    def _quant_state(self) -> Any:  # bitsandbytes' QuantState
        bnb = _bnb()
        # Only ask bitsandbytes to recover a lost quant_state when the module kept one: on a weight that was never
        # quantized, its helper fails with a bare AssertionError instead of our message below.
        fix = getattr(bnb.nn.modules, "fix_4bit_weight_quant_state_from_module", None)
        if (
            fix is not None
            and getattr(self.module.weight, "quant_state", None) is None
            and getattr(self.module, "quant_state", None) is not None
        ):
            fix(self.module)
        qs = getattr(self.module.weight, "quant_state", None)
        if qs is None:
            raise ValueError(
                f"{type(self.module).__name__} weight is not quantized yet (no quant_state): move the "
                "model to its device (or load it quantized) before applying DoRA"
            )
        if getattr(qs, "packing_format_for_cpu", False):
            unpack_cpu_repacked(self.module.weight)  # repacked behind our back (a direct call of the base layer)
        return qs

    def quant_state(self) -> Any:
        """bitsandbytes' QuantState of the weight (recovered, and any CPU repacking undone)."""
        return self._quant_state()

    @property
    def in_features(self) -> int:
        return self._quant_state().shape[1]

    @property
    def out_features(self) -> int:
        return self._quant_state().shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.module.compute_dtype or self._quant_state().dtype

    def bnb_kernels_exact(self) -> bool:
        return bnb_decode_is_exact(self.in_features, self._quant_state().blocksize)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.module.compute_dtype or x.dtype
        if self.bnb_kernels_exact():
            # The kernel directly (not module.forward): that would add the bias and, on some CPUs, repack the weight.
            qs = self._quant_state()
            return _bnb().matmul_4bit(x.to(cd), self.module.weight.t(), bias=None, quant_state=qs).to(x.dtype)
        out, _ = _Dequant4bitMatmul.apply(x.to(cd), self, None)  # type: ignore[no-untyped-call]  # torch's own
        return out.to(x.dtype)

    def matmul_and_times_A(self, x: torch.Tensor, lora_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One dequantization for both products (bitsandbytes' training matmul dequantizes the whole weight anyway)."""
        cd = self.module.compute_dtype or x.dtype
        a_t = at_least_fp32(lora_A.detach()).t()
        out, wa = _Dequant4bitMatmul.apply(x.to(cd), self, a_t)  # type: ignore[no-untyped-call]  # torch's own
        return out.to(x.dtype), wa

    @torch.no_grad()
    def dequantize_full(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole (out, in) weight in `dtype` (the compute dtype: what bitsandbytes' own matmul builds)."""
        qs = self._quant_state()
        if self.bnb_kernels_exact():
            return _bnb().functional.dequantize_4bit(self.module.weight.data, qs).to(dtype)
        return self.dense(dtype)

    def rows_per_chunk(self) -> int:
        qs = self._quant_state()
        align = qs.blocksize // math.gcd(self.in_features, qs.blocksize)  # rows per whole number of blocks
        rows = max(align, (super().rows_per_chunk() // align) * align)
        return min(rows, self.out_features)

    def row_chunk(self, start: int, stop: int) -> torch.Tensor:
        qs = self._quant_state()
        n_in, bs = self.in_features, qs.blocksize
        e0, e1 = start * n_in, stop * n_in
        packed = packed_bytes(self.module.weight.data)
        if not self.bnb_kernels_exact():
            return decode_elements(packed, self._absmax(), qs.quant_type, bs, e0, e1).view(stop - start, n_in)
        if e0 % bs or (e1 % bs and stop != self.out_features):
            raise ValueError(f"row chunk [{start}, {stop}) is not aligned to 4-bit blocks of {bs}")
        chunk_state = copy(qs)
        chunk_state.absmax = self._absmax()[e0 // bs : -(-e1 // bs)]
        chunk_state.shape, chunk_state.dtype = torch.Size((stop - start, n_in)), torch.float32
        chunk_state.nested, chunk_state.state2, chunk_state.offset = False, None, None
        return _bnb().functional.dequantize_4bit(packed[e0 // 2 : e1 // 2], chunk_state).float()

    def _absmax(self) -> torch.Tensor:
        """fp32 per-block absmax: cached for one pass over the row chunks, else recomputed (in·out/blocksize values)."""
        cache = self._absmax_cache
        return cache if cache is not None else dequantize_absmax(self._quant_state())

    @contextmanager
    def _absmax_cached(self) -> Iterator[None]:
        """Dequantize the absmax once for a whole pass over the row chunks."""
        self._absmax_cache = dequantize_absmax(self._quant_state())
        try:
            yield
        finally:
            self._absmax_cache = None

    def reduce_rows(self, fn: Callable[[torch.Tensor, int, int], torch.Tensor], width: int | None) -> torch.Tensor:
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
    template_weight: Any = template.weight  # a bitsandbytes Params4bit
    qs = template_weight.quant_state
    bias: Any = template.bias
    new = bnb.nn.Linear4bit(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        compute_dtype=template.compute_dtype,
        compress_statistics=bool(qs.nested),
        quant_type=qs.quant_type,
        device="meta",
    )
    param = bnb.nn.Params4bit(
        weight.detach().to(qs.dtype).cpu(),
        requires_grad=False,
        quant_type=qs.quant_type,
        blocksize=qs.blocksize,
        compress_statistics=bool(qs.nested),
    )
    new.weight = param._quantize(weight.device) if hasattr(param, "_quantize") else param.to(weight.device)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    new_module: nn.Module = new
    return new_module


class BnB8bitWeight(WeightSource):
    """`bitsandbytes.nn.Linear8bitLt`: int8 codes with one absmax scale per output row (SCB)."""

    quantized = True
    fsdp_shardable = False

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


def _bnb_layer(class_name: str) -> Callable[[nn.Module], bool]:
    """Matcher for a bitsandbytes layer class; a module can only be one if bitsandbytes is already imported."""

    def matches(module: nn.Module) -> bool:
        bnb = sys.modules.get("bitsandbytes")
        return bnb is not None and isinstance(module, getattr(bnb.nn, class_name))

    return matches


register_weight_source(_bnb_layer("Linear4bit"), BnB4bitWeight, "bitsandbytes Linear4bit (NF4/FP4)")
register_weight_source(_bnb_layer("Linear8bitLt"), BnB8bitWeight, "bitsandbytes Linear8bitLt")
