"""DoRALinear: weight-decomposed low-rank adaptation over any supported frozen base.

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖        (norm per output row, detached in backward)

The layer never forms W + s·B·A. It uses the expansion

    ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·(B ⊙ W·Aᵀ)_i·1 + s²·(B ⊙ B·(A·Aᵀ))_i·1

with ‖W‖² cached (W is frozen) and W·Aᵀ, an (out, r) matrix, computed from row chunks of the (dequantized)
weight. The output reuses the single base matmul: y = (m/‖·‖) ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b. Only with dropout in
training does DoRA need the base matmul on the dropped input as well (peft's behaviour, kept for parity).

`use_dora=False` gives plain LoRA through the same code, so benchmarks compare like with like.

Inference: in eval mode without grad, m/‖W + sBA‖ is a constant per layer; it is cached (`_scale_cache`) and
reused until train()/eval(), merge/unmerge, `invalidate_cache`, or a change of A, B, m or the base weight
(identity, storage or in-place `_version` counter: the cache key).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dora_dist.errors import SettingError
from dora_dist.nn.dora_epilogue import compose_16bit, dora_epilogue, is_16bit
from dora_dist.nn.weight_source import WeightSource, at_least_fp32, is_dtensor, weight_source_for


def check_layer_settings(r: object, alpha: object, dropout: object, prefix: str = "") -> None:
    """The layer's hyper-parameters, checked here for the layer and for DoRAConfig (the library's and the job
    config's `dora:` section alike, prefix "DoRAConfig."). The SettingError (a ValueError) names the setting, so the
    job config reports it under the user's key (dora.r)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise SettingError("r", f"must be a positive integer, got {r!r}", prefix)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise SettingError("alpha", f"must be a positive number, got {alpha!r}", prefix)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise SettingError("dropout", f"must be in [0, 1), got {dropout!r}", prefix)


def nonzero_norm(norm: torch.Tensor) -> torch.Tensor:
    """‖·‖ with zero rows replaced by 1: such a row's direction is the zero vector, so its output is 0, not NaN."""
    return torch.where(norm == 0, torch.ones_like(norm), norm)


def safe_divide_norm(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / ‖·‖ where a zero-norm row gets scale m (see nonzero_norm)."""
    return magnitude / nonzero_norm(norm)


def dora_row_norms(
    w_row_sq: torch.Tensor,
    w_times_a: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    a_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """‖W_i + s(BA)_i‖ from ‖W_i‖² and W·Aᵀ, for any set of rows (w_row_sq, w_times_a and lora_B hold the same rows:
    the whole layer, or one rank's shard), ≥ fp32. The (rows, in) sum is never formed. a_gram: A·Aᵀ when the caller
    has it (row-wise tensor parallelism sums it over the input shards), else computed from lora_A."""
    a = lora_A.detach()
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    b = lora_B.detach().to(a.dtype)
    cross = (b * w_times_a.to(a.dtype)).sum(dim=1)
    gram = a @ a.t() if a_gram is None else a_gram.to(a.dtype)
    ba_sq = ((b @ gram) * b).sum(dim=1)
    return (w_row_sq.to(a.dtype) + (2 * scaling) * cross + (scaling * scaling) * ba_sq).clamp_min(0).sqrt()


def dora_output(
    base_out: torch.Tensor,
    lora_out: torch.Tensor,
    scale: torch.Tensor | None,
    scaling: float,
    base_out_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine base and low-rank outputs (no bias).

    scale is m/‖W + sBA‖ (None for plain LoRA). base_out_dropped is x_drop·Wᵀ when dropout is active in training;
    then, as in peft, y = x·Wᵀ + (scale-1) ⊙ x_drop·Wᵀ + scale ⊙ s·lora.
    """
    dt = base_out.dtype
    if scale is None:
        lora_out = lora_out.to(dt)
        return base_out + lora_out * scaling  # (not torch.add(alpha=): inductor fuses that into the GEMM wrongly)
    if is_16bit(dt):
        # the scale and the sum in fp32, one rounding (16 bits would round m/‖·‖ within 2^-9 of 1 to exactly 1)
        acc = torch.promote_types(scale.dtype, torch.float32)
        scale, lora_out = scale.to(acc), lora_out.to(acc)
        if base_out_dropped is None:
            return ((base_out.to(acc) + lora_out * scaling) * scale).to(dt)
        bracket = (scale - 1) * base_out_dropped.to(acc) + (scale * scaling) * lora_out
        return (base_out.to(acc) + bracket).to(dt)
    lora_out, scale = lora_out.to(dt), scale.to(dt)
    if base_out_dropped is None:
        return (base_out + lora_out * scaling) * scale
    return base_out + (scale - 1) * base_out_dropped + (scale * scaling) * lora_out


#: sums per-shard partial tensors over a group (one collective), returning the totals in the same order
PartialSums = Callable[[list[torch.Tensor]], list[torch.Tensor]]


class DoRALinear(nn.Module):
    """A frozen base layer plus trainable lora_A (r, in), lora_B (out, r) and magnitude (out,)."""

    #: set (by parallel/tp.py) on a layer whose input columns are split over ranks (row-wise tensor parallelism):
    #: its ‖W‖², W·Aᵀ and A·Aᵀ are then partial sums, which this adds up so the norm is the unsplit layer's
    partial_sums: PartialSums | None = None

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = True,
        adapter_dtype: torch.dtype = torch.float32,
        init_magnitude: bool = True,
    ):
        super().__init__()
        check_layer_settings(r, alpha, dropout)
        self.base_layer = base_layer
        # Built once (raises for unsupported bases). It reads base_layer.weight on every call, so engines that swap
        # the parameter object (FSDP2, ZeRO-3) are seen; the base layer itself is never replaced.
        self._weight_source = source = weight_source_for(base_layer)
        source.take_ownership()
        base_layer.requires_grad_(False)  # the base is frozen: no dW (a full out×in matmul) in backward
        self.in_features, self.out_features = source.in_features, source.out_features
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = source.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=adapter_dtype))
        if use_dora:
            self.magnitude = nn.Parameter(torch.ones(self.out_features, device=device, dtype=adapter_dtype))
        else:
            self.register_parameter("magnitude", None)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # ‖W‖² per row, fp32. W is frozen, so it is computed once. A plain attribute, not a buffer: derived
        # state must not be saved, sharded, or cast to bf16 by model.to(dtype).
        self.base_row_sq: torch.Tensor | None = None
        self.merged = False
        self.merge_scale: torch.Tensor | None = None
        self._premerge_weight: torch.Tensor | None = None  # the base weight before `merge` (exact unmerge)
        # (tensors, versions+storages, m/‖W+sBA‖): eval, no grad
        self._scale_cache: tuple[tuple[Any, ...], tuple[int, ...], torch.Tensor] | None = None
        self.reset_lora_parameters()
        if use_dora and init_magnitude and device.type != "meta":
            self.init_magnitude()

    # --- parameters --------------------------------------------------------------------------------
    @property
    def weight_source(self) -> WeightSource:
        return self._weight_source

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the base stores W as (in, out) (transformers Conv1D): its dim-0 shards hold input rows."""
        return self._weight_source.fan_in_fan_out

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A ~ kaiming_uniform(a=√5) as nn.Linear and peft do, B = 0 so the adapter starts as the identity."""
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """m = ‖W + s·B·A‖ per row (= ‖W‖ at B = 0). Call after the real base weights are loaded."""
        self.base_row_sq = self._scale_cache = None
        if self.magnitude is not None:
            self.magnitude.copy_(self.weight_norm().to(self.magnitude.dtype))

    @torch.no_grad()
    def set_norms(self, row_sq: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
        """Install ‖W_i‖² computed elsewhere (e.g. by an engine from sharded rows) and optionally this rank's part of
        the magnitude (the local shard of a sharded `magnitude`, or the whole vector). The one way engines write a
        layer's norm state."""
        self.base_row_sq = row_sq.detach().to(torch.promote_types(row_sq.dtype, torch.float32))
        self._scale_cache = None
        if magnitude is not None and self.magnitude is not None:
            # a DTensor's local shard (FSDP2); DTensor is not imported here (no torch.distributed in nn/)
            target = self.magnitude.to_local() if is_dtensor(self.magnitude) else self.magnitude  # type: ignore[attr-defined]
            if target.shape != magnitude.shape:
                raise ValueError(
                    f"magnitude of shape {tuple(magnitude.shape)} does not fit this layer's {tuple(target.shape)}"
                )
            target.copy_(magnitude.to(device=target.device, dtype=target.dtype))

    def invalidate_cache(self) -> None:
        """Forget the cached ‖W‖² and inference scale (after the base weight was changed by hand)."""
        self.base_row_sq = None
        self._scale_cache = None

    #: class-wide switch for the inference scale cache (benchmarks turn it off to measure the uncached path)
    cache_inference_scale: bool = True

    def train(self, mode: bool = True) -> DoRALinear:
        self._scale_cache = None
        return super().train(mode)

    def inference_scale(self) -> torch.Tensor:
        """m/‖W + sBA‖, ≥ fp32 (never rounded to a 16-bit compute dtype), computed once and reused while A, B, m and
        the base weight are the same tensors (identity), with the same storage and in-place version (eval mode, no
        grad). Plain reads of `_parameters` and `_modules` (nn.Module.__getattr__ costs µs): this runs once per layer
        per decoded token."""
        own = self._parameters
        # no cast() here (a call per token); None or a DTensor raise below and skip the cache
        base_params = self._modules["base_layer"]._parameters  # type: ignore[union-attr]
        deps: tuple[Any, ...] = (own["lora_A"], own["lora_B"], own["magnitude"], base_params.get("weight"))
        try:
            state = (
                deps[0]._version,
                deps[1]._version,
                deps[2]._version,
                deps[3]._version,
                deps[0].data_ptr(),
                deps[1].data_ptr(),
                deps[2].data_ptr(),
                deps[3].data_ptr(),
            )
        except (RuntimeError, AttributeError):  # e.g. a DTensor, or no `weight`: no caching
            return at_least_fp32(self.dora_scale().detach())
        c = self._scale_cache
        if c is not None and c[1] == state:
            cd = c[0]
            if cd[0] is deps[0] and cd[1] is deps[1] and cd[2] is deps[2] and cd[3] is deps[3]:
                return c[2]
        scale = at_least_fp32(self.dora_scale().detach())
        self._scale_cache = (deps, state, scale)
        return scale

    # --- norms ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def base_row_sq_norms(self) -> torch.Tensor:
        """‖W‖² per row, ≥ fp32: computed once, then only moved (never recomputed from, say, an unsharded bf16
        copy of W) when the weight shows up on another device."""
        cached, device = self.base_row_sq, self.weight_source.device
        if cached is None:
            cached = self.weight_source.row_sq_norms()
            if self.partial_sums is not None:
                (cached,) = self.partial_sums([cached])
            self.base_row_sq = cached
        elif cached.device != device:
            self.base_row_sq = cached = cached.to(device)
        return cached

    @torch.no_grad()
    def weight_norm(self, exact: bool = False, w_times_a: torch.Tensor | None = None) -> torch.Tensor:
        """‖W + s·B·A‖ per output row, ≥ fp32, never materialising the (out, in) sum.

        exact=True sums the rows chunk by chunk instead of using the expansion (reference path for tests).
        w_times_a: W·Aᵀ when the caller already has it (computed alongside the base matmul).
        """
        source, s = self.weight_source, self.scaling
        if exact:
            a = self.lora_A.detach()
            a = a.to(torch.promote_types(a.dtype, torch.float32))
            b = self.lora_B.detach().to(a.dtype)
            return source.reduce_rows(lambda w, i, j: (w + s * (b[i:j] @ a).to(w.dtype)).norm(dim=1), None)
        wa = source.times_A(self.lora_A) if w_times_a is None else w_times_a
        if self.partial_sums is None:
            return dora_row_norms(self.base_row_sq_norms(), wa, self.lora_A, self.lora_B, s)
        a = at_least_fp32(self.lora_A.detach())
        wa, gram = self.partial_sums([wa.to(a.dtype), a @ a.t()])  # one collective: (out × r) + (r × r)
        return dora_row_norms(self.base_row_sq_norms(), wa, self.lora_A, self.lora_B, s, a_gram=gram)

    def dora_scale(self, w_times_a: torch.Tensor | None = None) -> torch.Tensor:
        """m / ‖W + sBA‖ with the norm detached: gradients reach m (and A, B through the output), not the norm."""
        return safe_divide_norm(self.magnitude, self.weight_norm(w_times_a=w_times_a).detach())

    # --- forward ------------------------------------------------------------------------------------
    def lora_path(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            merged_out: torch.Tensor = self.base_layer(x)
            return merged_out
        source = self.weight_source
        w_times_a = None
        if self.use_dora and torch.is_grad_enabled():
            base_out, w_times_a = source.matmul_and_times_A(x, self.lora_A)  # one dequantization for both
        else:
            base_out = source.matmul(x)
        if self.use_dora and w_times_a is None and not self.training and self.cache_inference_scale:
            # eval, no grad: the scale is a constant per layer (one add and one in-place multiply over LoRA)
            dt = base_out.dtype
            scale = self.inference_scale()
            if is_16bit(dt):
                # fp32 scale and sum, one rounding, written into base_out (see nn/dora_epilogue.py)
                xa = F.linear(x.to(self.lora_A.dtype), self.lora_A)
                b_scaled = self.lora_B.to(scale.dtype) * (self.scaling * scale)[:, None]
                flat = base_out.reshape(-1, base_out.shape[-1])
                out = compose_16bit(flat, scale, xa.reshape(-1, xa.shape[-1]), b_scaled, flat).view(base_out.shape)
            else:
                lora_out = self.lora_path(x).to(dt)
                out = lora_out.mul_(self.scaling).add_(base_out).mul_(scale.to(dt))
            bias = source.bias
            return out if bias is None else out.add_(bias.to(out.dtype))
        dropout_active = self.training and not isinstance(self.lora_dropout, nn.Identity)
        if self.use_dora and not dropout_active:  # one fused node: saves y, not z (see nn/dora_epilogue.py)
            xa = F.linear(x.to(self.lora_A.dtype), self.lora_A)
            denom = nonzero_norm(self.weight_norm(w_times_a=w_times_a).detach())
            return dora_epilogue(
                base_out, xa, self.lora_B, self.magnitude, denom, source.bias, self.scaling, consume_base=True
            )
        x_lora = self.lora_dropout(x) if dropout_active else x
        lora_out = self.lora_path(x_lora)
        row_scale = self.dora_scale(w_times_a) if self.use_dora else None
        base_dropped = source.matmul(x_lora) if (dropout_active and self.use_dora) else None
        out = dora_output(base_out, lora_out, row_scale, self.scaling, base_dropped)
        bias = source.bias
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out

    # --- merge -------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_scale(self) -> torch.Tensor:
        if not self.use_dora:
            return torch.ones(self.out_features, device=self.lora_A.device)
        return safe_divide_norm(self.magnitude.detach().float(), self.weight_norm(exact=True).float())

    @torch.no_grad()
    def delta_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of B·A (unscaled), for merging chunk by chunk."""
        return self.lora_B[start:stop].to(dtype) @ self.lora_A.to(dtype)

    @torch.no_grad()
    def merged_rows(self, chunk: torch.Tensor, start: int, stop: int, scale: torch.Tensor) -> torch.Tensor:
        """W'[start:stop] from the base's row chunk. Chunks are ≥ fp32 (`WeightSource.row_chunk`) and the scale is
        fp32, so W' is formed in fp32 and rounded once, by the caller's cast to the weight's dtype."""
        delta = self.delta_rows(start, stop, chunk.dtype)
        return (chunk + self.scaling * delta) * scale[start:stop, None].to(chunk.dtype)

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold W' into the base weight in place (dense and Conv1D bases); `unmerge` undoes it.

        What a merged 16-bit weight can hold: W' rounded once per element (relative 2^-9 in bf16). A magnitude
        change |Δm|/m below that, on rows whose s·B·A is also below half an ulp of W, rounds back to W and is lost
        (the unmerged layer keeps it: its scale stays fp32). Serve such an adapter unmerged, or merge into fp32
        (`merge_and_unload(dtype=torch.float32)` for quantized bases). keep_original=True keeps a copy of the base
        weight (its own dtype and device) so that `unmerge` restores it bit for bit; rounding makes W' → W
        inexact otherwise (in fp32 too). merge_and_unload, which never unmerges, passes False.
        """
        if self.merged:
            return
        source = self.weight_source
        if not source.supports_inplace_merge():
            raise TypeError(f"cannot merge into a {type(self.base_layer).__name__} in place; use merge_and_unload()")
        scale = self.merged_scale()
        base_weight = cast(torch.Tensor, self.base_layer.weight)
        self._premerge_weight = base_weight.detach().clone() if keep_original else None
        for start, chunk in source.iter_row_chunks():
            source.write_rows(start, self.merged_rows(chunk, start, start + chunk.shape[0], scale))
        self.merge_scale, self.merged = scale, True
        self.base_row_sq = self._scale_cache = None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight: bit for bit from the copy `merge` kept, else W'/scale − s·B·A (rounded)."""
        if not self.merged:
            return
        source, scale = self.weight_source, self.merge_scale
        original = getattr(self, "_premerge_weight", None)
        if original is not None:
            cast(torch.Tensor, self.base_layer.weight).data.copy_(original)
        else:
            assert scale is not None  # set by merge
            for start, chunk in source.iter_row_chunks():
                stop = start + chunk.shape[0]
                delta = self.delta_rows(start, stop, chunk.dtype)
                source.write_rows(start, chunk / scale[start:stop, None].to(chunk.dtype) - self.scaling * delta)
        self._premerge_weight = None
        self.merged, self.merge_scale, self.base_row_sq, self._scale_cache = False, None, None, None

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full merged (out, in) weight, built row chunk by row chunk (for merge_and_unload)."""
        source = self.weight_source
        scale = self.merged_scale()
        out = torch.empty(
            self.out_features, self.in_features, dtype=dtype or source.compute_dtype, device=source.device
        )
        for start, chunk in source.iter_row_chunks():
            stop = start + chunk.shape[0]
            out[start:stop] = self.merged_rows(chunk, start, stop, scale).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        return (
            f"{kind}: in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:.4g}, base={type(self.base_layer).__name__}"
        )
