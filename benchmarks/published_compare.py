"""Published runs (benchmarks/published/runs.yaml) against `dora-dist plan`: each run's job as a dora-dist Config,
its projection, and the errors. Used by tests/unit/test_plan_published.py and, with --write, for the README table
and plot:

    python benchmarks/published_compare.py            # the table
    python benchmarks/published_compare.py --write    # + benchmarks/results/published_vs_projected.{md,png}
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "published" / "runs.yaml"
GiB = 2**30


def load() -> tuple[dict, list[dict]]:
    """The file's architectures and its runs, each with its source's defaults filled in."""
    data = yaml.safe_load(RUNS.read_text())
    runs = []
    for raw in data["runs"]:
        run = {**data["defaults"].get(raw["source"], {}), **raw}
        run.setdefault("fit", [])
        if "time_s" in run:  # time for `samples` sequences of seq_len over all GPUs
            run["tokens_per_s"] = run["samples"] * run["seq_len"] / run["time_s"]
        runs.append(run)
    return data["architectures"], runs


def job_config(run: dict, architectures: dict, seq_len: int | None = None):
    """The run's job as a dora-dist Config (loss style and cluster returned beside it)."""
    from dora_dist.config import config_from_dict

    model = {"name_or_path": run["model"]}
    if run["model"] in architectures:
        model["config"] = dict(architectures[run["model"]])
    count = run["count"]
    data = {
        "model": model,
        "quantization": {"mode": "nf4" if run["method"] == "qlora" else "none", "double_quant": True},
        "dora": {
            "r": run["r"],
            "alpha": run["alpha"],
            "dropout": run["dropout"],
            "target_modules": list(run["targets"]),
            "use_dora": run["method"] == "dora",
            "adapter_dtype": run["adapter_dtype"],
        },
        "data": {"seq_len": seq_len or run["seq_len"]},
        "training": {
            "micro_batch_size": run["micro_batch"],
            "global_batch_size": run["micro_batch"] * count,
            "gradient_checkpointing": run["grad_ckpt"],
            "precision": "bf16",
            "loss_chunk_tokens": 0,
        },
        "parallel": {"engine": run["engine"], "cpu_offload": bool(run.get("cpu_offload", False))},
    }
    return config_from_dict(data)


def cluster_for(run: dict):
    from dora_dist.plan.hardware import make_cluster

    cluster = make_cluster(run["gpu"], 1, run["count"])
    if "memory_gib" in run and run.get("memory_kind") == "bound":  # a card limited to memory_gib
        cluster = dataclasses.replace(
            cluster, gpu=dataclasses.replace(cluster.gpu, memory_bytes=run["memory_gib"] * GiB)
        )
    return cluster


def predict(run: dict, architectures: dict) -> dict:
    """plan's memory (peak reserved, GiB), fit verdict and tokens/s for the run."""
    from dora_dist.plan.model_spec import model_spec
    from dora_dist.plan.project import project

    cluster = cluster_for(run)
    cfg = job_config(run, architectures)
    p = project(cfg, cluster, run["engine"], bool(run.get("cpu_offload", False)), model_spec(cfg), loss=run["loss"])
    # compared with what the source measured: the allocator's reserved peak, or its live (allocated) peak
    shown = p.memory.device_total if run.get("memory_kind") == "allocated" else p.reserved_bytes
    out = {"memory_gib": shown / GiB, "need_gib": p.need_bytes / GiB, "fits": p.fits}
    speed_cfg = job_config(run, architectures, run.get("speed_seq_len"))
    q = (
        p
        if speed_cfg.data.seq_len == cfg.data.seq_len
        else project(
            speed_cfg,
            cluster,
            run["engine"],
            bool(run.get("cpu_offload", False)),
            model_spec(speed_cfg),
            loss=run["loss"],
        )
    )
    out["tokens_per_s"] = q.tokens_per_s
    out["tokens_per_s_range"] = q.tokens_per_s_range
    out["dominant"] = p.dominant_memory[:2]
    return out


def compare(runs: list[dict] | None = None) -> list[dict]:
    """Every run with its prediction and relative errors (predicted / measured - 1)."""
    arch, all_runs = load()
    rows = []
    for run in runs or all_runs:
        pred = predict(run, arch)
        amb = run.get("ambiguous", {})
        row = {"run": run, "pred": pred}
        if run.get("memory_gib") is not None and run.get("memory_kind") != "bound":
            row["mem_err"] = pred["memory_gib"] / run["memory_gib"] - 1
        if run.get("tokens_per_s"):
            row["tps_err"] = pred["tokens_per_s"] / run["tokens_per_s"] - 1
        row["mem_target"] = "mem_err" in row and not amb.get("memory", False)
        row["tps_target"] = "tps_err" in row and not amb.get("speed", False)
        row["held_out"] = not run["fit"]
        row["ran"] = run.get("ran", True)
        row["fit_ok"] = pred["fits"] == row["ran"]
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict:
    def share(key, limit, held_only=False):
        vals = [r[key] for r in rows if r[f"{key[:3]}_target"] and (r["held_out"] or not held_only)]
        return sum(abs(v) <= limit for v in vals), len(vals)

    return {
        "memory": share("mem_err", 0.20),
        "memory_held_out": share("mem_err", 0.20, True),
        "tokens": share("tps_err", 0.35),
        "tokens_held_out": share("tps_err", 0.35, True),
        "verdicts": (sum(r["fit_ok"] for r in rows), len(rows)),
    }


def error_stats(rows: list[dict]) -> str:
    """Median and range of the relative errors, for the held-out and the fitted points separately."""
    import statistics

    out = []
    for key, what in (("mem_err", "memory"), ("tps_err", "tokens/s")):
        for held, label in ((True, "held out"), (False, "used for fitting")):
            v = [r[key] for r in rows if r[f"{key[:3]}_target"] and r["held_out"] == held]
            if v:
                med = 100 * statistics.median(abs(x) for x in v)
                out.append(
                    f"{what}, {label}: {len(v)} points, median |error| {med:.1f}%, range "
                    f"{100 * min(v):+.0f}% … {100 * max(v):+.0f}%"
                )
    return "\n".join(f"- {line}" for line in out)


def table(rows: list[dict]) -> str:
    lines = [
        "| run | GPUs | published GiB | plan GiB | err | published tok/s | plan tok/s | err | plan says |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        run, pred = r["run"], r["pred"]
        mem = run.get("memory_gib")
        mark_m = "" if r["mem_target"] else "*"
        mark_t = "" if r["tps_target"] else "*"
        fit = "" if r["held_out"] else " (fit)"
        lines.append(
            f"| {run['id']}{fit} | {run['count']}× {run['gpu']} | "
            + (f"{mem:.2f}{' (bound)' if run.get('memory_kind') == 'bound' else ''}" if mem else "–")
            + f" | {pred['memory_gib']:.2f} | "
            + (f"{100 * r['mem_err']:+.0f}%{mark_m}" if "mem_err" in r else "–")
            + " | "
            + (f"{run['tokens_per_s']:,.0f}" if run.get("tokens_per_s") else "–")
            + f" | {pred['tokens_per_s']:,.0f} | "
            + (f"{100 * r['tps_err']:+.0f}%{mark_t}" if "tps_err" in r else "–")
            + f" | {'fits' if pred['fits'] else 'does not fit'}{'' if r['ran'] else ' (ran out of memory)'}"
            + ("" if r["fit_ok"] else " WRONG")
            + " |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, key, meas, label in (
        (axes[0], "memory_gib", "memory_gib", "peak memory per GPU (GiB)"),
        (axes[1], "tokens_per_s", "tokens_per_s", "tokens/s (all GPUs)"),
    ):
        errkey = "mem_err" if key == "memory_gib" else "tps_err"
        pts = [(r["run"][meas], r["pred"][key], r) for r in rows if errkey in r]
        for x, y, r in pts:
            target = r[f"{errkey[:3]}_target"]
            ax.scatter(
                x,
                y,
                marker="o" if r["held_out"] else "s",
                facecolors="C0" if target else "none",
                edgecolors="C0" if target else "grey",
            )
        lo = min(min(x, y) for x, y, _ in pts) * 0.8
        hi = max(max(x, y) for x, y, _ in pts) * 1.2
        band = 0.20 if key == "memory_gib" else 0.35
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.plot([lo, hi], [lo * (1 + band), hi * (1 + band)], "k:", lw=0.6)
        ax.plot([lo, hi], [lo * (1 - band), hi * (1 - band)], "k:", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(f"published {label}")
        ax.set_ylabel(f"dora-dist plan {label}")
        ax.set_title(f"±{int(band * 100)}% band; hollow: ambiguous; squares: used to derive presets", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/published_vs_projected.{md,png}")
    args = ap.parse_args()
    rows = compare()
    text = table(rows)
    s = summary(rows)
    text += (
        f"\n\nmemory within 20%: {s['memory'][0]}/{s['memory'][1]} (held out {s['memory_held_out'][0]}/"
        f"{s['memory_held_out'][1]}); tokens/s within 35%: {s['tokens'][0]}/{s['tokens'][1]} (held out "
        f"{s['tokens_held_out'][0]}/{s['tokens_held_out'][1]}); fit verdicts right: {s['verdicts'][0]}/"
        f"{s['verdicts'][1]} (* ambiguous: not in the targets; (fit): used to derive a preset)"
    )
    text += "\n\n" + error_stats(rows)
    print(text)
    if args.write:
        out = ROOT / "benchmarks" / "results"
        out.mkdir(exist_ok=True)
        (out / "published_vs_projected.md").write_text(text + "\n")
        plot(rows, out / "published_vs_projected.png")


if __name__ == "__main__":
    main()
