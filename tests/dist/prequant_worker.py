"""Run under `torchrun --nproc-per-node 2` by tests/dist/test_prequantized_engines.py (one launch, gloo):

For each case, the trainer on a pre-quantized bitsandbytes checkpoint (no quantization section: its settings are
taken) and on the dense built-in model quantized on the fly with the same settings:
- fsdp2, nf4 + double quant: each rank's row-sharded 4-bit base (built by the trainer's own `build`) compared
  byte for byte; nf4 + double quant and fp4 without: both trained;
- engine auto (ddp for a 4-bit base; it used to pick fsdp2 and crash), nf4 + double quant;
- zero2, fp4 + double quant.
Rank 0 writes the losses, adapters' paths and the byte comparisons to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prequant_fixture import job_overrides, on_the_fly  # noqa: E402

CASES = [("fsdp2", "nf4", True), ("fsdp2", "fp4", False), ("auto", "nf4", True), ("zero2", "fp4", True)]


def local_base_bytes(job) -> dict[str, torch.Tensor]:
    """This rank's packed row records (one row of bytes per weight row) of every 4-bit base weight, by name."""
    from dora_dist.quant.sharded4bit_linear import ShardedLinear4bit

    out = {}
    for name, module in job.engine.unwrap(job.model).named_modules():
        if isinstance(module, ShardedLinear4bit):
            w = module.weight
            local = w._local_tensor if hasattr(w, "_local_tensor") else w
            out[name] = local.qdata.clone()
    return out


def same_bytes(pre_cfg, fly_cfg) -> dict:
    """Whether the pre-quantized and on-the-fly fsdp2 bases hold equal bytes on every rank (all ranks agree)."""
    from dora_dist.parallel import DistEnv
    from dora_dist.train import build

    env = DistEnv.from_environ(device="cpu")
    pre = local_base_bytes(build(pre_cfg, env))
    fly = local_base_bytes(build(fly_cfg, env))
    equal = pre.keys() == fly.keys() and all(torch.equal(pre[k], fly[k]) for k in pre)
    flag = torch.tensor([int(equal), len(pre)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    rows = torch.tensor([sum(t.shape[0] for t in pre.values())], dtype=torch.int64)
    all_rows = [torch.zeros_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(all_rows, rows)
    return {"equal_on_all_ranks": bool(flag[0]), "layers": int(flag[1]), "local_rows": [int(r) for r in all_rows]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", required=True)
    p.add_argument("--ckpts", required=True, help="JSON: combo name -> pre-quantized checkpoint directory")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    from dora_dist.config import load_config
    from dora_dist.metrics import read_metrics
    from dora_dist.models.prequantized import adopt_checkpoint_quantization
    from dora_dist.train import train

    ckpts = json.loads(args.ckpts)
    work, cache = Path(args.workdir), Path(args.cache)
    results: dict = {}
    for engine, quant_type, double_quant in CASES:
        name = f"{engine}-{quant_type}{'-dq' if double_quant else ''}"
        base = job_overrides(cache) + [f"parallel.engine={engine}"]
        pre = base + [
            f"model.name_or_path={ckpts[f'{quant_type}-dq' if double_quant else quant_type]}",
            f"output.dir={work / name / 'pre'}",
        ]
        fly = base + on_the_fly(quant_type, double_quant) + [f"output.dir={work / name / 'fly'}"]
        case: dict = {}
        if (engine, quant_type) == ("fsdp2", "nf4"):  # all four combinations: tests/unit/test_prequantized.py
            pre_cfg, _ = adopt_checkpoint_quantization(load_config(None, pre))
            case["bytes"] = same_bytes(pre_cfg, load_config(None, fly))
        for kind, overrides in (("pre", pre), ("fly", fly)):
            summary = train(load_config(None, overrides))
            out = work / name / kind
            case[kind] = {
                "engine": summary.get("engine"),
                "adapter": str(out / "adapter"),
                "losses": [r["loss"] for r in read_metrics(out)] if dist.get_rank() == 0 else [],
            }
        results[name] = case
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
