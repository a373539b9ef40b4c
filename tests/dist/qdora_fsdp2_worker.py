"""Run under `torchrun --nproc-per-node 2` by tests/dist/test_fsdp2_qdora.py::test_trainer_* (one launch):

1. `dora-dist train` with parallel.engine=fsdp2 quantization.mode=nf4 on the tiny quickstart job (4 steps);
2. the same with CPU offload and gradient checkpointing;
3. the same job stopped after step 2 (checkpoint) and resumed to step 4.
Writes a JSON of results (rank 0); the test compares them with the single-process QDoRA run (bnb Linear4bit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist


def qdora_overrides(cache: str) -> list[str]:
    return [
        f"model.cache_dir={cache}",
        "data.seq_len=64",
        "data.synthetic_samples=300",
        "training.max_steps=4",
        "training.global_batch_size=8",
        "training.micro_batch_size=2",
        "training.lr=5e-3",
        "training.warmup_steps=1",
        "output.progress_bar=false",
        "output.plot=false",
        "checkpoint.resume=none",
        "quantization.mode=nf4",
        "quantization.compute_dtype=float32",
        "model.dtype=float32",
        "training.precision=fp32",
    ]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    from dora_dist.config import load_config
    from dora_dist.metrics import read_metrics
    from dora_dist.train import train

    rank = dist.get_rank()
    work = Path(args.workdir)
    base = qdora_overrides(args.cache) + ["parallel.engine=fsdp2"]
    results: dict = {"world_size": dist.get_world_size()}
    out = work / "fsdp2_nf4"
    train(load_config(None, base + [f"output.dir={out}"]))
    if rank == 0:
        recs = read_metrics(out)
        results["fsdp2_nf4"] = {
            "losses": [r["loss"] for r in recs],
            "grad_norms": [r["grad_norm"] for r in recs],
            "adapter": str(out / "adapter"),
        }
    out = work / "fsdp2_nf4_offload_ckpt"
    train(
        load_config(
            None, base + [f"output.dir={out}", "parallel.cpu_offload=true", "training.gradient_checkpointing=true"]
        )
    )
    if rank == 0:
        recs = read_metrics(out)
        results["offload_ckpt"] = {"losses": [r["loss"] for r in recs], "adapter": str(out / "adapter")}
    out = work / "fsdp2_nf4_resume"
    resume = base + [f"output.dir={out}", "checkpoint.every_steps=2"]
    train(load_config(None, resume + ["training.stop_after_steps=2"]))
    stopped = sorted(q.name for q in (out / "checkpoints").iterdir()) if rank == 0 else []
    train(load_config(None, [o for o in resume if o != "checkpoint.resume=none"] + ["checkpoint.resume=auto"]))
    if rank == 0:
        recs = read_metrics(out)
        results["resume"] = {
            "losses": [r["loss"] for r in recs],
            "adapter": str(out / "adapter"),
            "checkpoints_after_stop": stopped,
        }
        Path(args.out).write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
