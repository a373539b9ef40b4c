"""ShardedLinear4bit: a frozen linear layer over a Sharded4bitTensor weight (the FSDP2-shardable QDoRA base)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dora_dist.nn.weight_source import is_dtensor
from dora_dist.quant.sharded4bit import Sharded4bitTensor


class ShardedLinear4bit(nn.Module):
    """A frozen linear layer whose weight is a Sharded4bitTensor parameter (FSDP2-shardable QLoRA/QDoRA base)."""

    def __init__(self, weight: Sharded4bitTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight.dtype

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> ShardedLinear4bit:
        """From an nn.Linear (quantized as bnb does) or a bitsandbytes Linear4bit (re-laid out, exact)."""
        weight: Any = linear.weight  # nn.Linear's Tensor or bitsandbytes' Params4bit
        if getattr(weight, "quant_state", None) is not None:  # a bitsandbytes Params4bit
            w = Sharded4bitTensor.from_linear4bit(linear, compute_dtype)
        else:
            w = Sharded4bitTensor.from_dense(
                weight.detach(), quant_type, blocksize, double_quant, compute_dtype or weight.dtype
            )
        bias: Any = linear.bias
        return cls(w, bias)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> ShardedLinear4bit:
        w = Sharded4bitTensor.empty(out_features, in_features, quant_type, blocksize, double_quant, dtype, device)
        b = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        return cls(w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (a plain tensor is returned as is)."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]  # a DTensor (no torch.distributed here)


def packed_bytes(module: nn.Module) -> int:
    """Bytes of 4-bit weight storage this rank holds in `module` (all ShardedLinear4bit layers, local shards)."""
    total = 0
    for m in module.modules():
        if isinstance(m, ShardedLinear4bit):
            w = local_tensor(m.weight)
            if isinstance(w, Sharded4bitTensor):
                total += w.packed_nbytes()
    return total
