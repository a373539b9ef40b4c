"""Multi-node scaling of DoRA / QDoRA training: the real trainer at 1, 2, 4 ... ranks for every engine, dense and NF4
bases, strong scaling (fixed global batch) and weak scaling (fixed per-rank batch), held against the projection.

    PYTHONPATH=. python benchmarks/scaling.py                       # CPU, gloo: the full sweep (~15 min on 2 cores)
    PYTHONPATH=. python benchmarks/scaling.py --ranks 1 2 --engines ddp fsdp2 --bases dense --modes strong
    python benchmarks/scaling.py --device cuda --ranks 1 2 4 8 --gpu h100-80gb     # GPUs: nccl, allocator peaks

Per run and rank (from the trainer's own probes, parallel/step_probe.py, switched on by environment variables):
- step time and tokens/s (the median of the steps between the first and the memory-probed last one);
- bytes moved per step by each kind of collective, *counted* from the c10d ops that ran (parallel/comm_counter.py);
- peak memory: on CPU the peak of live tensor bytes (a census at the step's start + the profiler's allocation
  records during it) and, for reference, the process's max RSS; on CUDA the caching allocator's peak.
Every point is compared with dora_dist.plan: collective bytes must equal the counted ones exactly (a mismatch is
reported and makes the exit status non-zero), memory is reported with its error, time too (compute calibrated
from the one-rank run of the same base: seconds per token, then the loopback/interconnect model for
communication). Runs with more processes than cores are marked oversubscribed: their bytes and memory are valid,
their times are not scaling data.

Two multi-node runs go through the launch scripts on loopback: launch/multinode.sh as 2 nodes × 1 process (separate
node ranks, c10d rendezvous), and launch/deepspeed.sh with a hostfile of two "nodes" and NODE_RANK (deepspeed
--no_ssh), so the multi-node paths are exercised by a benchmark and not only by tests. Both pin one flat group
(parallel.shard_group = world): on several nodes the default is one shard group per node.

Mesh points (issues 23, 24; `--no-mesh` leaves them out, `--mesh-only` runs just them and the one-rank baseline and
merges them into the saved JSON): FSDP2 HSDP on 4 ranks as 2 nodes × 2 (launch/multinode.sh,
parallel.shard_group=2), tp=2 (ddp, 2 ranks) and dp=2 × tp=2 (fsdp2, 4 ranks). Their collectives are also counted
per mesh dimension (comm_<dim>_<kind>_bytes: inside a shard group, across groups, inside a tp group) and compared
with the planner's prediction for each dimension.

Output: benchmarks/results/scaling_<device>.json and .csv, and PNG plots (tokens/s, memory/rank, bytes/step vs
ranks, projected vs measured); progress on stderr, a summary table on stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "reduce", "other")
ENGINES = {"dense": ("ddp", "fsdp2", "zero2", "zero3"), "nf4": ("ddp", "zero2", "fsdp2")}
NF4 = ["quantization.mode=nf4", "quantization.compute_dtype=float32"]


MESH_DIMS = ("dp_shard", "dp_replicate", "tp")  # the per-dimension counts (the flat "dp" is the rest)


@dataclass(frozen=True)
class Point:
    engine: str
    base: str  # dense | nf4
    mode: str  # strong | weak
    world: int
    launcher: str = "torchrun"  # torchrun | multinode.sh | deepspeed-hostfile | single
    shard_group: int = 0  # parallel.shard_group (0: the config's default)
    tp: int = 1  # parallel.tp

    @property
    def nodes(self) -> int:
        return 2 if self.launcher in ("multinode.sh", "deepspeed-hostfile") else 1

    @property
    def layout(self) -> str:
        """ "flat", or the mesh: "HSDP 2×2", "tp=2", "dp=2 × tp=2"."""
        dp = self.world // self.tp
        if self.shard_group and self.shard_group < dp:
            return f"HSDP {dp // self.shard_group}×{self.shard_group}" + (f" tp={self.tp}" if self.tp > 1 else "")
        if self.tp > 1:
            return f"dp={dp} × tp={self.tp}" if dp > 1 else f"tp={self.tp}"
        return "flat"

    @property
    def key(self) -> str:
        extra = f"_g{self.shard_group}" if self.shard_group else ""
        extra += f"_tp{self.tp}" if self.tp > 1 else ""
        return f"{self.base}_{self.engine}_{self.mode}_w{self.world}_{self.launcher.replace('.', '')}{extra}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_name(device: str) -> str:
    if device == "cuda":
        import torch

        return f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores (gloo over loopback)"


def overrides(p: Point, args, out: Path) -> list[str]:
    per_rank = args.micro * args.accum
    global_batch = args.global_batch if p.mode == "strong" else per_rank * p.world
    engine = "none" if p.world == 1 else p.engine
    o = [
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        f"training.max_steps={args.steps}",
        f"training.global_batch_size={global_batch}",
        f"training.micro_batch_size={args.micro}",
        f"data.seq_len={args.seq}",
        "data.synthetic_samples=400",
        "training.warmup_steps=1",
        f"training.device={args.device}",
        f"model.cache_dir={args.cache}",
        f"output.dir={out}",
        "output.progress_bar=false",
        "output.plot=false",
        "output.save_adapter=false",
        "checkpoint.resume=none",
        "checkpoint.every_steps=0",
    ]
    if p.launcher != "deepspeed-hostfile":
        o.append(f"parallel.engine={engine}")
    if p.shard_group:
        o.append(f"parallel.shard_group={p.shard_group}")
    if p.tp > 1:
        o.append(f"parallel.tp={p.tp}")
    return o + (NF4 if p.base == "nf4" else [])


def run_point(p: Point, args, out: Path) -> None:
    """Launch one training run with the probes on; raises with the log tail on failure."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # one core per rank (as one GPU per rank): the one-rank baseline computes on one core too
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        DS_BUILD_OPS="0",
        DORA_DIST_COUNT_COMM="1",
        DORA_DIST_COUNT_COMM_DIR=str(out / "probe"),
        DORA_DIST_MEMORY_STEP=str(args.steps),
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    ov = overrides(p, args, out)
    port = str(free_port())
    if p.launcher == "single":
        cmds = [[sys.executable, "-m", "dora_dist.train", *ov]]
    elif p.launcher == "torchrun":
        cmds = [
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(p.world),
                "-m",
                "dora_dist.train",
                *ov,
            ]
        ]
    elif p.launcher == "multinode.sh":  # 2 "nodes" × world/2 processes, c10d rendezvous on 127.0.0.1
        cmds = [["bash", str(ROOT / "launch" / "multinode.sh"), *ov] for _ in range(2)]
        envs = [
            dict(
                env,
                NNODES="2",
                NODE_RANK=str(n),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                NPROC_PER_NODE=str(p.world // 2),
                RDZV_ID=f"scaling{port}",
            )
            for n in range(2)
        ]
    elif p.launcher == "deepspeed-hostfile":  # a hostfile of two hosts; each "node" started with its NODE_RANK
        hostfile = out / "hostfile"
        hostfile.write_text(f"localhost slots={p.world // 2}\n127.0.0.1 slots={p.world // 2}\n")
        cmds = [["bash", str(ROOT / "launch" / "deepspeed.sh"), *ov] for _ in range(2)]
        envs = [
            dict(
                env,
                HOSTFILE=str(hostfile),
                NODE_RANK=str(n),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                NUM_GPUS=str(p.world // 2),
                ENGINE=p.engine,
            )
            for n in range(2)
        ]
    else:
        raise ValueError(p.launcher)
    if len(cmds) == 1:
        envs = [env]
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c, e in zip(cmds, envs, strict=True)
    ]
    logs = [pr.communicate(timeout=args.timeout)[0] for pr in procs]
    (out / "launch.log").write_text("\n".join(logs))
    if any(pr.returncode for pr in procs):
        raise RuntimeError(f"{p} failed:\n" + "\n".join(lg[-3000:] for lg in logs))


def collect(p: Point, out: Path, steps: int) -> dict:
    """Per-rank measurements of one run (counts and memory of the last step, median time of the middle steps)."""
    ranks = []
    for f in sorted((out / "probe").glob("comm_rank*.json")):
        data = json.loads(f.read_text())
        by_step = {s["step"]: s for s in data["steps"]}
        last = by_step[steps]
        timed = [by_step[s]["step_s"] for s in range(2, steps) if s in by_step] or [last["step_s"]]
        ranks.append(
            {
                "rank": data["rank"],
                "step_s": statistics.median(timed),
                "bytes": {k: last[f"comm_{k}_bytes"] for k in KINDS},
                "dim_bytes": {d: {k: last.get(f"comm_{d}_{k}_bytes", 0) for k in KINDS} for d in MESH_DIMS},
                "calls": {k: last[f"comm_{k}_calls"] for k in KINDS},
                "live_bytes_peak": last.get("live_bytes_peak"),
                "padded_tokens": last.get("padded_tokens"),
                "max_rss_bytes": last.get("max_rss_bytes"),
            }
        )
    ranks.sort(key=lambda r: r["rank"])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = [m["tokens_per_s"] for m in metrics if 1 < m["step"] < steps] or [metrics[-1]["tokens_per_s"]]
    return {"ranks": ranks, "tokens_per_s": statistics.median(tps), "loss_last": metrics[-1]["loss"]}


def project_point(p: Point, args, out: Path, cpt: float | None, padded_tokens: int | None = None) -> dict:
    """The projection of the same job: collective bytes per kind, memory per rank, step time. `padded_tokens`: the
    tokens one rank's micro-batches computed in the probed step (tp's activation all-reduces scale with them)."""
    from dora_dist.config import load_config
    from dora_dist.parallel.mesh import resolve_dims
    from dora_dist.plan.comm import bytes_by_dim, bytes_by_kind, predict_collectives
    from dora_dist.plan.hardware import make_cluster
    from dora_dist.plan.memory import estimate_memory
    from dora_dist.plan.model_spec import model_spec
    from dora_dist.plan.project import project

    ov = overrides(p, args, out)
    cfg = load_config(ov[1], ov[2:] + ([f"parallel.engine={p.engine}"] if p.launcher == "deepspeed-hostfile" else []))
    engine = "none" if p.world == 1 else p.engine
    spec = model_spec(cfg)
    gpu = "cpu" if args.device == "cpu" else args.gpu
    link = "loopback" if args.device == "cpu" else None
    cluster = make_cluster(gpu, p.nodes, p.world // p.nodes, link, inter_node=link or "infiniband")
    dims = resolve_dims(cfg, p.world, p.world // p.nodes, engine)  # the mesh the trainer builds (preflight's rule)
    proj = project(cfg, cluster, engine, spec=spec, compute_s_per_token=cpt, dims=dims)
    colls = predict_collectives(cfg, spec, engine, p.world, dims, padded_tokens)
    per_dim = bytes_by_dim(colls)
    return {
        "bytes": bytes_by_kind(colls),
        "dim_bytes": {d: per_dim.get(d, dict.fromkeys(KINDS, 0)) for d in MESH_DIMS},
        "memory": estimate_memory(cfg, spec, engine, p.world, dims=dims).device_total,
        "step_s": proj.step_s if cpt is not None else None,
        "tokens_per_step": cfg.training.micro_batch_size
        * cfg.data.seq_len
        * (cfg.training.global_batch_size // cfg.training.micro_batch_size),
        "link_bytes": proj.link_bytes,
    }


def ranks_bytes_match(p: Point, args, out: Path, rank: dict) -> bool:
    """One rank's counted bytes (per kind and mesh dimension) equal the prediction for its own padded batches."""
    pred = project_point(p, args, out, None, rank.get("padded_tokens"))
    return rank["bytes"] == pred["bytes"] and rank["dim_bytes"] == pred["dim_bytes"]


def measured_row(p: Point, m: dict, machine: str, cores: int) -> dict:
    live = [r["live_bytes_peak"] for r in m["ranks"] if r["live_bytes_peak"]]
    counted = m["ranks"][0]["bytes"]
    dims = m["ranks"][0]["dim_bytes"]
    return {
        **asdict(p),
        "layout": p.layout,
        "machine": machine,
        "oversubscribed": p.world > cores,
        "tokens_per_s": m["tokens_per_s"],
        "step_s": max(r["step_s"] for r in m["ranks"]),
        "loss_last": m["loss_last"],
        **{f"counted_{k}_bytes": counted[k] for k in KINDS},
        "counted_bytes_per_step": sum(counted.values()),
        **{f"counted_{d}_{k}_bytes": dims[d][k] for d in MESH_DIMS for k in KINDS},
        "same_bytes_on_all_ranks": all(
            r["bytes"] == counted and r["dim_bytes"] == m["ranks"][0]["dim_bytes"] for r in m["ranks"]
        ),
        "live_bytes_peak": sum(live) / len(live) if live else None,
        "max_rss_bytes": max(r["max_rss_bytes"] or 0 for r in m["ranks"]),
        "per_rank": m["ranks"],
    }


def add_projection(row: dict, pred: dict) -> dict:
    """The projection's numbers and its errors against the measured ones, in place."""
    counted = {k: row[f"counted_{k}_bytes"] for k in KINDS}
    counted_dims = {d: {k: row.get(f"counted_{d}_{k}_bytes", 0) for k in KINDS} for d in MESH_DIMS}
    pred_dims = pred.get("dim_bytes") or {d: dict.fromkeys(KINDS, 0) for d in MESH_DIMS}
    live = row["live_bytes_peak"]
    row.update(
        {
            **{f"predicted_{k}_bytes": pred["bytes"][k] for k in KINDS},
            **{f"predicted_{d}_{k}_bytes": pred_dims[d][k] for d in MESH_DIMS for k in KINDS},
            "predicted_intra_node_bytes": pred.get("link_bytes", {}).get("intra_node"),
            "predicted_inter_node_bytes": pred.get("link_bytes", {}).get("inter_node"),
            "predicted_bytes_per_step": sum(pred["bytes"].values()),
            "dim_bytes_match": counted_dims == pred_dims,
            "bytes_match": counted == pred["bytes"] and counted_dims == pred_dims and row["same_bytes_on_all_ranks"],
            "predicted_memory_bytes": pred["memory"],
            "memory_error": (pred["memory"] - live) / live if live else None,
            "predicted_step_s": pred["step_s"],
            "time_error": (pred["step_s"] - row["step_s"]) / row["step_s"] if pred["step_s"] else None,
        }
    )
    return row


def reproject(args, stem: Path) -> int:
    """Recompute the projection for the measurements already in <stem>.json (after a change to dora_dist.plan)."""
    data = json.loads(stem.with_suffix(".json").read_text())
    calib, failures = {}, list(data.get("failures", []))
    rows = data["points"]
    for row in sorted(rows, key=lambda r: r["world"]):
        flat_multinode = row["world"] if row["launcher"] in ("multinode.sh", "deepspeed-hostfile") else 0
        p = Point(
            row["engine"],
            row["base"],
            row["mode"],
            row["world"],
            row["launcher"],
            row.get("shard_group", flat_multinode),
            row.get("tp", 1),
        )
        row.setdefault("layout", p.layout)
        first = row["per_rank"][0]["bytes"]
        row.setdefault("same_bytes_on_all_ranks", all(r["bytes"] == first for r in row["per_rank"]))
        out = Path(args.workdir) / "reprojected"
        if p.world == 1:
            calib[p.base] = row["step_s"] / project_point(p, args, out, None)["tokens_per_step"]
        add_projection(row, project_point(p, args, out, calib.get(p.base)))
    data["meta"]["reprojected"] = True
    write_outputs(rows, failures, stem, data["meta"]["machine"], args)
    print_summary(rows, failures)
    return 0 if all(r["bytes_match"] for r in rows) else 1


def points(args) -> list[Point]:
    pts = []
    for base in args.bases:
        if 1 in args.ranks:
            pts.append(Point("none", base, "strong", 1, "single"))
        for world in [w for w in args.ranks if w > 1]:
            for mode in args.modes:
                pts += [Point(e, base, mode, world) for e in ENGINES[base] if e in args.engines]
    if args.multinode and "dense" in args.bases:  # one flat group over the two one-process "nodes"
        pts += [
            Point("fsdp2", "dense", "strong", 2, "multinode.sh", shard_group=2),
            Point("zero3", "dense", "strong", 2, "deepspeed-hostfile", shard_group=2),
        ]
    if args.mesh and "dense" in args.bases:
        pts += [p for name, p in zip(MESH_POINT_NAMES, mesh_points(), strict=True) if name in args.mesh_points]
    return pts


MESH_POINT_NAMES = ("hsdp", "tp2", "dp2tp2")


def mesh_points() -> list[Point]:
    """HSDP on 2 "nodes" × 2 (shard group = one node), tp=2, and dp=2 × tp=2 (strong scaling, dense base)."""
    return [
        Point("fsdp2", "dense", "strong", 4, "multinode.sh", shard_group=2),
        Point("ddp", "dense", "strong", 2, tp=2),
        Point("fsdp2", "dense", "strong", 4, tp=2),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--gpu", default="h100-80gb", help="plan preset for --device cuda")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--engines", nargs="+", default=["ddp", "fsdp2", "zero2", "zero3"])
    ap.add_argument("--bases", nargs="+", default=["dense", "nf4"], choices=["dense", "nf4"])
    ap.add_argument("--modes", nargs="+", default=["strong", "weak"], choices=["strong", "weak"])
    ap.add_argument("--steps", type=int, default=4, help="steps per run (>= 3: warm-up, timed, probed)")
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=4, help="weak scaling: micro-steps per rank and step")
    ap.add_argument("--global-batch", type=int, default=8, help="strong scaling: samples per step")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--no-multinode", dest="multinode", action="store_false")
    ap.add_argument("--no-mesh", dest="mesh", action="store_false", help="leave out the HSDP and tp points")
    ap.add_argument(
        "--mesh-only",
        action="store_true",
        help="run only the one-rank dense baseline and the HSDP / tp points, and merge them into the saved JSON",
    )
    ap.add_argument(
        "--mesh-points",
        nargs="+",
        choices=MESH_POINT_NAMES,
        default=list(MESH_POINT_NAMES),
        help="which mesh points: hsdp (4 ranks as 2 × 2), tp2, dp2tp2 (default: all)",
    )
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dora_dist_scaling_cache"))
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dora_dist_scaling"))
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/scaling_<device>)")
    ap.add_argument(
        "--reproject",
        action="store_true",
        help="no runs: recompute the projection for the "
        "measurements in the output JSON and rewrite JSON, CSV and plots",
    )
    args = ap.parse_args(argv)
    if args.device == "cuda":
        import torch

        args.ranks = [w for w in args.ranks if w <= torch.cuda.device_count()]
    stem = Path(args.out) if args.out else RESULTS / f"scaling_{args.device}"
    if args.reproject:
        return reproject(args, stem)
    if args.mesh_only:
        args.ranks, args.bases, args.modes, args.multinode, args.mesh = [1], ["dense"], ["strong"], False, True
    cores = os.cpu_count() or 1
    machine = machine_name(args.device)
    rows, calib, failures = [], {}, []
    todo = points(args)
    if args.mesh_only:  # calibrate on the saved one-rank run, when there is one, rather than run it again
        saved = stem.with_suffix(".json")
        base = [
            r
            for r in (json.loads(saved.read_text())["points"] if saved.exists() else [])
            if r["world"] == 1 and r["base"] == "dense"
        ]
        if base:
            p1 = Point("none", "dense", "strong", 1, "single")
            calib["dense"] = (
                base[0]["step_s"] / project_point(p1, args, Path(args.workdir) / "calib", None)["tokens_per_step"]
            )
            todo = [p for p in todo if p.world > 1]
    log(f"[scaling] {machine}; {len(todo)} runs of {args.steps} steps")
    t0 = time.time()
    for i, p in enumerate(todo):
        out = Path(args.workdir) / p.key
        log(f"[scaling] {i + 1}/{len(todo)} {p} ...")
        try:
            run_point(p, args, out)
            m = collect(p, out, args.steps)
        except Exception as exc:  # one broken point must not lose the sweep
            log(f"[scaling]   FAILED: {str(exc)[-1500:]}")
            failures.append({**asdict(p), "error": str(exc)[-3000:]})
            continue
        row = measured_row(p, m, machine, cores)
        if p.world == 1:
            calib[p.base] = row["step_s"] / project_point(p, args, out, None)["tokens_per_step"]  # s per token
        first = m["ranks"][0].get("padded_tokens") if p.tp > 1 else None
        add_projection(row, project_point(p, args, out, calib.get(p.base), first))
        if p.tp > 1:  # tp groups compute different batches (padded lengths): each rank against its own prediction
            row["bytes_match"] = all(ranks_bytes_match(p, args, out, r) for r in m["ranks"])
        if not row["bytes_match"]:
            failures.append(
                {
                    **asdict(p),
                    "error": f"bytes: counted {row['per_rank'][0]['bytes']}, predicted "
                    f"{ {k: row[f'predicted_{k}_bytes'] for k in KINDS} }; per mesh dimension counted "
                    f"{row['per_rank'][0]['dim_bytes']}, predicted "
                    f"{ {d: {k: row[f'predicted_{d}_{k}_bytes'] for k in KINDS} for d in MESH_DIMS} }",
                }
            )
        rows.append(row)
        log(
            f"[scaling]   {row['tokens_per_s']:,.0f} tok/s, {row['counted_bytes_per_step'] / 2**20:.2f} MiB/step "
            f"({'= prediction' if row['bytes_match'] else 'MISMATCH'}), live peak "
            f"{(row['live_bytes_peak'] or 0) / 2**20:.1f} MiB (prediction {100 * (row['memory_error'] or 0):+.1f}%),"
            f" {time.time() - t0:.0f}s elapsed"
        )
    if args.mesh_only:
        rows, failures = merge_saved(stem, rows, failures)
    write_outputs(rows, failures, stem, machine, args)
    print_summary(rows, failures)
    return 1 if failures else 0


def row_key(r: dict) -> tuple:
    return (r["engine"], r["base"], r["mode"], r["world"], r["launcher"], r.get("shard_group", 0), r.get("tp", 1))


def merge_saved(stem: Path, rows: list[dict], failures: list[dict]) -> tuple[list[dict], list[dict]]:
    """The saved sweep's rows with these runs' rows in place of the same points (`--mesh-only`)."""
    path = stem.with_suffix(".json")
    if not path.exists():
        return rows, failures
    saved = json.loads(path.read_text())
    new = {row_key(r) for r in rows} | {row_key(f) for f in failures}
    kept = [r for r in saved["points"] if row_key(r) not in new]
    kept_failures = [f for f in saved.get("failures", []) if row_key(f) not in new]
    return kept + rows, kept_failures + failures


def write_outputs(rows: list[dict], failures: list[dict], stem: Path, machine: str, args) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": machine,
        "device": args.device,
        "steps": args.steps,
        "seq_len": args.seq,
        "micro_batch": args.micro,
        "strong_global_batch": args.global_batch,
        "weak_per_rank_batch": args.micro * args.accum,
        "model": "builtin:tiny-llama (DoRA r=8, all linears)",
    }
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "points": rows, "failures": failures}, indent=1))
    flat = [{k: v for k, v in r.items() if k != "per_rank"} for r in rows]
    if flat:
        with stem.with_suffix(".csv").open("w", newline="") as f:
            names = list(dict.fromkeys(k for r in flat for k in r))  # rows of older sweeps lack the mesh keys
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            w.writerows(flat)
    from scaling_plots import plot_all  # noqa: E402  (sibling module, benchmarks/ is on sys.path)

    plot_all(rows, stem, machine)


def print_summary(rows: list[dict], failures: list[dict]) -> None:
    print(
        f"{'base':<5} {'engine':<6} {'mode':<6} {'ranks':>5} {'launcher':<18} {'layout':<12} {'tok/s':>8} "
        f"{'MiB/step':>9} "
        f"{'bytes':>6} {'live MiB':>9} {'mem err':>8} {'time err':>8}"
    )
    for r in rows:
        te = f"{100 * r['time_error']:+.0f}%" if r["time_error"] is not None else "-"
        tps = f"{r['tokens_per_s']:,.0f}" + ("*" if r["oversubscribed"] else "")
        print(
            f"{r['base']:<5} {r['engine']:<6} {r['mode']:<6} {r['world']:>5} {r['launcher']:<18} "
            f"{r.get('layout', 'flat'):<12} {tps:>8} "
            f"{r['counted_bytes_per_step'] / 2**20:>9.2f} {'exact' if r['bytes_match'] else 'DIFF':>6} "
            f"{(r['live_bytes_peak'] or 0) / 2**20:>9.1f} {100 * (r['memory_error'] or 0):>+7.1f}% {te:>8}"
        )
    print("* oversubscribed (more processes than cores): bytes and memory valid, time is not scaling data")
    for r in (r for r in rows if r.get("layout", "flat") != "flat"):
        dims = ", ".join(
            f"{d} {sum(r.get(f'counted_{d}_{k}_bytes', 0) for k in KINDS):,} B counted / "
            f"{sum(r.get(f'predicted_{d}_{k}_bytes', 0) for k in KINDS):,} B predicted"
            for d in MESH_DIMS
        )
        print(f"  {r['engine']} {r['layout']}: {dims} ({'exact' if r.get('dim_bytes_match') else 'DIFF'})")
    for f in failures:
        print(f"FAILED {f['engine']} {f['base']} {f['mode']} w{f['world']} {f['launcher']}: {f['error'][-300:]}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
