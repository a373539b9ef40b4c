"""DoRA's health while a run goes: is the decomposition doing its job, or has it silently become LoRA?

DoRA degenerates without an error when the magnitude stops training (frozen, no learning rate, decayed away) or
when the forward rounds m/‖W'‖ to 1 in 16 bits (the magnitude trains, the output ignores it). Every
`output.dora_health_every` steps (default: `training.log_every`) the trainer logs, per layer group (attention /
MLP / other):

- ``dora_dm_rel_<g>``: mean over rows of |m − m₀| / m₀, m₀ the initial magnitude (see below);
- ``dora_dm_<g>`` and ``dora_dd_<g>``: ΔM = mean |‖W'ᵢ‖ − ‖Wᵢ‖| and ΔD = mean (1 − cos(W'ᵢ, Wᵢ)), exactly what
  `dora-dist analyze` computes on a saved adapter (analysis/decompose.py), averaged over the group's layers;
- ``dora_share_<g>``: the magnitude's *effective* share of the output (`effective_share_sums`), raw (not clipped):
  1 when the compute-dtype forward keeps the scale m/‖W'‖, 0 when rounding eats it.

m₀ is not stored: it is recomputed as ‖Wᵢ‖ from the layer's cached ‖W‖² (the frozen base), which is bit for bit the
magnitude a fresh adapter starts with (m is initialised as sqrt of the same fp32 ‖W‖², B = 0), so it survives a
resume with no checkpoint change. For an adapter that did not start fresh it is ‖W‖, the reference analyze uses.

W' is never formed: with V = W + sBA and D = BA, per row (‖W‖², W·Aᵀ and A·Aᵀ are (out,), (out, r), (r, r))

    ⟨V, W⟩ = ‖W‖² + s·rowsum(B ⊙ W·Aᵀ)            ‖V‖² = ‖W‖² + 2s·rowsum(B ⊙ W·Aᵀ) + s²·rowsum(B ⊙ B·A·Aᵀ)
    1 − cos(V, W) = s²(‖D‖²‖W‖² − ⟨D, W⟩²) / (‖V‖‖W‖ (‖V‖‖W‖ + ⟨V, W⟩))     (no cancellation for small angles)

and ‖W'‖ = |m|. Engines hand the rows each rank holds (`Engine.dora_row_views`): whole layers on rank 0 for
none/ddp/zero2, each rank's own rows under FSDP2 (lora_A gathered, r·in floats a layer), ZeRO-3's whole adapter
with W·Aᵀ summed from the weight partitions ((out, r) floats a layer). The per-layer sums are then reduced with one
all-reduce (SUM) and one (MAX) of a few floats per layer. Nothing here runs unless it is due.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from dora_dist.nn.dora_linear import dora_row_norms, nonzero_norm

#: layer groups: a module path is attention when a part of it names attention, MLP when a part names the MLP
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value")
MLP_PARTS = ("mlp", "feed_forward", "ffn", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2",
             "w3", "dense_h_to_4h", "dense_4h_to_h")
GROUPS = ("attn", "mlp", "other")
#: tokens of the probe z the effective share is measured on
PROBE_TOKENS = 32
#: per-layer sums (index: meaning); reduced with SUM over ranks
ROWS, REL_DM, ABS_DM, DD, SHARE_NUM, SHARE_DEN, REL_ROWS = range(7)
N_SUMS = 7


def layer_group(name: str) -> str:
    """'attn', 'mlp' or 'other' from a module path (model.layers.0.self_attn.q_proj -> attn)."""
    lower = name.lower()
    leaf = lower.rsplit(".", 1)[-1]
    if "attn" in lower or "attention" in lower or leaf in ATTENTION_PARTS:
        return "attn"
    if "mlp" in lower or "feed_forward" in lower or leaf in MLP_PARTS:
        return "mlp"
    return "other"


@dataclass
class RowView:
    """The rows of one DoRA layer that this rank accounts for, all tensors row-aligned (k rows)."""

    name: str
    rows: torch.Tensor        # (k,) global row indices
    magnitude: torch.Tensor   # (k,)
    lora_B: torch.Tensor      # (k, r)
    lora_A: torch.Tensor      # (r, in), whole
    row_sq: torch.Tensor      # (k,) ‖Wᵢ‖², the layer's cached fp32 value
    w_times_a: torch.Tensor   # (k, r) W·Aᵀ
    scaling: float
    owner: bool = True        # False: another rank counts these rows (a replica), this rank adds zeros

    @classmethod
    def whole_layer(cls, name: str, layer, owner: bool) -> "RowView":
        """A layer whose full weight this rank holds (one process, DDP, ZeRO-2)."""
        a = layer.lora_A.detach()
        return cls(name, torch.arange(layer.out_features, device=a.device), layer.magnitude.detach(),
                   layer.lora_B.detach(), a, layer.base_row_sq_norms(), layer.weight_source.times_A(a) if owner
                   else a.new_zeros(0, a.shape[0]), layer.scaling, owner)


def initial_magnitude(row_sq: torch.Tensor, lora_A: torch.Tensor, m_dtype: torch.dtype) -> torch.Tensor:
    """m₀ = ‖W‖ per row as DoRALinear.init_magnitude computes it for B = 0 (bit for bit: the cross and BA terms are
    exact zeros there, dora_row_norms)."""
    acc = torch.promote_types(lora_A.dtype, torch.float32)
    return row_sq.to(acc).clamp_min(0).sqrt().to(m_dtype)


@torch.no_grad()
def change_sums(view: RowView) -> tuple[torch.Tensor, float]:
    """(sums[ROWS, REL_DM, ABS_DM, DD, ., ., REL_ROWS] of this view, max |m − m₀|/m₀), float64."""
    out = torch.zeros(N_SUMS, dtype=torch.float64)
    if not view.owner or view.rows.numel() == 0:
        return out, 0.0
    s = float(view.scaling)
    m = view.magnitude.double()
    a, b = view.lora_A.double(), view.lora_B.double()
    w_sq = view.row_sq.double().clamp_min(0)
    w = w_sq.sqrt()
    cross = (b * view.w_times_a.double()).sum(1)                  # ⟨D, W⟩
    d_sq = ((b @ (a @ a.t())) * b).sum(1)                         # ‖D‖²
    v = (w_sq + 2 * s * cross + s * s * d_sq).clamp_min(0).sqrt()
    inner = w_sq + s * cross                                      # ⟨V, W⟩
    vw = v * w
    sin_num = (s * s) * (d_sq * w_sq - cross * cross).clamp_min(0)
    safe = torch.where(vw > 0, vw, torch.ones_like(vw))
    one_minus_cos = torch.where(inner > 0, sin_num / (safe * (safe + inner)), 1 - inner / safe)
    one_minus_cos = torch.where(m < 0, 2 - one_minus_cos, one_minus_cos)  # W' = m·V/‖V‖ points against V
    tuned_norm = torch.where(v > 0, m.abs(), torch.zeros_like(m))        # ‖W'ᵢ‖
    both_zero, one_zero = (w == 0) & (tuned_norm == 0), (w == 0) != (tuned_norm == 0)
    one_minus_cos = torch.where(one_zero, 1.0, torch.where(both_zero, 0.0, one_minus_cos))
    m0 = initial_magnitude(view.row_sq, view.lora_A, view.magnitude.dtype).double()
    rel = (m - m0).abs() / torch.where(m0 > 0, m0, torch.ones_like(m0))
    rel = torch.where(m0 > 0, rel, torch.zeros_like(rel))
    out[ROWS] = m.numel()
    out[REL_DM] = rel.sum().cpu()
    out[ABS_DM] = (tuned_norm - w).abs().sum().cpu()
    out[DD] = one_minus_cos.sum().cpu()
    out[REL_ROWS] = (m0 > 0).sum().cpu()
    return out, float(rel.max()) if rel.numel() else 0.0


def probe_base_out(rows: torch.Tensor, row_sq: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """A deterministic stand-in for x·Wᵀ: column i has ‖Wᵢ‖ times unit-variance values (what x with unit-variance
    entries gives), drawn from a low-discrepancy sequence of (token, global row), so every sharding of the rows
    sees the same numbers."""
    t = torch.arange(1, tokens + 1, dtype=torch.float64, device=rows.device)[:, None]
    r = (rows.to(torch.float64) + 1)[None, :]
    u = torch.frac(0.5 + 0.7548776662466927 * t + 0.5698402909980532 * r)   # R2 sequence, uniform in [0, 1)
    return ((2 * u - 1) * math.sqrt(3) * row_sq.double().clamp_min(0).sqrt()[None, :].to(u.device)).to(dtype)


Epilogue = Callable[..., torch.Tensor]


@torch.no_grad()
def effective_share_sums(view: RowView, dtype: torch.dtype, epilogue: Epilogue | None = None,
                         tokens: int = PROBE_TOKENS) -> tuple[float, float]:
    """(⟨Δy, ref⟩, ⟨ref, ref⟩) of the layer's own forward composition in `dtype` on a probe z (xa = 0):
    Δy = epilogue(z, m) − epilogue(z, m := ‖V‖) (scale exactly 1), ref = (m/‖V‖ − 1) ⊙ z in float64.
    share = Σ⟨Δy, ref⟩ / Σ⟨ref, ref⟩: 1 when the forward carries the scale, 0 when it rounds it to 1."""
    if not view.owner or view.rows.numel() == 0:
        return 0.0, 0.0
    if epilogue is None:
        from dora_dist.nn.dora_epilogue import dora_epilogue as epilogue
    b = view.lora_B.detach()
    denom = nonzero_norm(dora_row_norms(view.row_sq, view.w_times_a, view.lora_A, b, view.scaling))
    z = probe_base_out(view.rows, view.row_sq, tokens, dtype).to(b.device)
    xa = torch.zeros(tokens, view.lora_A.shape[0], dtype=view.lora_A.dtype, device=b.device)
    y_m = epilogue(z.clone(), xa, b, view.magnitude.detach(), denom, None, view.scaling)
    y_1 = epilogue(z.clone(), xa, b, denom, denom, None, view.scaling)
    ref = (view.magnitude.double() / denom.double() - 1)[None, :] * z.double()
    dy = y_m.double() - y_1.double()
    return float((dy * ref).sum()), float((ref * ref).sum())


@dataclass
class LayerHealth:
    """Final per-layer values after the reduction over ranks."""

    name: str
    group: str
    delta_m: float       # analyze's ΔM: mean |‖W'ᵢ‖ − ‖Wᵢ‖|
    delta_d: float       # analyze's ΔD: mean 1 − cos(W'ᵢ, Wᵢ)
    delta_m_rel: float   # mean |m − m₀| / m₀
    max_delta_m_rel: float
    share_num: float
    share_den: float


def layer_sums(views: Iterable[RowView], dtype: torch.dtype, epilogue: Epilogue | None = None
               ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(names, sums (L, N_SUMS), maxima (L,)) of this rank's views, before any reduction."""
    names, sums, maxima = [], [], []
    for view in views:
        part, biggest = change_sums(view)
        part[SHARE_NUM], part[SHARE_DEN] = effective_share_sums(view, dtype, epilogue)
        names.append(view.name)
        sums.append(part)
        maxima.append(biggest)
    stacked = torch.stack(sums) if sums else torch.zeros(0, N_SUMS, dtype=torch.float64)
    return names, stacked, torch.tensor(maxima, dtype=torch.float64)


def finish_layers(names: list[str], sums: torch.Tensor, maxima: torch.Tensor) -> list[LayerHealth]:
    """Per-layer means from reduced sums."""
    out = []
    for name, s, mx in zip(names, sums.tolist(), maxima.tolist()):
        rows = max(s[ROWS], 1.0)
        out.append(LayerHealth(name, layer_group(name), s[ABS_DM] / rows, s[DD] / rows,
                               s[REL_DM] / max(s[REL_ROWS], 1.0), mx, s[SHARE_NUM], s[SHARE_DEN]))
    return out


def group_record(layers: list[LayerHealth]) -> dict[str, float | None]:
    """metrics.jsonl keys per group: dora_dm_rel_<g>, dora_dm_<g>, dora_dd_<g> (means over the group's layers, each
    layer's value a mean over its rows, as analyze's per-layer records) and dora_share_<g> (Σ num / Σ den)."""
    rec: dict[str, float | None] = {}
    for group in GROUPS:
        members = [h for h in layers if h.group == group]
        if not members:
            continue
        n = len(members)
        den = sum(h.share_den for h in members)
        rec[f"dora_dm_rel_{group}"] = sum(h.delta_m_rel for h in members) / n
        rec[f"dora_dm_{group}"] = sum(h.delta_m for h in members) / n
        rec[f"dora_dd_{group}"] = sum(h.delta_d for h in members) / n
        rec[f"dora_share_{group}"] = sum(h.share_num for h in members) / den if den > 0 else None
    if layers:
        rec["dora_dm_rel_max"] = max(h.max_delta_m_rel for h in layers)
    return rec


def measure(engine, env, dtype: torch.dtype, epilogue: Epilogue | None = None) -> list[LayerHealth]:
    """Every DoRA layer's health, the same on every rank. COLLECTIVE (every rank calls): the engine's row views
    (FSDP2: lora_A gathered per layer; ZeRO-3: the adapter gathered and W·Aᵀ summed per layer) and two all-reduces
    of (layers × 7) and (layers,) floats."""
    names, sums, maxima = layer_sums(engine.dora_row_views(), dtype, epilogue)
    sums = env.all_reduce_tensor(sums, "sum")
    maxima = env.all_reduce_tensor(maxima, "max")
    return finish_layers(names, sums, maxima)
