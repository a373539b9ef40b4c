"""Rank-0 outputs: metrics.jsonl (one JSON object per optimizer step), a log line per step, loss.png."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    """Appends one JSON line per step to <dir>/metrics.jsonl (rank 0 only). On resume, lines of steps after the
    resumed step are dropped first, so the file always describes one consistent run."""

    def __init__(self, out_dir: str | Path, enabled: bool, resume_step: int = 0):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_line(rec: dict, max_steps: int) -> str:
    mem = rec.get("peak_mem_bytes", 0) / 2**20
    return (
        f"step {rec['step']:>5}/{max_steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.3e}  "
        f"grad_norm {rec['grad_norm']:.3f}  tok/s {rec['tokens_per_s']:.0f}  peak_mem {mem:.0f} MiB"
    )


def _finite(v: float) -> float:
    return v if math.isfinite(v) else float("nan")


def plot_loss(metrics_path: str | Path, png_path: str | Path, title: str = "training loss") -> Path | None:
    """loss.png from metrics.jsonl (matplotlib Agg; no display needed)."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    health = [r for r in records if any(k.startswith("dora_dd_") for k in r)]
    if health:  # a second panel: DoRA's magnitude and direction change over the steps (dora_dist/health.py)
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6, 7), sharex=True)
        _plot_health(ax2, health)
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [_finite(r["loss"]) for r in train], lw=1.2, label="train")
    if evals:  # eval records ({"step", "eval_loss", ...}, dora_dist/evaluate.py) beside the training loss
        ax.plot([r["step"] for r in evals], [_finite(r["eval_loss"]) for r in evals], "o-", lw=1.2, ms=4, label="eval")
        ax.legend()
    if not health:
        ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def _plot_health(ax, records: list[dict]) -> None:
    """ΔM (mean |m − m₀|/m₀) solid and ΔD (mean 1 − cos(W', W)) dashed, per layer group, on a log axis."""
    groups = {"attn": "attention", "mlp": "MLP", "other": "other"}
    steps = [r["step"] for r in records]
    for i, (g, label) in enumerate(groups.items()):
        if not any(f"dora_dd_{g}" in r for r in records):
            continue
        color = f"C{i}"
        ax.plot(
            steps,
            [r.get(f"dora_dm_rel_{g}", float("nan")) for r in records],
            color=color,
            lw=1.2,
            label=f"ΔM/m {label}",
        )
        ax.plot(
            steps,
            [r.get(f"dora_dd_{g}", float("nan")) for r in records],
            color=color,
            lw=1.2,
            ls="--",
            label=f"ΔD {label}",
        )
    ax.set_yscale("symlog", linthresh=1e-8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("DoRA change")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
