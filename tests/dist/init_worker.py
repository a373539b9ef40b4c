"""Run under torchrun (2 ranks) by tests/dist/test_same_init.py: build each engine's job exactly as the trainer
does (data, load plan, model, adapters, wrap, magnitude init) and write the initial adapter, gathered to full
tensors, for the test to compare with one process. One launch covers every engine, dense and 4-bit."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from init_cases import CASES, overrides  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from dora_dist.config import load_config
    from dora_dist.parallel.dist_env import DistEnv
    from dora_dist.train import build

    env = DistEnv.from_environ(device="cpu")
    work = Path(args.workdir)
    written = {}
    try:
        for name, engine, quant in CASES:
            cfg = load_config(
                None, overrides(args.cache, quant) + [f"parallel.engine={engine}", f"output.dir={work / name}"]
            )
            job = build(cfg, env)
            state = job.engine.adapter_state_dict()
            if env.is_main:
                path = work / f"{name}.pt"
                torch.save(state, path)
                written[name] = str(path)
            job.engine.close()
        if env.is_main:
            Path(args.out).write_text(json.dumps(written))
    finally:
        env.destroy()


if __name__ == "__main__":
    main()
