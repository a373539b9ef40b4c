"""One rank of the ZeRO-3 hpZ checks (launched by tests/dist/test_zero_hpz.py as 2 "nodes" × 2 processes through
the deepspeed launcher's hostfile mode; not a test module itself).

All runs go through the trainer (`dora_dist.train.train`), in one launch because a DeepSpeed start on the CPU is
slow; each writes its own output directory, which the test reads:
  hpz      zero3, parallel.shard_group=0 (auto: one node's 2 processes -> zero_hpz_partition_size=2), 4 steps with
           the collective counter on, checkpoints every 2 steps, persistence threshold PERSISTENCE;
  resume   zero3 with one flat shard group (parallel.shard_group=4) resuming hpz's step-2 checkpoint, to step 4;
  offload  hpz with parallel.cpu_offload=true (optimizer state and parameter partitions in CPU memory), 2 steps.
Then `engine_check` (the engine alone): every rank's record lands in <workdir>/engine.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

STEPS = 4


def overrides(cache: str, out: str, extra: list[str]) -> list[str]:
    """The tiny built-in Llama, fp32 (DeepSpeed's ZeRO-3 reduces in fp16/bf16/fp32 only: no float64 runs), micro-batch
    1 × accumulation 2 × 4 ranks = the global batch of 8 the single-process reference takes in one micro-step."""
    return [
        f"model.cache_dir={cache}",
        "data.seq_len=32",
        "data.synthetic_samples=100",
        f"training.max_steps={STEPS}",
        "training.global_batch_size=8",
        "training.micro_batch_size=1",
        "training.lr=5e-3",
        "training.warmup_steps=1",
        "output.progress_bar=false",
        "output.plot=false",
        f"output.dir={out}",
        "checkpoint.resume=none",
        *extra,
    ]


#: hpz's stage3_param_persistence_threshold: norms, magnitudes and the smallest lora_B stay whole after the step
#: (re-gathered over all ranks), lora_A / larger lora_B are gathered per layer like the base weights, as in a real
#: model (the default 1e5 would make every adapter of this tiny model persistent)
PERSISTENCE = 1000
HPZ = ["parallel.engine=zero3", "parallel.shard_group=0", "checkpoint.every_steps=2"]
RUNS = {
    "hpz": HPZ,
    "resume": ["parallel.engine=zero3", "parallel.shard_group=4"],  # resume path appended by main
    "offload": [*HPZ, "parallel.cpu_offload=true", "training.max_steps=2", "checkpoint.every_steps=0"],
}


def engine_check() -> dict:
    """The engine alone on zero_worker's tiny model (MLP rows split mid-row): the hpZ group DeepSpeed built, the
    magnitude init from the secondary partitions (its all-reduce inside the group) and from gathered weights, vs
    one process; and the bytes each rank holds in primary and secondary partitions."""
    import torch.distributed as dist
    from deepspeed.utils import groups
    from zero_worker import tiny_model, with_dora

    from dora_dist.adapters import adapter_state_dict
    from dora_dist.config import config_from_dict
    from dora_dist.parallel.dist_env import DistEnv
    from dora_dist.parallel.zero import Zero3Engine

    cfg = config_from_dict(
        {
            "training": {"micro_batch_size": 1, "grad_accum": 2, "max_steps": 1, "device": "cpu"},
            "parallel": {"shard_group": 0},
        }
    )
    engine = Zero3Engine(cfg, DistEnv.from_environ(device="cpu"))
    model = engine.prepare(with_dora(tiny_model(), init_magnitude=False))
    intra = groups._get_zero_param_intra_parallel_group()
    out: dict = {"hpz_group": dist.get_process_group_ranks(intra), "stats": dict(engine.norm_init_stats)}
    held = {"primary": 0, "secondary_frozen": 0, "secondary_trainable": 0, "secondary_frozen_model": 0}
    for p in engine.unwrap().parameters():
        held["primary"] += p.ds_tensor.numel() * p.ds_tensor.element_size()
        sec = p.ds_secondary_tensor
        if sec is not None:
            held["secondary_trainable" if p.requires_grad else "secondary_frozen"] += sec.numel() * sec.element_size()
        if not p.requires_grad:  # what the planner models: padded to the world, split over the group, own dtype
            world, group = dist.get_world_size(), len(out["hpz_group"])
            held["secondary_frozen_model"] += -(-int(p.ds_numel) // world) * world // group * p.element_size()
    out["held"] = held
    ref = {
        k: v for k, v in adapter_state_dict(with_dora(tiny_model(), init_magnitude=True)).items() if "magnitude" in k
    }
    got = engine.adapter_state_dict()  # COLLECTIVE (the whole dict on rank 0 only)
    engine.init_magnitudes(model, method="gather")
    gathered = engine.adapter_state_dict()
    if dist.get_rank() == 0:
        diff = lambda a: max(float((a[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)  # noqa: E731
        out["magnitude_rel_err"] = diff({k: got[k] for k in ref})
        out["magnitude_gather_rel_err"] = diff({k: gathered[k] for k in ref})
    engine.close()
    out["group_released"] = groups._get_zero_param_intra_parallel_group() is None
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--runs", nargs="*", default=list(RUNS))
    p.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = p.parse_args()
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung rank's stacks: kill -USR1 <pid>
    import torch.distributed as dist

    dist.init_process_group("gloo")
    from dora_dist.config import load_config
    from dora_dist.train import train

    for name in args.runs:
        extra = RUNS[name]
        out = os.path.join(args.workdir, name)
        if name == "hpz":
            user = os.path.join(args.workdir, "ds_hpz.json")
            if dist.get_rank() == 0:
                with open(user, "w") as f:
                    json.dump({"zero_optimization": {"stage3_param_persistence_threshold": PERSISTENCE}}, f)
            dist.barrier()
            extra = [*extra, f"parallel.deepspeed_config={user}"]
        if name == "resume":
            extra = [*extra, f"checkpoint.resume={os.path.join(args.workdir, 'hpz', 'checkpoints', 'step_00000002')}"]
        os.environ.update(DORA_DIST_COUNT_COMM="1", DORA_DIST_COUNT_COMM_DIR=os.path.join(out, "probe"))
        train(load_config(None, overrides(args.cache, out, extra)))
        gc.collect()
    checked = engine_check()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, checked)
    if dist.get_rank() == 0:
        with open(os.path.join(args.workdir, "engine.json"), "w") as f:
            json.dump(everyone, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
