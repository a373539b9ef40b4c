"""Multi-node DoRA training measured over a shaped link: two emulated nodes (network namespaces + veth + tc, see
netns_link.py), one torchrun agent per node, every engine, held against `dora-dist plan` given the same link.

    sudo PYTHONPATH=. python benchmarks/emulated_nodes.py                         # the sweep (~25 min on 2 cores)
    sudo PYTHONPATH=. python benchmarks/emulated_nodes.py --links 100mbit --engines ddp fsdp2 --repeats 1
    PYTHONPATH=. python benchmarks/emulated_nodes.py --reproject                   # new projection, same measurements

Per run: both agents start inside their namespaces (`--nnodes 2`, c10d rendezvous on node 0's address, gloo bound
to the veth by GLOO_SOCKET_IFNAME); the trainer's probes (parallel/step_probe.py) record each step's time, the
collective bytes it ran (counted by parallel/comm_counter.py) and the bytes its veth end sent (the interface's own
counters); `ip -s link` gives the whole run's bytes as a cross-check. Compute is calibrated from a one-process run
of the same job just before each repetition (seconds per token, the machine being shared), the link's bandwidth
from a TCP transfer over it; the projection then gets exactly what `dora-dist plan --gpu cpu --nodes 2
--gpus-per-node 1 --inter-node ethernet --bandwidth-gbps <measured>` would use. Load averages are recorded with
every run: the machine is shared, so each point is the median of its repeats.

Output: benchmarks/results/emulated_nodes.json and emulated_nodes.png (step time vs link bandwidth per engine,
measured and projected); a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns_link import ADDRS, EmulatedLink, LinkSpec  # noqa: E402
from scaling import KINDS, Point, overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _raise_on_signal(signum, _frame):
    """SIGTERM / SIGHUP unwind like Ctrl-C, so every `finally` (the namespaces' removal) runs."""
    raise SystemExit(128 + signum)


def trainer_env(out: Path, iface: str | None) -> dict[str, str]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        DS_BUILD_OPS="0",
        DORA_DIST_COUNT_COMM="1",
        DORA_DIST_COUNT_COMM_DIR=str(out / "probe"),
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    if iface:
        env.update(GLOO_SOCKET_IFNAME=iface, DORA_DIST_COUNT_LINK=iface)
    return env


def run_two_nodes(link: EmulatedLink, engine: str, args, out: Path) -> dict:
    """One training run, one torchrun agent (one process) per namespace; the link's counters around it."""
    out.mkdir(parents=True, exist_ok=True)
    ov = overrides(Point(engine, "dense", "strong", 2), args, out)
    before = [link.counters(n) for n in (0, 1)]
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
            "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{ADDRS[0]}:29400",
            "--rdzv-id", f"emulated{link.tag}", "--rdzv-conf", f"is_host={int(node == 0)}",
            "--local-addr", ADDRS[node], "--max-restarts", "0", "-m", "dora_dist.train", *ov,
        ]  # fmt: skip
        env = trainer_env(out, link.names[node])
        procs.append(
            link.popen(node, cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    logs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    (out / "launch.log").write_text("\n".join(logs))
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{engine} on {link.spec.name} failed:\n" + "\n".join(lg[-2500:] for lg in logs))
    after = [link.counters(n) for n in (0, 1)]
    return {"ip_link": [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]}


BUSBW_WORKER = """
import os, statistics, sys, time
import torch, torch.distributed as dist
rank, nbytes, reps, gap = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
dist.init_process_group("gloo", init_method=f"tcp://{sys.argv[5]}:29401", rank=rank, world_size=2)
shard = torch.ones(nbytes // 8, dtype=torch.float32)
out = torch.empty(2 * shard.numel())
ts = []
for i in range(reps + 1):
    dist.barrier()
    time.sleep(gap)  # the link idles as between two blocks' gathers (TCP restarts from its initial window)
    t = time.perf_counter()
    dist.all_gather_into_tensor(out, shard)
    ts.append(time.perf_counter() - t)
print(statistics.median(ts[1:]))
dist.destroy_process_group()
"""


BUSBW_BYTES = 2 * 2**20  # all-gather output: about one decoder block of the built-in model under FSDP2


def collective_busbw(link: EmulatedLink, nbytes: int, reps: int = 5, gap_s: float = 0.3) -> float:
    """Bus bandwidth of gloo's all-gather over the link (bytes each rank sends / time, as nccl-tests' busbw), for
    an all-gather of `nbytes` output after the link idled `gap_s`: what `--bandwidth-gbps` means."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="")
    procs = []
    for node in (0, 1):
        env["GLOO_SOCKET_IFNAME"] = link.names[node]
        cmd = [sys.executable, "-c", BUSBW_WORKER, str(node), str(nbytes), str(reps), str(gap_s), ADDRS[0]]
        procs.append(link.popen(node, cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("busbw worker failed: " + " | ".join(o[1][-800:] for o in outs))
    secs = max(float(o[0].strip()) for o in outs)
    return nbytes / 2 / secs


def run_one_process(args, out: Path) -> None:
    """The compute calibration: the same job on one process, no link."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dora_dist.train", *overrides(Point("none", "dense", "strong", 1), args, out)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=trainer_env(out, None), capture_output=True, text=True, timeout=args.timeout
    )
    if proc.returncode:
        raise RuntimeError(f"one-process calibration failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def collect(out: Path, steps: int) -> dict:
    """Per rank: the median step time over the steady steps (2..steps), the last step's counted bytes and calls,
    the veth bytes sent per steady step, and the counter's totals over the whole run."""
    timed = range(2, steps + 1) if steps > 1 else range(1, 2)
    ranks = []
    for f in sorted((out / "probe").glob("comm_rank*.json")):
        data = json.loads(f.read_text())
        by_step = {s["step"]: s for s in data["steps"]}
        last = by_step[steps]
        ranks.append(
            {
                "rank": data["rank"],
                "step_s": statistics.median(by_step[s]["step_s"] for s in timed),
                "steps_s": [by_step[s]["step_s"] for s in sorted(by_step)],
                "bytes": {k: last[f"comm_{k}_bytes"] for k in KINDS},
                "calls": {k: last[f"comm_{k}_calls"] for k in KINDS},
                "link_tx_bytes": statistics.median(by_step[s].get("link_tx_bytes", 0) for s in timed),
                # the main thread's step: on a CPU, waiting for one (the machine's load), blocked (collectives)
                "run_s": statistics.median(by_step[s].get("sched_run_s", 0.0) for s in timed),
                "runqueue_s": statistics.median(by_step[s].get("sched_wait_s", 0.0) for s in timed),
                "blocked_s": statistics.median(
                    by_step[s]["step_s"] - by_step[s].get("sched_run_s", 0.0) - by_step[s].get("sched_wait_s", 0.0)
                    for s in timed
                ),
                "counted_total_bytes": {k: data["total"].get(f"comm_{k}_bytes", 0) for k in KINDS},
            }
        )
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = statistics.median(m["tokens_per_s"] for m in metrics if m["step"] in timed)
    return {"ranks": sorted(ranks, key=lambda r: r["rank"]), "tokens_per_s": tps}


def projection(engine: str, args, bandwidth_Bps: float, latency_us: float | None, cpt: float, gpu: str = "cpu") -> dict:
    """What `dora-dist plan --gpu cpu --nodes 2 --gpus-per-node 1 --inter-node ethernet --bandwidth-gbps B` projects
    for this job, with compute calibrated (s/token) instead of FLOPs at an MFU."""
    from dora_dist.config import load_config
    from dora_dist.plan.comm import bytes_by_kind, wire_bytes
    from dora_dist.plan.hardware import make_cluster
    from dora_dist.plan.project import project

    ov = overrides(Point(engine, "dense", "strong", 2), args, Path(args.workdir))
    cfg = load_config(ov[1], ov[2:])
    cluster = make_cluster(gpu, 2, 1, inter_node="ethernet", bandwidth_gbps=bandwidth_Bps / 1e9, latency_us=latency_us)
    p = project(cfg, cluster, engine, compute_s_per_token=cpt)
    return {
        "bytes": bytes_by_kind(p.collectives),
        "calls": sum(c.calls for c in p.collectives),
        "wire_bytes": sum(wire_bytes(c, 2) for c in p.collectives),
        "step_s": p.step_s,
        "compute_s": p.compute_s,
        "comm_s": p.comm_s,
        "exposed_comm_s": p.exposed_comm_s,
        "plan_command": f"dora-dist plan --gpu cpu --nodes 2 --gpus-per-node 1 --inter-node ethernet "
        f"--bandwidth-gbps {bandwidth_Bps / 1e9:.6f}" + (f" --latency-us {latency_us:g}" if latency_us else ""),
    }


def tokens_per_rank(args) -> int:
    return args.global_batch // 2 * args.seq


def engine_compute(step_unshaped: float, engine: str, args, bandwidth_Bps: float) -> float:
    """Seconds per token of one engine's compute + its own CPU overheads on this machine now: the step over the
    unshaped veth less the projected communication there (small: the veth runs at memory speed)."""
    comm = projection(engine, args, bandwidth_Bps, None, 0.0)["step_s"]
    return max(0.0, step_unshaped - comm) / tokens_per_rank(args)


def add_projection(row: dict, args) -> dict:
    """The projection with compute calibrated on the unshaped link for this engine (`predicted`, what the errors
    are of) and with the one-process calibration scaling.py uses (`predicted_one_process`)."""
    cpt = row.get("engine_compute_s_per_token") or row["compute_s_per_token"]
    bw = row.get("link_busbw_Bps") or row["link_achieved_Bps"]
    pred = projection(row["engine"], args, bw, row["latency_us"], cpt)
    pred_tcp = projection(row["engine"], args, row["link_achieved_Bps"], row["latency_us"], cpt)
    pred1 = projection(row["engine"], args, bw, row["latency_us"], row["compute_s_per_token"])
    # the same link and compute under nccl's rule (prefetched gathers, bucketed reductions hidden behind compute):
    # what the model projected for gloo before it knew the backend (the rule it keeps for GPUs)
    overlapped = projection(row["engine"], args, bw, row["latency_us"], cpt, gpu="h100-80gb")
    counted = row["per_rank"][0]["bytes"]
    row.update(
        predicted=pred,
        predicted_one_process=pred1,
        predicted_if_overlapped=overlapped["step_s"],
        predicted_with_tcp_rate=pred_tcp,
        comm_error_with_tcp_rate=(pred_tcp["comm_s"] - row["measured_comm_s"]) / row["measured_comm_s"],
        time_error_if_overlapped=(overlapped["step_s"] - row["step_s"]) / row["step_s"],
        bytes_match=all(r["bytes"] == pred["bytes"] for r in row["per_rank"]),
        time_error=(pred["step_s"] - row["step_s"]) / row["step_s"],
        time_error_one_process=(pred1["step_s"] - row["step_s"]) / row["step_s"],
        comm_share=pred["comm_s"] / pred["step_s"] if pred["step_s"] else 0.0,
        wire_per_counted=row["link_tx_bytes_per_step"] / max(1, sum(counted.values())),
    )
    return row


def calibrate(rows: list[dict], args) -> list[dict]:
    """Each engine's compute from its run over the unshaped veth in the same repeat (the load of this shared machine
    drifts between repeats, less within one), then every row's projection with it."""
    for r in rows:
        free = [
            u
            for u in rows
            if (u["engine"], u["repeat"]) == (r["engine"], r["repeat"]) and u["link_mbit"] is None and not u["delay_ms"]
        ]
        if free:
            bw = free[0].get("link_busbw_Bps") or free[0]["link_achieved_Bps"]
            r["engine_compute_s_per_token"] = engine_compute(free[0]["step_s"], r["engine"], args, bw)
    return [add_projection(r, args) for r in rows]


def sweep(args) -> tuple[list[dict], list[dict]]:
    rows, failures = [], []
    work = Path(args.workdir)
    for rep in range(args.repeats):
        calib = work / f"calib{rep}"
        load0 = os.getloadavg()
        run_one_process(args, calib)
        one = collect(calib, args.steps)
        tokens = args.global_batch * args.seq
        cpt = one["ranks"][0]["step_s"] / tokens
        log(
            f"[emulated] repeat {rep + 1}: one process {one['ranks'][0]['step_s']:.3f} s/step "
            f"({cpt * 1e6:.1f} µs/token)"
        )
        unshaped: dict[str, tuple[float, float]] = {}  # engine -> (step time, achieved bandwidth) on the unshaped veth
        specs = sorted([LinkSpec.parse(x) for x in args.links], key=lambda s: (s.mbit is not None, -(s.mbit or 0)))
        for spec in specs:
            with EmulatedLink(spec) as link:
                achieved = link.tcp_throughput()  # both ways at once, as the ring sends
                one_way = link.tcp_throughput(both_ways=False)
                busbw = collective_busbw(link, BUSBW_BYTES)
                log(
                    f"[emulated] link {spec.name} ({link.names[0]}<->{link.names[1]}): TCP {achieved / 1e6:.2f} MB/s "
                    "each way at once "
                    f"({one_way / 1e6:.2f} MB/s one way alone)"
                )
                for engine in args.engines:
                    out = work / f"r{rep}_{spec.name}_{engine}"
                    la = os.getloadavg()
                    try:
                        ipl = run_two_nodes(link, engine, args, out)
                        m = collect(out, args.steps)
                    except Exception as exc:  # one broken point must not lose the sweep
                        log(f"[emulated]   {engine} FAILED: {str(exc)[-1500:]}")
                        failures.append({"engine": engine, "link": spec.name, "repeat": rep, "error": str(exc)[-3000:]})
                        continue
                    row = {
                        "engine": engine, "link": spec.name, "link_mbit": spec.mbit, "delay_ms": spec.delay_ms,
                        "latency_us": spec.delay_ms * 1e3 or None, "link_achieved_Bps": achieved,
                        "link_one_way_Bps": one_way, "link_busbw_Bps": busbw, "repeat": rep,
                        "compute_s_per_token": cpt, "one_process_step_s": one["ranks"][0]["step_s"],
                        "step_s": max(r["step_s"] for r in m["ranks"]), "tokens_per_s": m["tokens_per_s"],
                        "link_tx_bytes_per_step": max(r["link_tx_bytes"] for r in m["ranks"]),
                        # the rank that computes longest waits least for its peer: its blocked time is the link's
                        "measured_comm_s": min(r["blocked_s"] for r in m["ranks"]),
                        "cpu_run_s": max(r["run_s"] for r in m["ranks"]),
                        "runqueue_s": max(r["runqueue_s"] for r in m["ranks"]),
                        "ip_link_run": ipl["ip_link"], "per_rank": m["ranks"],
                        "loadavg_before": la, "loadavg_after": os.getloadavg(), "loadavg_calibration": load0,
                    }  # fmt: skip
                    if spec.mbit is None and not spec.delay_ms:
                        unshaped[engine] = (row["step_s"], busbw)
                    if engine in unshaped:
                        row["engine_compute_s_per_token"] = engine_compute(unshaped[engine][0], engine, args,
                                                                           unshaped[engine][1])  # fmt: skip
                    add_projection(row, args)
                    rows.append(row)
                    partial = Path(args.out).with_suffix(".partial.json")  # an interrupted sweep keeps its runs
                    partial.parent.mkdir(parents=True, exist_ok=True)
                    partial.write_text(json.dumps({"points": rows, "failures": failures}))
                    log(
                        f"[emulated]   {engine:<6} step {row['step_s']:.3f} s (projected "
                        f"{row['predicted']['step_s']:.3f}, {100 * row['time_error']:+.0f}%), "
                        f"{row['tokens_per_s']:,.0f} tok/s, bytes "
                        f"{'= projection' if row['bytes_match'] else 'MISMATCH'}, wire/counted "
                        f"{row['wire_per_counted']:.3f}, load {la[0]:.2f}"
                    )
            assert not link.leftovers(), f"namespaces left behind: {link.leftovers()}"
    return rows, failures


def medians(rows: list[dict]) -> list[dict]:
    """One line per (link, engine): medians over the repeats."""
    out = []
    for key in sorted({(r["link_mbit"] or 1e9, r["delay_ms"], r["engine"]) for r in rows}, reverse=True):
        rs = [r for r in rows if ((r["link_mbit"] or 1e9), r["delay_ms"], r["engine"]) == key]

        def med(f, rs=rs):
            return statistics.median(f(r) for r in rs)

        out.append(
            {
                "link": rs[0]["link"],
                "link_mbit": rs[0]["link_mbit"],
                "engine": rs[0]["engine"],
                "repeats": len(rs),
                "achieved_MBps": med(lambda r: r["link_achieved_Bps"]) / 1e6,
                "measured_step_s": med(lambda r: r["step_s"]),
                "predicted_step_s": med(lambda r: r["predicted"]["step_s"]),
                "predicted_comm_s": med(lambda r: r["predicted"]["comm_s"]),
                "measured_comm_s": med(lambda r: r["measured_comm_s"]),
                "comm_error": med(lambda r: (r["predicted"]["comm_s"] - r["measured_comm_s"]) / r["measured_comm_s"]),
                "comm_error_with_tcp_rate": med(lambda r: r["comm_error_with_tcp_rate"]),
                "busbw_MBps": med(lambda r: r.get("link_busbw_Bps") or r["link_achieved_Bps"]) / 1e6,
                "cpu_run_s": med(lambda r: r["cpu_run_s"]),
                "runqueue_s": med(lambda r: r["runqueue_s"]),
                "comm_share": med(lambda r: r["comm_share"]),
                "time_error": med(lambda r: r["time_error"]),
                "time_error_if_overlapped": med(lambda r: r["time_error_if_overlapped"]),
                "tokens_per_s": med(lambda r: r["tokens_per_s"]),
                "counted_MiB": sum(rs[0]["per_rank"][0]["bytes"].values()) / 2**20,
                "wire_MiB": med(lambda r: r["link_tx_bytes_per_step"]) / 2**20,
                "predicted_wire_MiB": rs[0]["predicted"]["wire_bytes"] / 2**20,
                "bytes_match": all(r["bytes_match"] for r in rs),
                "load_1min": med(lambda r: r["loadavg_before"][0]),
            }
        )
    return out


def plot(rows: list[dict], summary: list[dict], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ddp": "tab:blue", "fsdp2": "tab:orange", "zero2": "tab:green", "zero3": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for eng in [e for e in ENGINES if any(s["engine"] == e for s in summary)]:
        ss = sorted([s for s in summary if s["engine"] == eng], key=lambda s: s["achieved_MBps"])
        x = [s["achieved_MBps"] * 8 for s in ss]
        raw = [r for r in rows if r["engine"] == eng]
        xr = [r["link_achieved_Bps"] * 8 / 1e6 for r in raw]
        for ax, meas, pred, raw_y in (
            (axes[0], "measured_step_s", "predicted_step_s", [r["step_s"] for r in raw]),
            (axes[1], "measured_comm_s", "predicted_comm_s", [r["measured_comm_s"] for r in raw]),
        ):
            ax.plot(x, [s[pred] for s in ss], "--", color=colors[eng], label=f"{eng} projected")
            ax.plot(x, [s[meas] for s in ss], "o-", color=colors[eng], label=f"{eng} measured (median)")
            ax.scatter(xr, raw_y, s=10, color=colors[eng], alpha=0.4)
    for ax, what in zip(axes, ("optimizer step time, s (max over the 2 ranks)",
                               "communication, s (main thread blocked; projected comm_s)"), strict=True):  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link: TCP Mbit/s each way, both ways at once (veth + tc tbf)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"2 emulated nodes × 1 process, gloo, tiny Llama DoRA r=8 — {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(summary: list[dict]) -> None:
    head = f"{'link':<9} {'TCP':>6} {'busbw':>6} {'engine':<6} {'counted':>8} {'wire':>6} {'step s':>7} {'proj.':>7} "
    print(head + f"{'err':>5} {'comm s':>7} {'proj.':>7} {'err':>5} {'share':>5} {'tok/s':>5} {'load':>5}")
    for s in summary:
        print(
            f"{s['link']:<9} {s['achieved_MBps']:>6.2f} {s['busbw_MBps']:>6.2f} {s['engine']:<6} "
            f"{s['counted_MiB']:>8.2f} {s['wire_MiB']:>6.2f} {s['measured_step_s']:>7.3f} "
            f"{s['predicted_step_s']:>7.3f} "
            f"{100 * s['time_error']:>+4.0f}% {s['measured_comm_s']:>7.3f} {s['predicted_comm_s']:>7.3f} "
            f"{100 * s['comm_error']:>+4.0f}% {100 * s['comm_share']:>4.0f}% {s['tokens_per_s']:>5.0f} "
            f"{s['load_1min']:>5.1f}"
        )
    print(
        "TCP: MB/s each way with both directions streaming; busbw: gloo all-gather bus bandwidth, MB/s (the\n"
        "projection's bandwidth, as --bandwidth-gbps); counted / wire: MiB per step and rank (collective buffers;\n"
        "the veth's own tx counter); comm s: the main thread blocked (step - on CPU - waiting for a CPU,\n"
        "/proc/self/schedstat) and the projection's comm_s; share: projected communication / projected step.\n"
        "unshaped rows calibrate each engine's compute (their step error is 0 by construction)."
    )


def write(rows, failures, args, stem: Path, meta: dict | None = None) -> list[dict]:
    summary = medians(rows)
    meta = meta or {
        "machine": f"{os.cpu_count()} cores shared with other jobs; {os.uname().release}",
        "steps": args.steps,
        "seq_len": args.seq,
        "micro_batch": args.micro,
        "global_batch": args.global_batch,
        "model": "builtin:tiny-llama (DoRA r=8, all linears), fp32",
        "nodes": "2 network namespaces × 1 process, veth shaped by tc tbf, gloo",
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "summary": summary, "points": rows, "failures": failures}
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    plot(rows, summary, stem.with_suffix(".png"), meta["machine"])
    print_table(summary)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--links", nargs="+", default=["unshaped", "100mbit", "25mbit"],
                    help="e.g. 100mbit, 1gbit, 100mbit+5ms; 'unshaped' (the veth at memory speed) runs first and "
                    "calibrates each engine's compute")  # fmt: skip
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="steps per run; 2..steps are timed")
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu"])
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dora_dist_scaling_cache"))
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / f"dora_dist_emulated_{os.getpid()}"))
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default=str(RESULTS / "emulated_nodes"), help="output stem")
    ap.add_argument("--reproject", action="store_true", help="no runs: recompute the projection for the saved points")
    ap.add_argument(
        "--measure-busbw",
        action="store_true",
        help="with --reproject: measure gloo's all-gather bus bandwidth on each saved link setting (needs root)",
    )
    args = ap.parse_args(argv)
    stem = Path(args.out)
    if args.reproject:
        data = json.loads(stem.with_suffix(".json").read_text())
        m = data["meta"]
        args.steps, args.seq, args.micro, args.global_batch = (
            m["steps"],
            m["seq_len"],
            m["micro_batch"],
            m["global_batch"],
        )
        if args.measure_busbw:
            for name in sorted({r["link"] for r in data["points"]}):
                with EmulatedLink(LinkSpec.parse(name)) as link:
                    bw = statistics.median(collective_busbw(link, BUSBW_BYTES) for _ in range(args.repeats))
                log(f"[emulated] {name}: gloo all-gather busbw {bw / 1e6:.2f} MB/s")
                for r in data["points"]:
                    if r["link"] == name:
                        r["link_busbw_Bps"] = bw
        rows = calibrate(data["points"], args)
        write(rows, data["failures"], args, stem, m)
        return 0
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_on_signal)
    # Ctrl-C raises KeyboardInterrupt even when started from a non-interactive shell's background job, which hands
    # its children SIGINT ignored (Python then installs no handler of its own): the links must still come down
    signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.time()
    rows, failures = sweep(args)
    rows = calibrate(rows, args)
    Path(args.out).with_suffix(".partial.json").unlink(missing_ok=True)
    log(f"[emulated] {len(rows)} runs in {time.time() - t0:.0f} s, {len(failures)} failed")
    write(rows, failures, args, stem)
    return 1 if failures or not all(r["bytes_match"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
