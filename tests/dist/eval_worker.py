"""Run under `torchrun --nproc-per-node 2` by tests/dist/test_eval.py (one launch for every engine).

For each engine (with dora.modules_to_save=[lm_head]: adapters and one module trained in full): build the job,
evaluate before any step (the same initial adapter on every engine, so the eval loss is the single-process one up to
the float64 reduction order), take one optimizer step, evaluate again through `eval_and_keep_best` (keep_best: the
best adapter is gathered and saved), then `finish`. Rank 0 writes the figures
as JSON; the test compares them with one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def job_overrides(cache: str, eval_file: str, dtype: str) -> list[str]:
    """7 eval sequences (no packing): shares of 3 and 4 over 2 ranks, eval batches of 3 -> 1 and 2 batches, so
    rank 0 runs one padding forward (a collective under FSDP2 / ZeRO-3)."""
    return [
        f"model.cache_dir={cache}",
        "data.seq_len=48",
        "data.synthetic_samples=120",
        "data.packing=false",
        f"data.eval_source={eval_file}",
        "training.eval_batch_size=3",
        "training.max_steps=2",
        "training.global_batch_size=4",
        "training.micro_batch_size=2",
        "training.lr=5e-3",
        "training.warmup_steps=1",
        "output.progress_bar=false",
        "output.plot=false",
        "output.save_adapter=false",
        "checkpoint.resume=none",
        "checkpoint.keep_best=true",
        f"model.dtype={dtype}",
        f"dora.adapter_dtype={dtype}",
        "dora.modules_to_save=[lm_head]",
    ]  # a module trained in full too


def write_eval_file(path: Path) -> None:
    lines = [
        "17 + 5 = 22 .",
        "count from 4 : 4 5 6 7 8 .",
        "copy : red fox blue -> red fox blue .",
        "the capital of norway is oslo .",
        "the small cat sees the old tree . the old dog likes the red car .",
        "3 + 4 = 7 .",
        "the capital of japan is tokyo . count from 7 : 7 8 9 .",
    ]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))


#: engine -> dtype: DeepSpeed's ZeRO optimizers take fp32 adapters (no fp64 flattening), the others fp64
ENGINES = {"ddp": "float64", "fsdp2": "float64", "zero2": "float32", "zero3": "float32"}


def run_engine(overrides: list[str], env) -> dict:
    from dora_dist.config import load_config
    from dora_dist.evaluate import evaluate
    from dora_dist.train import build, eval_and_keep_best, finish, micro_batch_loss, train_step

    job = build(load_config(None, overrides), env)
    before = evaluate(job.model, job.eval_dataset, env, job.cfg.training.eval_batch_size, micro_batch_loss)
    train_step(job)
    rec = eval_and_keep_best(job, micro_batch_loss)
    finish(job)
    return {"before": before, "after": rec}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--eval-file", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--engines", default=",".join(ENGINES))
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from dora_dist.parallel.dist_env import DistEnv

    env = DistEnv.from_environ(device="cpu")
    results: dict = {"world_size": env.world_size}
    for engine in args.engines.split(","):
        out = Path(args.workdir) / engine
        res = run_engine(
            job_overrides(args.cache, args.eval_file, ENGINES[engine])
            + [f"parallel.engine={engine}", f"output.dir={out}"],
            env,
        )
        res["adapter_best"] = (out / "adapter_best" / "adapter_model.safetensors").is_file()
        results[engine] = res
    if env.is_main:
        Path(args.out).write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
