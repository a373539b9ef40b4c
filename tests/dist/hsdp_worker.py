"""Run under `torchrun --nproc-per-node 4` by tests/dist/test_hsdp.py (one launch, several runs of the real trainer, so
the slow start of 4 processes on 2 cores is paid once). parallel.shard_group=2 makes the 4 ranks 2 shard groups × 2
(FSDP2 HSDP: dp_replicate=2 × dp_shard=2):

1. hsdp: dense float64 base, 4 steps of global batch 16 (micro 2 × accum 2 × 4 ranks), checkpoint at step 2, the
   collectives counted per mesh dimension on every step;
2. hsdp_nf4: an NF4 base (packed 4-bit rows sharded inside the groups), fp32, 3 steps, counted;
3. checkpoints across meshes (DCP): flat FSDP2 and DDP resume HSDP's step-2 checkpoint and write step 3; HSDP
   resumes those to step 4, and (with CPU offload) the one-process step-2 checkpoint the test wrote before the
   launch (--single-ckpt);
4. training.compile=true under HSDP (2 steps; where a C++ compiler exists);
5. the magnitude init under HSDP (nonzero lora_B, uneven row shards, GPT-2's Conv1D bases) vs one process.

Writes a JSON of results (rank 0); tests/dist/test_hsdp.py compares them with one process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from engine_worker import COMPILE, GPT2_ARCH, LLAMA_ARCH, QDORA, common_overrides, magnitude_check  # noqa: E402

HSDP = ["parallel.engine=fsdp2", "parallel.shard_group=2"]
FLAT = ["parallel.engine=fsdp2", "parallel.shard_group=4"]
DDP = ["parallel.engine=ddp"]
GLOBAL16 = ["training.global_batch_size=16"]  # 4 ranks × micro 2 × accum 2: gradients held back on micro-step 1


def overrides(cache: str, out: Path, *extra: str) -> list[str]:
    return common_overrides(cache) + GLOBAL16 + [f"output.dir={out}", *extra]


def resumed(cache: str, out: Path, ckpt: Path, *extra: str) -> list[str]:
    """A run that continues `ckpt` (a checkpoint directory written by another run, any engine or mesh)."""
    base = [o for o in overrides(cache, out, *extra) if o != "checkpoint.resume=none"]
    return base + [f"checkpoint.resume={ckpt}"]


#: name -> (engine overrides, what it resumes: (run, step) or "single", checkpoint every N steps)
RESUMES = {
    "flat_from_hsdp": (FLAT, ("hsdp", 2), 1),
    "ddp_from_hsdp": (DDP, ("hsdp", 2), 1),
    "hsdp_from_flat": (HSDP, ("flat_from_hsdp", 3), 0),
    "hsdp_from_ddp": (HSDP, ("ddp_from_hsdp", 3), 0),
    "hsdp_offload_from_single": ([*HSDP, "parallel.cpu_offload=true"], "single", 0),
}


def ckpt_dir(work: Path, run: str, step: int) -> Path:
    return work / run / "checkpoints" / f"step_{step:08d}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--single-ckpt", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    from dora_dist.config import load_config
    from dora_dist.metrics import read_metrics
    from dora_dist.train import train

    work = Path(args.workdir)
    results: dict = {}

    def record(name: str, out: Path) -> None:
        if dist.get_rank() == 0:
            recs = read_metrics(out)
            results[name] = {
                "steps": [r["step"] for r in recs],
                "losses": [r["loss"] for r in recs],
                "grad_norms": [r["grad_norm"] for r in recs],
                "adapter": str(out / "adapter"),
                "health": {k: v for k, v in recs[-1].items() if k.startswith("dora_")},
            }

    def counted(name: str, out: Path, cfg_overrides: list[str]) -> None:
        os.environ.update(DORA_DIST_COUNT_COMM="1", DORA_DIST_COUNT_COMM_DIR=str(out / "probe"))
        try:
            train(load_config(None, cfg_overrides))
        finally:
            os.environ.pop("DORA_DIST_COUNT_COMM")
        record(name, out)

    out = work / "hsdp"
    counted("hsdp", out, overrides(args.cache, out, *HSDP, "checkpoint.every_steps=2"))
    out = work / "hsdp_nf4"
    counted("hsdp_nf4", out, overrides(args.cache, out, *HSDP, *QDORA))
    if any(shutil.which(c) for c in ("g++", "c++", "clang++")):  # inductor's CPU backend needs a C++ compiler
        out = work / "hsdp_compile"
        train(load_config(None, overrides(args.cache, out, *HSDP, *COMPILE)))
        record("hsdp_compile", out)
    for name, (engine, source, every) in RESUMES.items():
        ckpt = Path(args.single_ckpt) if source == "single" else ckpt_dir(work, *source)
        out = work / name
        train(load_config(None, resumed(args.cache, out, ckpt, *engine, f"checkpoint.every_steps={every}")))
        record(name, out)
    from dora_dist.parallel.dist_env import DistEnv

    env = DistEnv.from_environ(device="cpu")
    for key, arch, probe in (
        ("magnitude", LLAMA_ARCH, "model.layers.0.mlp.down_proj"),
        ("magnitude_gpt2", GPT2_ARCH, None),
    ):
        res = magnitude_check(env, arch, probe, extra=("parallel.shard_group=2",))
        res["rowsq_max_err"] = env.all_reduce_max(res["rowsq_max_err"])
        res["forward_max_err"] = env.all_reduce_max(res["forward_max_err"])
        results[key] = {**results.get(key, {}), **res}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
