"""DoRA's health while a run goes: is the decomposition doing its job, or has it silently become LoRA?

DoRA degenerates without an error when the magnitude stops training (frozen, no learning rate, decayed away) or
when the forward rounds m/‖W'‖ to 1 in 16 bits (the magnitude trains, the output ignores it). Every
`output.dora_health_every` steps (default 10; 0: `training.log_every`) and at the last step the trainer logs, per
layer group (attention / MLP / other):

- ``dora_dm_rel_<g>``: mean over rows of |m − m₀| / m₀, m₀ the initial magnitude (see below);
- ``dora_dm_<g>`` and ``dora_dd_<g>``: ΔM = mean |‖W'ᵢ‖ − ‖Wᵢ‖| and ΔD = mean (1 − cos(W'ᵢ, Wᵢ)), exactly what
  `dora-dist analyze` computes on a saved adapter (analysis/decompose.py), averaged over the group's layers;
- ``dora_share_<g>``: the magnitude's *effective* share of the output (`_batch_sums`), raw (not clipped):
  1 when the compute-dtype forward keeps the scale m/‖W'‖, 0 when rounding eats it.

m₀ is not stored: it is recomputed as ‖Wᵢ‖ from the layer's cached ‖W‖² (the frozen base), which is bit for bit the
magnitude a fresh adapter starts with (m is initialised as sqrt of the same fp32 ‖W‖², B = 0), so it survives a
resume with no checkpoint change. For an adapter that did not start fresh it is ‖W‖, the reference analyze uses.

W' is never formed: with V = W + sBA and D = BA, per row (‖W‖², W·Aᵀ and A·Aᵀ are (out,), (out, r), (r, r))

    ⟨V, W⟩ = ‖W‖² + s·rowsum(B ⊙ W·Aᵀ)            ‖V‖² = ‖W‖² + 2s·rowsum(B ⊙ W·Aᵀ) + s²·rowsum(B ⊙ B·A·Aᵀ)
    1 − cos(V, W) = s²(‖D‖²‖W‖² − ⟨D, W⟩²) / (‖V‖‖W‖ (‖V‖‖W‖ + ⟨V, W⟩))     (no cancellation for small angles)

and ‖W'‖ = |m|. Engines hand the rows each rank holds (`Engine.dora_row_views`): whole layers on rank 0 for
none/ddp/zero2, each rank's own rows under FSDP2 (every layer's lora_A in one all-gather, r·in floats a layer),
ZeRO-3's whole adapter with W·Aᵀ summed from the weight partitions ((out, r) floats a layer). The per-layer sums
are then combined from one all-gather of 8 floats per layer and rank. Nothing here runs unless it is due.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dora_dist.nn.dora_linear import nonzero_norm

if TYPE_CHECKING:
    from dora_dist.dist_env import DistEnv

#: layer groups: a module path is attention when a part of it names attention, MLP when a part names the MLP
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value")
MLP_PARTS = (
    "mlp",
    "feed_forward",
    "ffn",
    "gate_proj",
    "up_proj",
    "down_proj",
    "fc1",
    "fc2",
    "c_fc",
    "w1",
    "w2",
    "w3",
    "dense_h_to_4h",
    "dense_4h_to_h",
)
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
    rows: torch.Tensor  # (k,) global row indices
    magnitude: torch.Tensor  # (k,)
    lora_B: torch.Tensor  # (k, r)
    lora_A: torch.Tensor  # (r, in), whole
    row_sq: torch.Tensor  # (k,) ‖Wᵢ‖², the layer's cached fp32 value
    w_times_a: torch.Tensor  # (k, r) W·Aᵀ
    scaling: float
    owner: bool = True  # False: another rank counts these rows (a replica), this rank adds zeros

    @classmethod
    def whole_layer(cls, name: str, layer, owner: bool) -> RowView:
        """A layer whose full weight this rank holds (one process, DDP, ZeRO-2)."""
        a = layer.lora_A.detach()
        return cls(
            name,
            torch.arange(layer.out_features, device=a.device),
            layer.magnitude.detach(),
            layer.lora_B.detach(),
            a,
            layer.base_row_sq_norms(),
            layer.weight_source.times_A(a) if owner else a.new_zeros(0, a.shape[0]),
            layer.scaling,
            owner,
        )


def initial_magnitude(row_sq: torch.Tensor, lora_A: torch.Tensor, m_dtype: torch.dtype) -> torch.Tensor:
    """m₀ = ‖W‖ per row as DoRALinear.init_magnitude computes it for B = 0 (bit for bit: the cross and BA terms are
    exact zeros there, dora_row_norms)."""
    acc = torch.promote_types(lora_A.dtype, torch.float32)
    return row_sq.to(acc).clamp_min(0).sqrt().to(m_dtype)


def probe_base_out(rows: torch.Tensor, row_sq: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """A deterministic stand-in for x·Wᵀ: column i has ‖Wᵢ‖ times unit-variance values (what x with unit-variance
    entries gives), drawn from a low-discrepancy sequence of (token, global row), so every sharding of the rows
    sees the same numbers. The phases are reduced mod 1 in float64 per token and per row, their sum in fp32."""
    t = torch.arange(1, tokens + 1, dtype=torch.float64, device=rows.device)
    phase_t = torch.frac(0.5 + 0.7548776662466927 * t).float()[:, None]
    phase_r = torch.frac(0.5698402909980532 * (rows.to(torch.float64) + 1)).float()[None, :]
    u = torch.frac(phase_t + phase_r)  # R2 sequence, uniform in [0, 1)
    scale = (math.sqrt(3) * row_sq.float().clamp_min(0).sqrt()).to(u.device)[None, :]
    return ((2 * u - 1) * scale).to(dtype)


def probe_lora_input(tokens: int, r: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A deterministic stand-in for x·Aᵀ / ‖A_k‖: unit-variance values from a low-discrepancy sequence of (token, k),
    the same on every rank. The layer's A scale is folded into B (`_batch_sums`), so one probe serves every layer
    of a batch."""
    t = torch.arange(1, tokens + 1, dtype=torch.float64, device=device)
    k = torch.arange(1, r + 1, dtype=torch.float64, device=device)
    u = torch.frac(torch.frac(0.3 + 0.6180339887498949 * t)[:, None] + torch.frac(0.4142135623730951 * k)[None, :])
    return (math.sqrt(3) * (2 * u - 1)).to(dtype)


Epilogue = Callable[..., torch.Tensor]
#: rows measured in one batch (its largest tensors: PROBE_TOKENS × rows fp32, 8 MiB)
BATCH_ROWS = 1 << 16


@torch.no_grad()
def _batch_sums(
    views: list[RowView], dtype: torch.dtype, epilogue: Epilogue, tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums (L, N_SUMS), max |m − m₀|/m₀ (L,)) of views that share r, scaling, dtypes and device: their rows are
    concatenated, so the whole batch costs a few dozen ops plus one small matmul per layer.

    Per row: ΔM, ΔD and m₀ as in the module docstring. The share probe runs the real epilogue once with the true
    magnitude and once with magnitude := ‖V‖ (scale exactly 1) on z = probe_base_out and xa = probe_lora_input, the
    denominator ‖V‖ computed as the layer computes it (dora_row_norms: fp32 or wider), and compares Δy with the
    reference (m/‖V‖ − 1) ⊙ (z + s·xa·Bᵀ): share = Σ⟨Δy, ref⟩ / Σ⟨ref, ref⟩."""
    first = views[0]
    s = float(first.scaling)
    acc = torch.promote_types(first.lora_A.dtype, torch.float32)
    b = torch.cat([v.lora_B.detach() for v in views])
    b_acc = b.to(acc)
    # B·(A·Aᵀ), one (k, r) × (r, r) product per layer (A differs per layer)
    b_aat = torch.cat([v.lora_B.detach().to(acc) @ _gram(v.lora_A.detach().to(acc)) for v in views])
    wa = torch.cat([v.w_times_a for v in views]).to(acc)
    row_sq = torch.cat([v.row_sq for v in views])
    m = torch.cat([v.magnitude.detach() for v in views])
    rows = torch.cat([v.rows for v in views])
    # the forward's denominator: dora_row_norms' expression on the concatenated rows, in the same dtype
    cross_acc = (b_acc * wa).sum(dim=1)
    d_sq_acc = (b_aat * b_acc).sum(dim=1)
    denom = nonzero_norm((row_sq.to(acc) + (2 * s) * cross_acc + (s * s) * d_sq_acc).clamp_min(0).sqrt())
    # --- ΔM, ΔD, |m − m₀|/m₀ in float64 ---------------------------------------------------------------------
    md, cross, d_sq = m.double(), cross_acc.double(), d_sq_acc.double()
    w_sq = row_sq.double().clamp_min(0)
    w = w_sq.sqrt()
    v_norm = (w_sq + 2 * s * cross + s * s * d_sq).clamp_min(0).sqrt()
    inner = w_sq + s * cross  # ⟨V, W⟩
    vw = v_norm * w
    safe = torch.where(vw > 0, vw, 1.0)
    sin_num = (s * s) * (d_sq * w_sq - cross * cross).clamp_min(0)
    one_minus_cos = torch.where(inner > 0, sin_num / (safe * (safe + inner)), 1 - inner / safe)
    one_minus_cos = torch.where(md < 0, 2 - one_minus_cos, one_minus_cos)  # W' = m·V/‖V‖ points against V
    tuned_norm = torch.where(v_norm > 0, md.abs(), 0.0)  # ‖W'ᵢ‖
    w_zero, t_zero = w == 0, tuned_norm == 0
    one_minus_cos = torch.where(w_zero | t_zero, (w_zero != t_zero).double(), one_minus_cos)  # no direction
    m0 = initial_magnitude(row_sq, first.lora_A, m.dtype).double()
    rel = torch.where(m0 > 0, (md - m0).abs() / torch.where(m0 > 0, m0, 1.0), 0.0)
    # --- the effective share through the real epilogue ----------------------------------------------------
    # The probe is the forward's own mix: a 16-bit base output z and the low-rank term s·(x·Aᵀ)·Bᵀ, sized as unit-
    # variance inputs give them (each layer's RMS row norm of A folded into its B rows). The low-rank term matters:
    # the 16-bit z lies on its format's grid, and only the fp32 sum with it lets a scale within half an ulp of 1
    # reach the rounded output (nn/dora_epilogue.py) — at B = 0 no 16-bit forward can show it, and share says so.
    z = probe_base_out(rows, row_sq, tokens, dtype).to(b.device)
    xa = probe_lora_input(tokens, b.shape[1], first.lora_A.dtype, b.device)
    a_rms = torch.cat([v.lora_A.detach().to(acc).pow(2).sum(1).mean().sqrt().expand(v.rows.numel()) for v in views])
    b_probe = (b_acc * a_rms.to(b.device)[:, None]).to(b.dtype)
    y_m = epilogue(z.clone(), xa, b_probe, m, denom, None, s)
    y_1 = epilogue(z.clone(), xa, b_probe, denom, denom, None, s)
    # ref = (m/‖V‖ − 1) ⊙ v with v = z + s·xa·B_probeᵀ (what the scale multiplies): ⟨Δy, ref⟩ = (m/‖V‖ − 1)·Σ_t Δy·v
    # and ⟨ref, ref⟩ = (m/‖V‖ − 1)²·Σ_t v² per row, the token sums in fp32 (Δy of two outputs within a factor 2 of
    # each other is exact there), the rest in float64
    vf = z.float() + s * (xa.float() @ b_probe.float().t())
    dy_z = ((y_m.float() - y_1.float()) * vf).sum(0).double()
    z_sq = (vf * vf).sum(0).double()
    excess = md / denom.double() - 1
    per_row = torch.stack(
        [
            torch.ones_like(md),
            rel,
            (tuned_norm - w).abs(),
            one_minus_cos,
            excess * dy_z,
            excess * excess * z_sq,
            (m0 > 0).double(),
        ],
        dim=1,
    )
    sizes = [v.rows.numel() for v in views]
    sums = torch.stack([part.sum(0) for part in per_row.split(sizes)])
    maxima = torch.stack([part.max() for part in rel.split(sizes)])
    return sums, maxima


def _gram(a: torch.Tensor) -> torch.Tensor:
    return a @ a.t()


def _batch_key(view: RowView) -> tuple:
    return (
        view.lora_A.shape[0],
        float(view.scaling),
        view.lora_A.dtype,
        view.lora_B.dtype,
        view.magnitude.dtype,
        view.magnitude.device,
    )


def layer_sums(
    views: Iterable[RowView], dtype: torch.dtype, epilogue: Epilogue | None = None, tokens: int = PROBE_TOKENS
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(names, sums (L, N_SUMS), maxima (L,)) of this rank's views, before any reduction, on the CPU. Layers are
    measured in batches of concatenated rows (`_batch_sums`) on one CPU thread (small ops, for which a thread pool
    only adds hand-off waits). Views this rank does not own add zeros."""
    if epilogue is None:
        from dora_dist.nn.dora_epilogue import dora_epilogue as epilogue
    with single_thread():
        views = list(views)  # (an engine's views may run collectives: every rank consumes all)
        names = [v.name for v in views]
        sums = torch.zeros(len(views), N_SUMS, dtype=torch.float64)
        maxima = torch.zeros(len(views), dtype=torch.float64)
        pending: dict[tuple, list[int]] = {}
        for i, view in enumerate(views):
            if view.owner and view.rows.numel():
                pending.setdefault(_batch_key(view), []).append(i)
        for members in pending.values():
            start = 0
            while start < len(members):
                batch, rows = [], 0
                while start < len(members) and (not batch or rows + views[members[start]].rows.numel() <= BATCH_ROWS):
                    batch.append(members[start])
                    rows += views[members[start]].rows.numel()
                    start += 1
                part, biggest = _batch_sums([views[i] for i in batch], dtype, epilogue, tokens)
                index = torch.tensor(batch)
                sums[index] = part.cpu()
                maxima[index] = biggest.cpu()
        return names, sums, maxima


class single_thread:
    """torch on one intra-op thread inside the block (CPU work only; GPU kernels are unaffected)."""

    def __enter__(self):
        self.prev = torch.get_num_threads()
        if self.prev != 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.prev != 1:
            torch.set_num_threads(self.prev)
        return False


@dataclass
class LayerHealth:
    """Final per-layer values after the reduction over ranks."""

    name: str
    group: str
    delta_m: float  # analyze's ΔM: mean |‖W'ᵢ‖ − ‖Wᵢ‖|
    delta_d: float  # analyze's ΔD: mean 1 − cos(W'ᵢ, Wᵢ)
    delta_m_rel: float  # mean |m − m₀| / m₀
    max_delta_m_rel: float
    share_num: float
    share_den: float


def finish_layers(names: list[str], sums: torch.Tensor, maxima: torch.Tensor) -> list[LayerHealth]:
    """Per-layer means from reduced sums."""
    out = []
    for name, s, mx in zip(names, sums.tolist(), maxima.tolist(), strict=True):
        rows = max(s[ROWS], 1.0)
        out.append(
            LayerHealth(
                name,
                layer_group(name),
                s[ABS_DM] / rows,
                s[DD] / rows,
                s[REL_DM] / max(s[REL_ROWS], 1.0),
                mx,
                s[SHARE_NUM],
                s[SHARE_DEN],
            )
        )
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


def measure(engine, env: DistEnv, dtype: torch.dtype, epilogue: Epilogue | None = None) -> list[LayerHealth]:
    """Every DoRA layer's health, the same on every rank. COLLECTIVE (every rank calls): the engine's row views
    (FSDP2: every layer's lora_A in one all-gather; ZeRO-3: the adapter gathered and W·Aᵀ summed per layer) and one
    all-gather of (layers × 8) floats per rank (sums added, maxima taken, in rank order on every rank)."""
    names, sums, maxima = layer_sums(engine.dora_row_views(), dtype, epilogue)
    every = env.all_gather_tensor(torch.cat([sums, maxima[:, None]], dim=1))  # (world, layers, N_SUMS + 1)
    return finish_layers(names, every[..., :N_SUMS].sum(0), every[..., N_SUMS].amax(0))
