"""DoRA weight source for `ShardedLinear4bit`, and the shard-local DoRA norms under FSDP2.

`module.weight` of a ShardedLinear4bit is, depending on where we are:
- a `Sharded4bitTensor` parameter (no FSDP, or a model not yet sharded): rows are dequantized chunk by chunk;
- a DTensor whose local tensor is a `Sharded4bitTensor` holding this rank's rows (FSDP2, sharded state, i.e.
  outside forward/backward): only the local rows are reachable;
- a plain dense tensor (FSDP2, unsharded state inside forward/backward): FSDP all-gathered the packed bytes and
  `fsdp_post_all_gather` dequantized them; the matmul and DoRA's per-step cross term W·Aᵀ use this tensor, which
  FSDP materialised for the forward matmul anyway (no extra communication).

Norms from local rows (`init_dora_norms_from_local_shards`, called once after the real weights are loaded):
- the magnitude m = ‖W + s·B·A‖ of this rank's rows is computed from the local packed shard, the local rows of
  lora_B (sharded like W) and lora_A (r × in, all-gathered: r·in values, tiny) and written into the local shard of
  the magnitude: no weight all-gather;
- the cached ‖W‖² (fp32, (out,)) is computed from the local packed rows and then all-gathered as out floats per
  layer (the one collective, out·4 bytes instead of out·in/2), because the forward runs on full rows.
"""
from __future__ import annotations

import torch
from torch import nn

from dora_dist.nn.weight_source import RowsView, WeightSource, at_least_fp32
from dora_dist.quant.sharded4bit import Linear4bitFunction, Sharded4bitTensor
from dora_dist.quant.sharded4bit_linear import ShardedLinear4bit


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


class Sharded4bitWeight(WeightSource):
    """Weight source of `ShardedLinear4bit` (plain, FSDP2-sharded, or FSDP2-unsharded-dense)."""

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    def _weight(self):
        w = self.module.weight
        if _is_dtensor(w):
            raise RuntimeError(
                "the 4-bit weight is sharded (FSDP2, outside forward): only its local rows are available here; use "
                "local_rows()/init_dora_norms_from_local_shards, or call inside forward")
        return w

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight()
        if isinstance(w, Sharded4bitTensor):
            return Linear4bitFunction.apply(x, w.detach()).to(x.dtype)
        return nn.functional.linear(x, w.to(x.dtype))  # FSDP2 forward: already dequantized after the all-gather

    def rows_per_chunk(self) -> int:
        w = self.module.weight
        if not isinstance(w, Sharded4bitTensor) and not _is_dtensor(w) and w.dtype in (torch.float32, torch.float64):
            return self.out_features
        return super().rows_per_chunk()

    def row_chunk(self, start: int, stop: int) -> torch.Tensor:
        w = self._weight()
        if isinstance(w, Sharded4bitTensor):
            return w.dequantize_rows(start, stop, torch.float32)
        return at_least_fp32(w.detach()[start:stop])

    # --- shard-local views ---------------------------------------------------------------------------------
    def local(self) -> tuple[Sharded4bitTensor, int]:
        """(local 4-bit rows, global index of its first row)."""
        w = self.module.weight
        if not _is_dtensor(w):
            if not isinstance(w, Sharded4bitTensor):
                raise RuntimeError("local(): the weight is unsharded dense (inside an FSDP2 forward)")
            return w, 0
        loc = w._local_tensor
        return loc, local_row_offset(w)

    def local_rows(self) -> "Sharded4bitWeight":
        """A source over this rank's packed rows only (row norms and W·Aᵀ dequantize them chunk by chunk)."""
        return Sharded4bitWeight(RowsView(self.local()[0]))

    def row_sq_norms(self) -> torch.Tensor:
        w = self.module.weight
        if _is_dtensor(w):
            # Collective: all-gather of the per-row squared norms (out floats), computed from the local rows.
            return _gather_rows(w, self.local_rows().row_sq_norms())
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


def local_row_offset(w) -> int:
    """Global index of the first local row of a DTensor sharded Shard(0) (even sharding) on a 1-D mesh."""
    from torch.distributed.tensor import Shard

    placements = w.placements
    mesh = w.device_mesh
    offset, rows = 0, w.shape[0]
    for dim, p in enumerate(placements):
        if isinstance(p, Shard):
            if p.dim != 0:
                raise NotImplementedError(f"4-bit weights shard only by rows (Shard(0)), got {p}")
            size, coord = mesh.size(dim), mesh.get_local_rank(dim)
            chunk = -(-rows // size)
            offset += coord * chunk
            rows = chunk
    return offset


def _gather_rows(like, local: torch.Tensor) -> torch.Tensor:
    """All-gather a per-row vector sharded like `like` (a Shard(0) DTensor): returns the full (out,) tensor."""
    from torch.distributed.tensor import DTensor

    dt = DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                            shape=torch.Size((like.shape[0], *local.shape[1:])),
                            stride=tuple(local.stride()))
    return dt.full_tensor()


@torch.no_grad()
def init_dora_norms_from_local_shards(model: nn.Module, init_magnitude: bool = True) -> int:
    """For every DoRA layer over a FSDP2-sharded 4-bit base: magnitude from the local rows, cached ‖W‖².

    Call in the sharded state (after fully_shard and after loading the real weights). Returns the number of
    layers handled. Collectives per layer: all-gather of lora_A (r·in values) and of ‖W‖² (out values).
    """
    from dora_dist.nn.dora_linear import DoRALinear, dora_row_norms

    done = 0
    for layer in model.modules():
        if not isinstance(layer, DoRALinear) or not isinstance(layer.base_layer, ShardedLinear4bit):
            continue
        base = layer.base_layer
        if not _is_dtensor(base.weight):
            layer.base_row_sq = None
            if init_magnitude and layer.magnitude is not None:
                layer.init_magnitude()
            done += 1
            continue
        rows = Sharded4bitWeight(base).local_rows()
        w_sq = rows.row_sq_norms()
        if init_magnitude and layer.magnitude is not None:
            a = layer.lora_A.full_tensor() if _is_dtensor(layer.lora_A) else layer.lora_A  # collective: r×in
            b = layer.lora_B.to_local() if _is_dtensor(layer.lora_B) else layer.lora_B
            # B = 0 (a fresh adapter): W·Aᵀ is not needed, its cross term is exactly zero
            wa = rows.times_A(a) if bool(b.any()) else torch.zeros(w_sq.shape[0], a.shape[0], device=w_sq.device)
            norm = dora_row_norms(w_sq, wa, a, b, layer.scaling)
            m = layer.magnitude
            m_local = m.to_local() if _is_dtensor(m) else m
            if m_local.shape[0] != w_sq.shape[0]:
                raise RuntimeError(f"magnitude shard ({m_local.shape[0]} rows) and 4-bit weight shard "
                                   f"({w_sq.shape[0]} rows) are not sharded alike")
            m_local.copy_(norm.to(m_local.dtype))
        layer.base_row_sq = _gather_rows(base.weight, w_sq)  # collective: out floats
        done += 1
    return done
