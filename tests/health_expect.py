"""What `dora-dist analyze` says about a saved adapter, per layer group, with the bound on how far the in-run
health metrics (dora_dist/health.py) may differ from it (shared by the integration and dist tests).

Both sides read the same fp32 tensors; they differ only in fp32 rounding:
- ΔM. In the run ‖W'ᵢ‖ = |mᵢ| exactly and ‖Wᵢ‖ = sqrt of the fp32 ‖Wᵢ‖² (a sum of `in` squares: relative error
  ≤ (log2(in)/2 + 1)ε); analyze forms W' = fp32(V·fp32(m/‖V‖)) (V's elements, the scale and the norm: relative
  error ≤ (log2(in)/2 + 5)ε) and ‖W‖ in float64. So |ΔM_run − ΔM_analyze| ≤ K·ε·mean(‖Wᵢ‖ + |mᵢ|), K = log2(in) + 6.
- ΔD. Analyze's 0.5‖u − v‖² with v perturbed by δ ≤ K·ε (relative) moves by ≤ √(2ΔD)·δ + δ²; the run's factored
  1 − cos has relative error ≤ K·ε from its fp32 inputs (×2 for ‖D‖²‖W‖² − ⟨D, W⟩², whose terms are far apart for a
  low-rank D and a random W). Bound: K·ε·(√(2ΔD) + 4ΔD) + (K·ε)².
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

EPS32 = torch.finfo(torch.float32).eps


def analyze_by_group(base_dir: Path, adapter_dir: Path) -> dict[str, dict[str, float]]:
    """{group: {"delta_m", "delta_d", "tol_m", "tol_d", "layers"}}: analyze's per-layer records averaged over each
    group's layers (as the run logs them) and the mean per-layer bound."""
    from dora_dist.analysis.report import analyze
    from dora_dist.health import layer_group

    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    k = math.log2(max(cfg["hidden_size"], cfg["intermediate_size"])) + 6
    out: dict[str, dict[str, float]] = {}
    for rec in analyze(base_dir, [str(adapter_dir)], verbose=False, plot=False)["records"]:
        g = out.setdefault(
            layer_group(rec["layer"]), {"delta_m": 0.0, "delta_d": 0.0, "tol_m": 0.0, "tol_d": 0.0, "layers": 0}
        )
        dm, dd, norm = rec["delta_m"], rec["delta_d"], rec["base_norm"]
        g["delta_m"] += dm
        g["delta_d"] += dd
        g["tol_m"] += k * EPS32 * (2 * norm + dm)  # mean(‖W‖ + |m|) ≤ 2·mean‖W‖ + ΔM
        g["tol_d"] += k * EPS32 * (math.sqrt(2 * dd) + 4 * dd) + (k * EPS32) ** 2
        g["layers"] += 1
    for g in out.values():
        for key in ("delta_m", "delta_d", "tol_m", "tol_d"):
            g[key] /= g["layers"]
    return out


def assert_logged_equals_analyze(record: dict, expected: dict[str, dict[str, float]]) -> None:
    assert expected, "analyze found no changed layer"
    for group, e in expected.items():
        assert abs(record[f"dora_dm_{group}"] - e["delta_m"]) <= e["tol_m"], (group, record, e)
        assert abs(record[f"dora_dd_{group}"] - e["delta_d"]) <= e["tol_d"], (group, record, e)
