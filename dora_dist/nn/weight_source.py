"""Weight sources: a frozen base layer seen as an (out, in) matrix.

`DoRALinear` never touches a base weight directly. It asks its weight source for the few things DoRA needs:
the base matmul, per-row squared norms, W·Aᵀ and (for merging) the dense weight. Each kind of base (dense
`nn.Linear`, transformers `Conv1D`, bitsandbytes 4-bit and 8-bit) is one small subclass, so quantized and
sharded bases never need a full fp32 copy of the weight: everything is computed over row chunks.

A source reads `module.weight` on every call instead of holding the tensor, because FSDP2 and ZeRO-3 swap the
parameter object between its sharded and unsharded forms.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Elements per dequantized fp32 chunk: 4M elements = 16 MiB, whatever the layer size.
CHUNK_ELEMENTS = 1 << 22


def logical_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The weight's full shape, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return tuple(getattr(weight, "ds_shape", weight.shape))


def is_dtensor(t: object) -> bool:
    """A DTensor (FSDP2's sharded parameters), recognised without importing torch.distributed."""
    return hasattr(t, "placements") and hasattr(t, "to_local")


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Promote to float32 (keeping float64) for numerically safe reductions."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class RowsView:
    """A stand-in base module over a (rows, in) weight tensor, e.g. one rank's shard, so a WeightSource of the
    matching kind reads just those rows (chunked row norms and W·Aᵀ, no communication)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.bias = None
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])


class WeightSource:
    """Read-only access to a frozen base weight W of shape (out, in)."""

    #: W is stored transposed, (in, out), as in transformers' Conv1D: dim-0 shards then hold input rows.
    fan_in_fan_out = False
    #: the base is quantized: engines that cannot shard or partition its storage ask this.
    quantized = False
    #: FSDP2's fully_shard can split the stored weight by dim 0 and all-gather it back.
    fsdp_shardable = True

    def __init__(self, module: nn.Module | RowsView):
        # Any: the base's attributes (weight, bias, quant_state ...) are whatever its library gives it, which
        # nn.Module's __getattr__ types as Tensor | Module
        self.module: Any = module

    def take_ownership(self) -> None:
        """Called once when a DoRA layer wraps the base (a source may fix up or pin the base's storage here)."""

    def over_rows(self, rows: torch.Tensor) -> WeightSource:
        """A source of the same kind over a (rows, in) part of this weight, e.g. one rank's shard, so row norms and
        W·Aᵀ of just those rows are computed chunk by chunk with no communication."""
        return type(self)(RowsView(rows))

    # --- shape -------------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def device(self) -> torch.device:
        device: torch.device = self.module.weight.device
        return device

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype in which the dense weight is naturally expressed (for merge and adapter init)."""
        dtype: torch.dtype = self.module.weight.dtype
        return dtype

    # --- the operations DoRA needs -------------------------------------------------------------------
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ without bias, in x's dtype."""
        raise NotImplementedError

    def row_chunk(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of W as float32 (float64 for a float64 base), shape (stop - start, in)."""
        raise NotImplementedError

    def rows_per_chunk(self) -> int:
        """Rows per chunk so one fp32 chunk holds about CHUNK_ELEMENTS values."""
        return max(1, min(self.out_features, CHUNK_ELEMENTS // max(1, self.in_features)))

    def iter_row_chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        step = self.rows_per_chunk()
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            yield start, self.row_chunk(start, stop)

    def reduce_rows(self, fn: Callable[[torch.Tensor, int, int], torch.Tensor], width: int | None) -> torch.Tensor:
        """Apply fn(chunk, start, stop) -> (rows,) or (rows, width) per row chunk, concatenated in fp32.
        (no_grad as a block, not a decorator: torch.compile traces it inside a DoRA layer without a graph break)"""
        shape = (self.out_features,) if width is None else (self.out_features, width)
        out: torch.Tensor | None = None
        with torch.no_grad():
            for start, chunk in self.iter_row_chunks():
                part = fn(chunk, start, start + chunk.shape[0])
                if out is None:
                    out = torch.empty(shape, dtype=part.dtype, device=part.device)
                out[start : start + chunk.shape[0]] = part
        return out  # type: ignore[return-value]  # None only for a weight of no rows, which no layer has

    def row_sq_norms(self) -> torch.Tensor:
        """‖W_i‖² per output row, fp32 (out,)."""
        return self.reduce_rows(lambda w, *_: w.pow(2).sum(dim=1), None)

    def matmul_and_times_A(self, x: torch.Tensor, lora_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x @ Wᵀ, W·Aᵀ) for a training step. A quantized source overrides this to dequantize W once for both."""
        return self.matmul(x), self.times_A(lora_A)

    def times_A(self, lora_A: torch.Tensor) -> torch.Tensor:
        """W·Aᵀ, fp32 (out, r), computed per row chunk (this runs every training step: one chunk is returned as
        is, without the assembly copy)."""
        a_t = at_least_fp32(lora_A.detach()).t()
        if self.rows_per_chunk() >= self.out_features:
            with torch.no_grad():
                w = self.row_chunk(0, self.out_features)
                return w @ a_t.to(w.dtype)
        return self.reduce_rows(lambda w, *_: w @ a_t.to(w.dtype), lora_A.shape[0])

    @torch.no_grad()
    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full (out, in) weight. Only for merging: it allocates the whole matrix."""
        dtype = dtype or self.compute_dtype
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.device)
        for start, chunk in self.iter_row_chunks():
            out[start : start + chunk.shape[0]] = chunk.to(dtype)
        return out

    # --- merging ---------------------------------------------------------------------------------------
    def supports_inplace_merge(self) -> bool:
        return False

    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        """Overwrite rows [start, start+len) of W (dense bases only)."""
        raise TypeError(f"{type(self.module).__name__} weights cannot be modified in place; use merge_and_unload")

    def to_plain_module(self, weight: torch.Tensor) -> nn.Module:
        """A plain module with the given (out, in) weight and this base's bias (for merge_and_unload)."""
        bias = self.bias
        lin = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias.to(weight.dtype))
        return lin


class DenseWeight(WeightSource):
    """`nn.Linear`, or any module whose `weight` is an (out, in) floating tensor."""

    @property
    def in_features(self) -> int:
        return logical_shape(self.module.weight)[1]

    @property
    def out_features(self) -> int:
        return logical_shape(self.module.weight)[0]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.module.weight.to(x.dtype))

    def row_chunk(self, start: int, stop: int) -> torch.Tensor:
        return at_least_fp32(self.module.weight.detach()[start:stop])

    def times_A(self, lora_A: torch.Tensor) -> torch.Tensor:
        # An fp32/fp64 weight is its own chunk: one GEMM, as (A·Wᵀ)ᵀ, which BLAS runs ~1.5× faster than W·Aᵀ
        # (r rows instead of r columns); it runs every training step.
        w = self.module.weight
        if w.dtype in (torch.float32, torch.float64):
            with torch.no_grad():
                return torch.nn.functional.linear(at_least_fp32(lora_A.detach()).to(w.dtype), w.detach()).t()
        return super().times_A(lora_A)

    def rows_per_chunk(self) -> int:
        # An fp32 weight is already fp32: one "chunk" is a view, not a copy.
        if self.module.weight.dtype in (torch.float32, torch.float64):
            return self.out_features
        return super().rows_per_chunk()

    def supports_inplace_merge(self) -> bool:
        return True

    @torch.no_grad()
    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        w = self.module.weight
        w.data[start : start + rows.shape[0]] = rows.to(w.dtype)


class Conv1DWeight(WeightSource):
    """transformers `Conv1D` (GPT-2): weight stored as (in, out), forward x @ W + b (fan_in_fan_out)."""

    fan_in_fan_out = True

    @property
    def in_features(self) -> int:
        return logical_shape(self.module.weight)[0]

    @property
    def out_features(self) -> int:
        return logical_shape(self.module.weight)[1]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = x @ self.module.weight.to(x.dtype)
        return y

    def row_chunk(self, start: int, stop: int) -> torch.Tensor:
        return at_least_fp32(self.module.weight.detach()[:, start:stop].t())

    def supports_inplace_merge(self) -> bool:
        return True

    @torch.no_grad()
    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        w = self.module.weight
        w.data[:, start : start + rows.shape[0]] = rows.t().to(w.dtype)

    def to_plain_module(self, weight: torch.Tensor) -> nn.Module:
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(self.out_features, self.in_features)  # type: ignore[no-untyped-call]  # transformers' own
        conv.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight.t())
            bias = self.bias
            assert bias is not None  # a Conv1D always has one
            conv.bias.copy_(bias.to(weight.dtype))
        return conv


@dataclass(frozen=True)
class _Registration:
    matches: Callable[[nn.Module], bool]
    source: type[WeightSource]
    description: str


_REGISTRY: list[_Registration] = []


def register_weight_source(matches: Callable[[nn.Module], bool], source: type[WeightSource], description: str) -> None:
    """Make `source` the weight source of every base module for which `matches(module)` is true. Later
    registrations are tried first, so a specific kind (a quantized Linear subclass) wins over nn.Linear."""
    _REGISTRY.insert(0, _Registration(matches, source, description))


def supported_bases() -> list[str]:
    """Descriptions of every registered base kind, for error messages."""
    return [r.description for r in reversed(_REGISTRY)]


def weight_source_for(module: nn.Module) -> WeightSource:
    """Pick the weight source for a base layer, or raise naming the unsupported type and the supported ones."""
    for registration in _REGISTRY:
        if registration.matches(module):
            return registration.source(module)
    kind = type(module)
    raise TypeError(
        f"DoRA does not support base layers of type {kind.__module__}.{kind.__name__}; supported: "
        + ", ".join(supported_bases())
    )


def is_supported_base(module: nn.Module) -> bool:
    return any(r.matches(module) for r in _REGISTRY)


def _is_conv1d(module: nn.Module) -> bool:
    # Only a module of an already imported transformers can be a Conv1D: no import of transformers here.
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


register_weight_source(lambda m: isinstance(m, nn.Linear), DenseWeight, "torch.nn.Linear")
register_weight_source(_is_conv1d, Conv1DWeight, "transformers Conv1D")
