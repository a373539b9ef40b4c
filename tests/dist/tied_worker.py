"""Run under `torchrun --nproc-per-node 2` by tests/dist/test_tied_modules_to_save_engines.py (one launch, gloo):

the built-in tiny Llama with tied embeddings (model.config.tie_word_embeddings=true) and dora.modules_to_save=
[lm_head], trained 2 steps by the trainer on each engine (fsdp2 used to abort in the first backward with a gloo
collective mismatch). After training, every rank runs the trained model (collectively where it is sharded) on
fixed token ids; rank 0 saves those logits beside the adapter, for the test to compare with peft's reload.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tied_fixture import ENGINES, probe_ids, tied_overrides  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    from dora_dist.config import load_config
    from dora_dist.parallel import DistEnv
    from dora_dist.train import build, finish, train_step

    env = DistEnv.from_environ(device="cpu")
    results = {}
    for engine, dtype in ENGINES.items():
        out = Path(args.workdir) / engine
        job = build(
            load_config(None, tied_overrides(args.cache, dtype) + [f"parallel.engine={engine}", f"output.dir={out}"]),
            env,
        )
        while job.step < job.stop_at:
            train_step(job)
        summary = finish(job)
        job.model.eval()
        with torch.no_grad():
            logits = job.model(input_ids=probe_ids()).logits
        if env.is_main:
            torch.save(logits.detach().cpu(), out / "trained_logits.pt")
            results[engine] = {
                "engine": summary["engine"],
                "dtype": dtype,
                "adapter": str(out / "adapter"),
                "logits": str(out / "trained_logits.pt"),
            }
        dist.barrier()
    if env.is_main:
        Path(args.out).write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
