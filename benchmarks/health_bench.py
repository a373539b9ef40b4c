"""Cost of DoRA's health metrics (dora_dist/health.py) against the training step, on the quickstart job.

    python benchmarks/health_bench.py                                        # one process (engine none)
    torchrun --nproc-per-node 2 benchmarks/health_bench.py                   # FSDP2, as the quickstart launches
    python benchmarks/health_bench.py --config configs/quickstart.yaml --rounds 30 training.precision=bf16

Wall-clock and process CPU time are both reported: on a shared machine the wall time of many small ops includes
waiting to be scheduled, the CPU time does not. The job is built by the trainer itself (dora_dist.train.build),
then rounds alternate one optimizer step and one health measurement (`HealthMonitor.measure`: the engine's row
views, the per-layer sums, the effective-share probe through the real epilogue, the all-gather), so background load
hits both alike. The medians are reported; the overhead at `output.dora_health_every = E` is measure / (E · step).
JSON (rank 0) -> benchmarks/results/health_bench_<device>_w<world>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="cProfile the measurements (rank 0 prints the top)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from dora_dist.config import load_job_config
    from dora_dist.health_log import HealthMonitor
    from dora_dist.parallel import DistEnv
    from dora_dist.train import build, train_step

    tmp = tempfile.mkdtemp(prefix="health_bench_")
    cfg = load_job_config(
        args.config, [f"output.dir={tmp}", "checkpoint.resume=none", "output.progress_bar=false", *args.overrides]
    )
    env = DistEnv.from_environ(device=cfg.training.device)
    job = build(cfg, env)
    monitor = HealthMonitor.from_config(cfg)
    job.health = None  # the trainer's own measurement off: timed here
    import cProfile
    import pstats

    profiler = cProfile.Profile() if args.profile and env.is_main else None
    steps, measures, step_cpu, measure_cpu = [], [], [], []
    for i in range(args.warmup + args.rounds):
        env.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(job)
        env.barrier()
        t1, c1 = time.perf_counter(), time.process_time()
        if profiler is not None:
            profiler.enable()
        rec = monitor.measure(job.engine, env, job.step)
        if profiler is not None:
            profiler.disable()
        env.barrier()
        t2, c2 = time.perf_counter(), time.process_time()
        if i >= args.warmup:
            steps.append(t1 - t0)
            measures.append(t2 - t1)
            step_cpu.append(c1 - c0)
            measure_cpu.append(c2 - c1)
    step, measure = statistics.median(steps), statistics.median(measures)
    cpu_ratio = statistics.median(measure_cpu) / statistics.median(step_cpu)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "engine": job.engine.name,
        "world_size": env.world_size,
        "device": str(env.device),
        "rounds": args.rounds,
        "dora_layers": len(monitor.layers),
        "step_s_median": step,
        "measure_s_median": measure,
        "overhead_every_step": measure / step,
        "step_cpu_s_median": statistics.median(step_cpu),
        "measure_cpu_s_median": statistics.median(measure_cpu),
        "cpu_time_overhead_every_step": cpu_ratio,
        "overhead_at_dora_health_every": {e: measure / (e * step) for e in (1, 10, 50)},
        "last_record": rec,
    }
    if env.is_main:
        out = (
            Path(args.out)
            if args.out
            else ROOT / "benchmarks" / "results" / (f"health_bench_{env.device.type}_w{env.world_size}.json")
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"[health_bench] {job.engine.name} world={env.world_size}: step {step * 1e3:.1f} ms, health "
            f"{measure * 1e3:.2f} ms ({100 * measure / step:.2f}% of a step when measured every step; process CPU "
            f"time {100 * cpu_ratio:.2f}%); -> {out}"
        )
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    job.engine.close()
    env.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
