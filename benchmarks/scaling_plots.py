"""The PNGs of benchmarks/scaling.py: tokens/s, memory per rank and collective bytes per step against the number of
ranks (flat meshes), projected against measured (bytes, memory, step time; every point), and for the HSDP / tp
points their bytes per mesh dimension (counted vs predicted) beside the flat run of the same engine and ranks.
Axes labelled, the machine named."""

from __future__ import annotations

from pathlib import Path

MARKERS = {"none": "o", "ddp": "s", "fsdp2": "^", "zero2": "D", "zero3": "v"}
COLORS = {"none": "black", "ddp": "tab:blue", "fsdp2": "tab:orange", "zero2": "tab:green", "zero3": "tab:red"}


def _series(rows, base, mode, engine):
    """Points of one engine/base/mode (single-node launches), with the one-rank baseline first."""
    pts = [
        r
        for r in rows
        if r["base"] == base
        and r["launcher"] in ("torchrun", "single")
        and r.get("layout", "flat") == "flat"
        and ((r["world"] == 1) or (r["engine"] == engine and r["mode"] == mode))
    ]
    return sorted(pts, key=lambda r: r["world"])


def _engines(rows):
    return sorted({r["engine"] for r in rows if r["world"] > 1}, key=list(MARKERS).index)


def plot_all(rows: list[dict], stem: Path, machine: str) -> list[Path]:
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    bases = sorted({r["base"] for r in rows})
    modes = [m for m in ("strong", "weak") if any(r["mode"] == m for r in rows)]

    def grid(title):
        fig, axes = plt.subplots(len(bases), len(modes), figsize=(5.5 * len(modes), 4 * len(bases)), squeeze=False)
        fig.suptitle(f"{title}\n{machine}", fontsize=10)
        return fig, axes

    def finish(fig, name):
        fig.tight_layout()
        path = Path(f"{stem}_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)

    # 1. tokens/s vs ranks
    fig, axes = grid("Training throughput (hollow: oversubscribed, more processes than cores)")
    for i, base in enumerate(bases):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for eng in _engines(rows):
                s = _series(rows, base, mode, eng)
                if len(s) < 2 and not any(r["engine"] == eng for r in s):
                    continue
                ax.plot([r["world"] for r in s], [r["tokens_per_s"] for r in s], color=COLORS[eng], label=eng)
                for r in s:
                    ax.scatter(
                        r["world"],
                        r["tokens_per_s"],
                        marker=MARKERS[eng],
                        color=COLORS[eng],
                        facecolors="none" if r["oversubscribed"] else COLORS[eng],
                    )
            ax.set(title=f"{base} base, {mode} scaling", xlabel="ranks", ylabel="tokens/s (global)")
            ax.set_xticks(sorted({r["world"] for r in rows}))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    finish(fig, "tokens_per_s")

    # 2. memory per rank vs ranks (measured live-tensor peak, projection dashed)
    fig, axes = grid(
        "Peak memory per rank (live tensors): measured (solid) vs projected (dashed); ZeRO includes "
        "DeepSpeed's 2 GB default gradient bucket"
    )
    for i, base in enumerate(bases):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for eng in _engines(rows):
                s = [r for r in _series(rows, base, mode, eng) if r["live_bytes_peak"]]
                if not s:
                    continue
                x = [r["world"] for r in s]
                ax.plot(x, [r["live_bytes_peak"] / 2**20 for r in s], color=COLORS[eng], marker=MARKERS[eng], label=eng)
                ax.plot(x, [r["predicted_memory_bytes"] / 2**20 for r in s], color=COLORS[eng], ls="--")
            ax.set(title=f"{base} base, {mode} scaling", xlabel="ranks", ylabel="MiB per rank (log)", yscale="log")
            ax.set_xticks(sorted({r["world"] for r in rows}))
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    finish(fig, "memory")

    # 3. collective bytes per step vs ranks
    fig, axes = grid("Collective bytes per optimizer step and rank (counted)")
    for i, base in enumerate(bases):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for eng in _engines(rows):
                s = [r for r in _series(rows, base, mode, eng) if r["world"] > 1]
                if s:
                    ax.plot(
                        [r["world"] for r in s],
                        [r["counted_bytes_per_step"] / 2**20 for r in s],
                        color=COLORS[eng],
                        marker=MARKERS[eng],
                        label=eng,
                    )
            ax.set(title=f"{base} base, {mode} scaling", xlabel="ranks", ylabel="MiB per step (log)", yscale="log")
            ax.set_xticks(sorted({r["world"] for r in rows if r["world"] > 1}))
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    finish(fig, "bytes")

    # 4. projected vs measured
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    fig.suptitle(f"Projection (dora_dist.plan) vs measurement\n{machine}", fontsize=10)
    panels = [
        ("counted_bytes_per_step", "predicted_bytes_per_step", 2**20, "collective MiB per step"),
        ("live_bytes_peak", "predicted_memory_bytes", 2**20, "peak MiB per rank"),
        ("step_s", "predicted_step_s", 1, "step time, s"),
    ]
    for ax, (mk, pk, scale, label) in zip(axes, panels, strict=True):
        pts = [r for r in rows if r.get(mk) and r.get(pk)]
        for r in pts:
            hollow = mk == "step_s" and r["oversubscribed"]
            ax.scatter(
                r[mk] / scale,
                r[pk] / scale,
                marker=MARKERS[r["engine"]],
                color=COLORS[r["engine"]],
                facecolors="none" if hollow else COLORS[r["engine"]],
            )
        if pts:
            lo = min(min(r[mk], r[pk]) for r in pts) / scale
            hi = max(max(r[mk], r[pk]) for r in pts) / scale
            ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, label="y = x")
        ax.set(xlabel=f"measured {label}", ylabel=f"projected {label}", xscale="log", yscale="log")
        ax.grid(alpha=0.3, which="both")
    for eng in MARKERS:
        axes[0].scatter([], [], marker=MARKERS[eng], color=COLORS[eng], label=eng)
    axes[0].legend(fontsize=8)
    finish(fig, "projected_vs_measured")

    mesh = [r for r in rows if r.get("layout", "flat") != "flat"]
    if mesh:
        plot_mesh(plt, rows, mesh, machine, finish)
    return out


MESH_DIMS = ("dp", "dp_shard", "dp_replicate", "tp")
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "reduce", "other")


def _dim_total(r: dict, prefix: str, dim: str) -> float:
    """Bytes of one mesh dimension per step; "dp" (the flat group) is the total less the named dimensions."""
    if dim != "dp":
        return sum(r.get(f"{prefix}_{dim}_{k}_bytes") or 0 for k in KINDS)
    total = sum(r.get(f"{prefix}_{k}_bytes") or 0 for k in KINDS)
    return total - sum(_dim_total(r, prefix, d) for d in MESH_DIMS[1:])


def plot_mesh(plt, rows, mesh, machine, finish) -> None:
    """HSDP / tp points: bytes per mesh dimension, counted (solid) and predicted (hatched); tokens/s beside the
    flat run of the same engine, base, mode and ranks."""
    import numpy as np

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
    fig.suptitle(
        f"Hybrid sharding and tensor parallelism: bytes per mesh dimension and throughput\n{machine}", fontsize=10
    )
    x = np.arange(len(mesh))
    width = 0.8 / len(MESH_DIMS)
    colors = dict(zip(MESH_DIMS, ("tab:gray", "tab:orange", "tab:purple", "tab:cyan"), strict=True))
    for i, d in enumerate(MESH_DIMS):
        counted = [_dim_total(r, "counted", d) / 2**20 for r in mesh]
        predicted = [_dim_total(r, "predicted", d) / 2**20 for r in mesh]
        ax.bar(x + i * width, counted, width / 2, color=colors[d], label=f"{d} counted")
        ax.bar(x + i * width + width / 2, predicted, width / 2, color="none", edgecolor=colors[d], hatch="//")
    labels = [f"{r['engine']} {r['layout']}\n{r['world']} ranks" for r in mesh]
    ax.set_xticks(x + 0.4 - width / 2, labels, fontsize=8)
    ax.set(ylabel="MiB per step and rank (log)", yscale="log", title="collective bytes per mesh dimension")
    ax.grid(alpha=0.3, axis="y", which="both")
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="predicted"))
    ax.legend(handles=handles, fontsize=7)
    flat = {
        (r["engine"], r["base"], r["mode"], r["world"]): r
        for r in rows
        if r.get("layout", "flat") == "flat" and r["launcher"] == "torchrun"
    }
    tps = [r["tokens_per_s"] for r in mesh]
    ref = [(flat.get((r["engine"], r["base"], r["mode"], r["world"])) or {}).get("tokens_per_s", 0) for r in mesh]
    bx.bar(x - 0.2, tps, 0.4, color="tab:orange", label="this mesh")
    bx.bar(x + 0.2, ref, 0.4, color="tab:blue", label="flat, same engine and ranks")
    bx.set_xticks(x, labels, fontsize=8)
    bx.set(ylabel="tokens/s (global)", title="throughput (CPU: compute-bound, not a GPU scaling result)")
    bx.grid(alpha=0.3, axis="y")
    bx.legend(fontsize=8)
    finish(fig, "mesh")
