"""`dora-dist analyze`: ΔM and ΔD per layer and checkpoint, the correlation per method, JSON/CSV and scatter plots.

The DoRA paper (Fig. 2) reports that full fine-tuning and LoRA change magnitude and direction together (positive
slope of ΔD against ΔM) while DoRA does not (negative slope). This module reports whatever the checkpoints show.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dora_dist.analysis.decompose import (
    LayerChange,
    SafetensorsCheckpoint,
    Tuned,
    TunedAdapter,
    TunedCheckpoint,
    layer_change,
)
from dora_dist.errors import InputNotFoundError

#: 2-D weights that are not linear layers (token and position tables); left out unless --layers selects them
DEFAULT_EXCLUDE = r"(^|\.)(embed_tokens|embeddings?|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings)$"


def open_tuned(spec: str) -> Tuned:
    """'PATH' or 'METHOD=PATH': an adapter directory (adapter_config.json) or a model directory (merged / full FT).

    The method defaults to dora/lora from the adapter config, and to 'full' for a model directory.
    """
    method, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    directory = Path(path)
    if not directory.is_dir():
        raise InputNotFoundError(f"--tuned: {path!r} is not a directory (an adapter or model directory)")
    label = f"{directory.parent.name}/{directory.name}"
    if (directory / "adapter_config.json").is_file():
        return TunedAdapter(directory, method or None, label)
    return TunedCheckpoint(directory, method or "full", label)


def pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


def slope(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return None if n < 2 or sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def correlations(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: Pearson r and least-squares slope of ΔD on ΔM over all points, and the mean of the per-layer r
    over checkpoints (the paper's view: one layer followed through training), when a layer has ≥ 3 checkpoints."""
    out: dict[str, dict[str, Any]] = {}
    for method in sorted({r["method"] for r in records}):
        rows = [r for r in records if r["method"] == method]
        xs, ys = [r["delta_m"] for r in rows], [r["delta_d"] for r in rows]
        per_layer = []
        for layer in sorted({r["layer"] for r in rows}):
            pts = [r for r in rows if r["layer"] == layer]
            c = pearson([p["delta_m"] for p in pts], [p["delta_d"] for p in pts])
            if c is not None:
                per_layer.append(c)
        out[method] = {
            "points": len(rows),
            "pearson_r": pearson(xs, ys),
            "slope": slope(xs, ys),
            "within_layer_r": sum(per_layer) / len(per_layer) if per_layer else None,
            "layers_with_r": len(per_layer),
        }
    return out


def analyze(
    base: str | Path,
    tuned: list[str],
    out: str | Path | None = None,
    base_quant: str | None = None,
    layers: str | None = None,
    plot: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """ΔM/ΔD of every changed layer of every tuned checkpoint against `base`, one layer in memory at a time.

    base_quant="nf4"/"fp4": the base each layer is compared with is the 4-bit quantization of the checkpoint's
    weight (what a QDoRA adapter was trained on), dequantized chunk by chunk.
    layers: a regex (re.search) selecting layer names; default: every 2-D weight but embedding tables.
    """
    from dora_dist.models.builtin import resolve_base

    base = resolve_base(str(base))  # builtin:tiny-llama, as the trainer names it in adapter_config.json
    if not Path(base).is_dir() or not any(Path(base).glob("*.safetensors")):
        raise InputNotFoundError(
            f"--base: {base!r} is not a model directory with *.safetensors weights; give a "
            "local model directory (a hub model: download it first) or builtin:tiny-llama"
        )
    base_ckpt = SafetensorsCheckpoint(base)
    checkpoints = [open_tuned(t) for t in tuned]
    select = re.compile(layers) if layers else None
    exclude = re.compile(DEFAULT_EXCLUDE)
    wanted: dict[str, list[Tuned]] = {}
    for ck in checkpoints:
        for layer in ck.layers(base_ckpt):
            if select.search(layer) if select else not exclude.search(layer):
                wanted.setdefault(layer, []).append(ck)
    records: list[dict[str, Any]] = []
    unchanged = 0
    for layer in sorted(wanted):
        if base_ckpt.resolve(layer) is None:
            raise KeyError(f"base {base} has no weight for layer {layer!r}")
        source = base_ckpt.source(layer, base_quant)  # one base layer in memory (quantized once if asked)
        for ck in wanted[layer]:
            change: LayerChange = layer_change(layer, source, ck.rows_fn(layer, source))
            if change.delta_m == 0.0 and change.delta_d == 0.0:
                unchanged += 1  # e.g. a layer a merged adapter did not touch
                continue
            records.append({"checkpoint": ck.label, "method": ck.method, **asdict(change)})
        del source
    result = {
        "base": str(base),
        "base_quant": base_quant,
        "records": records,
        "unchanged_layers": unchanged,
        "correlation": correlations(records),
    }
    if out is not None:
        write_outputs(result, Path(out), plot)
    if verbose:
        print(summary(result))
    return result


def summary(result: dict[str, Any]) -> str:
    fmt = lambda v: "   n/a" if v is None else f"{v:+.3f}"  # noqa: E731
    lines = [f"{'method':<10} {'points':>6} {'pearson r':>10} {'slope dD/dM':>12} {'within-layer r':>15}"]
    for method, c in result["correlation"].items():
        lines.append(
            f"{method:<10} {c['points']:>6} {fmt(c['pearson_r']):>10} {fmt(c['slope']):>12} "
            f"{fmt(c['within_layer_r']):>15}"
        )
    if result["unchanged_layers"]:
        lines.append(f"({result['unchanged_layers']} unchanged layer/checkpoint pairs left out)")
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out: Path, plot: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "changes.json").write_text(json.dumps(result, indent=2) + "\n")
    fields = ["checkpoint", "method", "layer", "delta_m", "delta_d", "base_norm", "rows"]
    with open(out / "changes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result["records"])
    if plot:
        for method in result["correlation"]:
            scatter(result, method, out / f"scatter_{method}.png")


def scatter(result: dict[str, Any], method: str, path: Path) -> None:
    """ΔD against ΔM for one method, one colour per layer kind (leaf name), as in the paper's Figure 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["records"] if r["method"] == method]
    fig, ax = plt.subplots(figsize=(5, 4))
    for kind in sorted({r["layer"].rsplit(".", 1)[-1] for r in rows}):
        pts = [r for r in rows if r["layer"].rsplit(".", 1)[-1] == kind]
        ax.scatter([p["delta_m"] for p in pts], [p["delta_d"] for p in pts], s=14, label=kind, alpha=0.8)
    c = result["correlation"][method]
    r_txt = "n/a" if c["pearson_r"] is None else f"{c['pearson_r']:+.2f}"
    ax.set_title(f"{method}: r = {r_txt}, {c['points']} points")
    ax.set_xlabel("ΔM (mean |‖W'ᵢ‖ − ‖Wᵢ‖|)")
    ax.set_ylabel("ΔD (mean 1 − cos(W'ᵢ, Wᵢ))")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
