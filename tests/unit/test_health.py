"""DoRA's health metrics (dora_dist/health.py): the factored ΔM/ΔD equal analyze's dense definition, m₀ is the
fresh magnitude bit for bit, the effective share tells a rounding forward (0) from one that keeps the scale (1),
ZeRO-3's partial W·Aᵀ sums to W·Aᵀ, and the warning names its causes once."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dora_dist.analysis.decompose import row_change
from dora_dist.config import ConfigError, load_job_config
from dora_dist.health import (
    ABS_DM,
    DD,
    REL_DM,
    SHARE_DEN,
    SHARE_NUM,
    RowView,
    finish_layers,
    group_record,
    layer_group,
    layer_sums,
)
from dora_dist.health_log import HealthMonitor, warning_text
from dora_dist.nn.dora_linear import DoRALinear
from dora_dist.parallel.zero import partial_times_A

EPS32 = torch.finfo(torch.float32).eps


def _layer(out_f=24, in_f=40, r=4, dtype=torch.float64, seed=0) -> DoRALinear:
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=False, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g, dtype=dtype) / in_f**0.5)
    return DoRALinear(base, r=r, alpha=8, adapter_dtype=dtype)


def _train_like(layer: DoRALinear, seed=1) -> None:
    """B ≠ 0 and m moved, one row with m < 0 (W' then points against V)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype) * 0.05)
        layer.magnitude.mul_(1 + 0.01 * torch.randn(layer.out_features, generator=g, dtype=layer.lora_B.dtype))
        layer.magnitude[3] = -layer.magnitude[3]


def _view(layer: DoRALinear, name="model.layers.0.self_attn.q_proj") -> RowView:
    return RowView.whole_layer(name, layer, owner=True)


def change_sums(view: RowView, dtype=torch.float32, epilogue=None) -> tuple[torch.Tensor, float]:
    _, sums, maxima = layer_sums([view], dtype, epilogue)
    return sums[0], float(maxima[0])


def share(view: RowView, dtype, epilogue=None) -> tuple[float, float]:
    sums, _ = change_sums(view, dtype, epilogue)
    return float(sums[SHARE_NUM]), float(sums[SHARE_DEN])


def test_factored_change_equals_dense_definition():
    """float64 layer: the factored ΔM, ΔD (no W') equal analyze's dense row_change on the merged weight."""
    layer = _layer()
    _train_like(layer)
    sums, _ = change_sums(_view(layer))
    rows = layer.out_features
    w = layer.base_layer.weight.detach()
    v = w + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    tuned = layer.magnitude.detach()[:, None] * v / v.norm(dim=1, keepdim=True)  # W', float64
    dm, dd = row_change(w, tuned)
    assert sums[ABS_DM].item() / rows == pytest.approx(dm, rel=1e-12, abs=1e-15)
    assert sums[DD].item() / rows == pytest.approx(dd, rel=1e-10, abs=1e-15)
    assert dd > 1e-4  # the m < 0 row counts 1 − cos ≈ 2


def test_initial_magnitude_is_the_fresh_magnitude_bit_for_bit():
    """m₀ = ‖W‖ from the cached ‖W‖² is exactly what init_magnitude wrote (fp32 layer): no change, max 0."""
    layer = _layer(dtype=torch.float32)
    sums, biggest = change_sums(_view(layer))
    assert sums[REL_DM].item() == 0.0 and biggest == 0.0
    assert sums[ABS_DM].item() == pytest.approx(0.0, abs=8 * EPS32 * layer.out_features)  # ‖W‖ fp64 vs fp32 sqrt


def test_relative_change_is_mean_of_abs_m_minus_m0_over_m0():
    layer = _layer(dtype=torch.float32)
    m0 = layer.magnitude.detach().double().clone()
    with torch.no_grad():
        layer.magnitude.mul_(torch.linspace(0.99, 1.02, layer.out_features))
    sums, biggest = change_sums(_view(layer))
    rel = (layer.magnitude.double() - m0).abs() / m0
    assert sums[REL_DM].item() / layer.out_features == pytest.approx(rel.mean().item(), rel=1e-6)
    assert biggest == pytest.approx(rel.max().item(), rel=1e-6)


def _rounding_epilogue(base_out, xa, lora_B, magnitude, denom, bias, scaling):
    """The bf16 forward before issue 21 in miniature: the scale rounded to the output dtype before it multiplies."""
    scale = (magnitude / denom).to(base_out.dtype)
    return base_out * scale + (scaling * xa @ lora_B.t()).to(base_out.dtype) * scale


def _exact_epilogue(base_out, xa, lora_B, magnitude, denom, bias, scaling):
    """A forward that keeps the scale: everything formed in float64."""
    return (base_out.double() + scaling * xa.double() @ lora_B.double().t()) * (magnitude.double() / denom.double())


def _small_scale_view(eps: float) -> RowView:
    layer = _layer(out_f=64, in_f=64, dtype=torch.float32)
    with torch.no_grad():
        layer.magnitude.mul_(1 + eps)  # |m/‖V‖ − 1| = eps < 2⁻⁹: bf16 rounds the scale to 1
    return _view(layer)


def test_share_of_a_rounding_forward_is_zero_and_of_an_exact_one_is_one():
    view = _small_scale_view(5e-4)
    num, den = share(view, torch.bfloat16, _rounding_epilogue)
    assert den > 0 and num == 0.0
    num, den = share(view, torch.bfloat16, _exact_epilogue)
    # Δy and ref differ only by the fp32 rounding of m/‖V‖ (relative ε₃₂ of a scale ≈ 1, against eps = 5e-4)
    assert num / den == pytest.approx(1.0, abs=4 * EPS32 / 5e-4)


def test_share_of_the_real_fp32_forward_is_one():
    """fp32 keeps a 5e-4 scale change: the output's rounding (ε₃₂ relative per element) is 1e3 times smaller."""
    view = _small_scale_view(5e-4)
    num, den = share(view, torch.float32)
    assert num / den == pytest.approx(1.0, abs=8 * EPS32 / 5e-4)


def test_group_record_means_over_layers_and_names_groups():
    layers = [_layer(seed=s, dtype=torch.float32) for s in range(3)]
    for layer in layers:
        _train_like(layer)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    views = [_view(layer, n) for layer, n in zip(layers, names, strict=True)]
    result = finish_layers(*layer_sums(views, torch.float32))
    rec = group_record(result)
    assert rec["dora_dd_attn"] == result[0].delta_d
    assert rec["dora_dm_mlp"] == pytest.approx((result[1].delta_m + result[2].delta_m) / 2, rel=1e-15)
    assert rec["dora_dm_rel_max"] == max(h.max_delta_m_rel for h in result)
    assert [layer_group(n) for n in names] == ["attn", "mlp", "mlp"]
    assert layer_group("transformer.h.0.attn.c_attn") == "attn" and layer_group("lm_head") == "other"


@pytest.mark.parametrize("out_dim", [0, 1])
def test_partial_times_a_over_partitions_sums_to_w_times_a(out_dim):
    """ZeRO-3 partitions of the flat weight, starting and ending mid-row, add up to W·Aᵀ."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 7, 5, 3
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    a = torch.randn(r, in_f, generator=g, dtype=torch.float64)
    stored = w if out_dim == 0 else w.t().contiguous()
    flat = stored.reshape(-1)
    total = torch.zeros(out_f, r, dtype=torch.float64)
    for start in range(0, flat.numel(), 4):  # partitions of 4 elements: never row-aligned
        total += partial_times_A(flat[start : start + 4], start, tuple(stored.shape), out_dim, a, chunk_rows=1)
    torch.testing.assert_close(total, w @ a.t(), rtol=1e-13, atol=1e-13)


def test_warning_names_the_causes():
    frozen = {"dora_dm_rel_max": 0.0, "dora_share_attn": None, "dora_share_mlp": 1.0}
    text = warning_text(50, frozen, 1e-4, 0.5)
    assert text.count("\n") == 0 and "have not moved" in text and "frozen" in text and "learning rate" in text
    assert "weight decay" in text
    rounded = {"dora_dm_rel_max": 0.01, "dora_share_attn": 0.0, "dora_share_mlp": 0.9}
    text = warning_text(50, rounded, 1e-4, 0.5)
    assert "16-bit rounding" in text and "attention 0.00" in text and "mlp" not in text.split("share")[1][:40]
    assert warning_text(50, {"dora_dm_rel_max": 0.01, "dora_share_attn": 1.0}, 1e-4, 0.5) is None


def test_monitor_warns_once_and_only_after_warn_after():
    cfg = load_job_config(
        None, ["output.dora_health_warn_after=3", "training.log_every=2", "output.dora_health_every=0"]
    )
    mon = HealthMonitor.from_config(cfg)
    assert mon.every == 2 and mon.due(4, 10) and not mon.due(3, 10) and mon.due(3, 3)
    frozen = {"dora_dm_rel_max": 0.0}
    assert mon.check(2, frozen) is None
    assert mon.check(3, frozen) is not None
    assert mon.check(4, frozen) is None  # once
    assert not HealthMonitor.from_config(load_job_config(None, ["dora.use_dora=false"])).enabled
    assert HealthMonitor.from_config(load_job_config(None, [])).every == 10


@pytest.mark.parametrize(
    "override, key",
    [
        ("output.dora_health_min_share=1.5", "output.dora_health_min_share"),
        ("output.dora_health_every=-1", "output.dora_health_every"),
        ("output.dora_health_min_change=-1", "output.dora_health_min_change"),
    ],
)
def test_bad_health_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_job_config(None, [override])


def test_loss_png_gets_a_health_panel(tmp_path):
    import json

    from matplotlib.image import imread

    from dora_dist.metrics import plot_loss

    rows = [
        {
            "step": s,
            "loss": 7 - s / 10,
            "dora_dm_rel_attn": s * 1e-3,
            "dora_dd_attn": s * 1e-5,
            "dora_dm_rel_mlp": s * 2e-3,
            "dora_dd_mlp": s * 2e-5,
        }
        for s in range(1, 5)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_loss(tmp_path / "metrics.jsonl", tmp_path / "with.png")
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": r["step"], "loss": r["loss"]}) + "\n" for r in rows)
    )
    plot_loss(tmp_path / "metrics.jsonl", tmp_path / "without.png")
    assert imread(tmp_path / "with.png").shape[0] > 1.5 * imread(tmp_path / "without.png").shape[0]
    assert math.isfinite(rows[0]["loss"])


def test_batched_layers_equal_each_layer_alone(monkeypatch):
    """Rows of layers of different shapes measured together (and split into batches) = each layer on its own."""
    import dora_dist.health as health

    layers = [_layer(out_f=o, in_f=i, seed=o, dtype=torch.float32) for o, i in ((24, 40), (16, 40), (30, 12))]
    for layer in layers:
        _train_like(layer)
    views = [_view(layer, f"model.layers.{k}.mlp.up_proj") for k, layer in enumerate(layers)]
    alone = torch.stack([layer_sums([v], torch.float32)[1][0] for v in views])
    _, together, maxima = layer_sums(views, torch.float32)

    def same(got):  # float64 columns to rounding; the share's token sums run in fp32 (32 terms: ≤ 32ε relative)
        share_cols = [SHARE_NUM, SHARE_DEN]
        other = [c for c in range(got.shape[1]) if c not in share_cols]
        torch.testing.assert_close(got[:, other], alone[:, other], rtol=1e-12, atol=0)
        torch.testing.assert_close(got[:, share_cols], alone[:, share_cols], rtol=32 * EPS32, atol=0)

    same(together)
    monkeypatch.setattr(health, "BATCH_ROWS", 20)  # one layer per batch
    same(layer_sums(views, torch.float32)[1])
    assert maxima.shape == (3,) and bool((maxima > 0).all())


@pytest.mark.parametrize("trained", [True, False], ids=["B!=0", "B=0"])
def test_share_of_the_real_bf16_forward(trained):
    """The real bf16 epilogue keeps a 1e-3 scale change (< 2⁻⁹) once s·B·A dithers the fp32 sum before its one
    rounding (issue 21): share ≈ 1. At B = 0 the 16-bit base output is on bf16's grid and z·(1 + 1e-3) rounds back
    to z in any 16-bit forward: share ≈ 0, which is what the output really gets. Noise: 32 tokens × 256 rows, each
    output element's rounding flips with probability ~δ/ulp, so the share's standard error is ~5%; bounds are 5σ."""
    layer = _layer(out_f=256, in_f=64, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if trained:  # s·‖(BA)_i‖ ≈ 5% of ‖W_i‖, as in tests/unit/test_dora_16bit_fidelity.py
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
        layer.magnitude.copy_(layer.weight_norm() * (1 + 1e-3))
    num, den = share(_view(layer), torch.bfloat16)
    if trained:
        assert 0.75 <= num / den <= 1.25, num / den
    else:
        assert abs(num / den) <= 0.25, num / den
