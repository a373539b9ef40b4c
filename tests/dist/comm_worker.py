"""Run under `torchrun --nproc-per-node 2` by tests/dist/test_comm_prediction.py: short training runs of every
engine (dense bases with an odd MLP width, so FSDP2's dim-0 padding, ZeRO-3's partition padding and ZeRO-2's group
alignment all occur; NF4 bases with the engines that take them), with the trainer's collective counter and the
live-tensor memory probe on. Each rank's counts land in <workdir>/<run>/probe/comm_rank<r>.json."""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch.distributed as dist

STEPS = 3
ODD = ["model.config.intermediate_size=99"]
NF4 = ["quantization.mode=nf4", "quantization.compute_dtype=float32"]
# The memory probe counts every live tensor of the process, so a run that leaves tensors behind would inflate the
# next one's: the torch engines run first, the DeepSpeed ones (whose 2 GB gradient bucket dominates) last.
RUNS = {
    "ddp": ("ddp", ODD),
    "fsdp2": ("fsdp2", ODD),
    "ddp_nf4": ("ddp", NF4),
    "fsdp2_nf4": ("fsdp2", NF4),
    "zero2": ("zero2", ODD),
    "zero2_nf4": ("zero2", NF4),
    "zero3": ("zero3", ODD),
}


def overrides(cache: str, out: str, engine: str, extra: list[str]) -> list[str]:
    return [
        f"model.cache_dir={cache}",
        "data.seq_len=32",
        "data.synthetic_samples=200",
        f"training.max_steps={STEPS}",
        "training.global_batch_size=8",
        "training.micro_batch_size=2",
        "training.warmup_steps=1",
        "output.progress_bar=false",
        "output.plot=false",
        "output.save_adapter=false",
        "checkpoint.resume=none",
        "checkpoint.every_steps=0",
        f"output.dir={out}",
        f"parallel.engine={engine}",
        *extra,
    ]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--runs", nargs="*", default=list(RUNS))
    args = p.parse_args()
    dist.init_process_group("gloo")
    from dora_dist.config import load_config
    from dora_dist.train import train

    for name in args.runs:
        engine, extra = RUNS[name]
        out = os.path.join(args.workdir, name)
        os.environ.update(
            DORA_DIST_COUNT_COMM="1",
            DORA_DIST_COUNT_COMM_DIR=os.path.join(out, "probe"),
            DORA_DIST_MEMORY_STEP=str(STEPS),
        )
        train(load_config(None, overrides(args.cache, out, engine, extra)))
        gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
