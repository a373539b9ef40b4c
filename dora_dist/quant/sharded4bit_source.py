"""DoRA weight source for `ShardedLinear4bit`.

`module.weight` of a ShardedLinear4bit is, depending on where we are:
- a `Sharded4bitTensor` parameter (no FSDP, or a model not yet sharded): rows are dequantized chunk by chunk;
- a DTensor whose local tensor is a `Sharded4bitTensor` holding this rank's rows (FSDP2, sharded state, i.e.
  outside forward/backward): only the local rows are reachable, through a source over them
  (`source.over_rows(weight.to_local())`); the FSDP2 engine computes the norms from them
  (parallel.fsdp2.init_sharded_norms). This module does no collective work;
- a plain dense tensor (FSDP2, unsharded state inside forward/backward): FSDP all-gathered the packed bytes and
  `fsdp_post_all_gather` dequantized them; the matmul and DoRA's per-step cross term W·Aᵀ use this tensor, which
  FSDP materialised for the forward matmul anyway (no extra communication).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dora_dist.nn.weight_source import WeightSource, at_least_fp32, is_dtensor, register_weight_source
from dora_dist.quant.sharded4bit import Linear4bitFunction, Sharded4bitTensor
from dora_dist.quant.sharded4bit_linear import ShardedLinear4bit


class Sharded4bitWeight(WeightSource):
    """Weight source of `ShardedLinear4bit` (plain, FSDP2-sharded, or FSDP2-unsharded-dense)."""

    quantized = True

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    def _weight(self) -> Any:  # a Sharded4bitTensor, or the dense all-gathered weight inside an FSDP2 forward
        w = self.module.weight
        if is_dtensor(w):
            raise RuntimeError(
                "the 4-bit weight is sharded (FSDP2, outside forward): only its local rows are available here; use "
                "the engine's init_sharded_norms, or call inside forward"
            )
        return w

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight()
        if isinstance(w, Sharded4bitTensor):
            return Linear4bitFunction.apply(x, w.detach()).to(x.dtype)  # type: ignore[no-untyped-call]  # torch's
        return nn.functional.linear(x, w.to(x.dtype))  # FSDP2 forward: already dequantized after the all-gather

    def rows_per_chunk(self) -> int:
        w = self.module.weight
        if not isinstance(w, Sharded4bitTensor) and not is_dtensor(w) and w.dtype in (torch.float32, torch.float64):
            return self.out_features
        return super().rows_per_chunk()

    def row_chunk(self, start: int, stop: int) -> torch.Tensor:
        w = self._weight()
        if isinstance(w, Sharded4bitTensor):
            return w.dequantize_rows(start, stop, torch.float32)
        return at_least_fp32(w.detach()[start:stop])

    def row_sq_norms(self) -> torch.Tensor:
        if is_dtensor(self.module.weight):
            raise RuntimeError(
                "the 4-bit weight is sharded (FSDP2, outside forward): its row norms come from the "
                "local rows through the engine (parallel.fsdp2.init_sharded_norms)"
            )
        return super().row_sq_norms()

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self._weight()
        if isinstance(w, Sharded4bitTensor):
            return w.dequantize(dtype or w.dtype)
        return super().dense(dtype)

    def to_plain_module(self, weight: torch.Tensor, requantize: bool = False) -> nn.Module:
        if not requantize:
            return super().to_plain_module(weight)
        w = self._weight()
        meta = w.meta
        new = Sharded4bitTensor.from_dense(weight, meta.quant_type, meta.blocksize, meta.nested, w.dtype)
        return ShardedLinear4bit(new, self.bias)


register_weight_source(
    lambda m: isinstance(m, ShardedLinear4bit),
    Sharded4bitWeight,
    "dora_dist ShardedLinear4bit (FSDP2-shardable NF4/FP4)",
)
