"""Non-finite steps (training.max_bad_steps): the cases of tests/dist/test_nonfinite.py, run in-process for
parallel.engine=none and under `torchrun --nproc-per-node 2` (gloo) for ddp and fsdp2 (one launch for both), and
zero2 and zero3 (another launch; fp32, DeepSpeed's ZeRO optimizer has no float64 path here).

Two training runs per engine (the float64 quickstart job of engine_worker.common_overrides):

- "skip": 5 steps, training.max_bad_steps=2, checkpoint.every_steps=2. Step 2: an inf is put into the gradient of
  BAD_PARAM only (the loss stays finite): under none/ddp by a tensor hook in backward on the last rank (DDP then
  all-reduces it to every rank; ZeRO reduces it into its partitions), under fsdp2 into the last rank's local
  gradient shard after backward. Step 4: the
  loss of the last rank's micro-batches is multiplied by NaN. Both steps must be skipped, the run must finish.
- "stop": NaN loss from step 2 on, max_bad_steps=2, checkpoint.every_steps=1: NonFiniteLossError at step 3.

Around every step the trainable parameters (this rank's shard), the optimizer state and the scheduler's step count
are snapshotted; the result says, per step, whether they changed (summed over ranks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_worker import common_overrides  # noqa: E402

BAD_PARAM = "model.layers.1.self_attn.v_proj.lora_B"  # not the first trainable parameter in model order
GRAD_STEP, LOSS_STEP = 2, 4


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def snapshot(engine) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """This rank's trainable parameters (FSDP2: its shard; ZeRO-3: its partition), optimizer state (ZeRO: of the
    torch optimizer inside DeepSpeed's, over the flat partitions) and the scheduler's step count."""
    from dora_dist.parallel.base import trainable_named_parameters

    params = [getattr(p, "ds_tensor", p) for _, p in trainable_named_parameters(engine.model)]
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = [_local(v).detach().clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return [_local(p).detach().clone() for p in params], state, int(engine.scheduler.last_epoch)


def changed(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
    """How many tensors differ (a different count of tensors counts as a change)."""
    if len(a) != len(b):
        return 1 + max(len(a), len(b))
    return sum(0 if torch.equal(x, y) else 1 for x, y in zip(a, b, strict=True))


class Injector:
    """Wraps dora_dist.train.train_step and micro_batch_loss: poisons the chosen steps and records what each step
    changed."""

    def __init__(self, env, grad_steps: set[int], loss_steps: set[int], from_step: int | None = None):
        import dora_dist.train as train_mod

        self.train_mod, self.env = train_mod, env
        self.grad_steps, self.loss_steps, self.from_step = grad_steps, loss_steps, from_step
        self.real_step, self.real_loss = train_mod.train_step, train_mod.micro_batch_loss
        self.poison_loss = False
        self.per_step: dict[int, dict] = {}
        self.poisoner = env.rank == env.world_size - 1

    def __enter__(self):
        self.train_mod.train_step = self.train_step
        self.train_mod.micro_batch_loss = self.micro_batch_loss
        return self

    def __exit__(self, *exc):
        self.train_mod.train_step, self.train_mod.micro_batch_loss = self.real_step, self.real_loss

    def micro_batch_loss(self, *args, **kwargs):
        loss = self.real_loss(*args, **kwargs)
        return loss * float("nan") if self.poison_loss and self.poisoner else loss

    def train_step(self, job):
        step = job.step + 1
        self.poison_loss = step in self.loss_steps or (self.from_step is not None and step >= self.from_step)
        undo = self._inject_grad(job.engine) if step in self.grad_steps else (lambda: None)
        before = snapshot(job.engine)
        try:
            rec = self.real_step(job)
        finally:
            undo()
            self.poison_loss = False
        after = snapshot(job.engine)
        self.per_step[step] = {
            "params_changed": self.env.all_reduce_sum(changed(before[0], after[0])),
            "opt_state_changed": self.env.all_reduce_sum(changed(before[1], after[1])),
            "sched_before": before[2],
            "sched_after": after[2],
        }
        return rec

    def _inject_grad(self, engine):
        from dora_dist.parallel.base import clean_param_name, trainable_named_parameters

        param = next(p for n, p in trainable_named_parameters(engine.model) if clean_param_name(n) == BAD_PARAM)
        if engine.name == "fsdp2":  # this rank's gradient shard, after the reduce-scatter of the last micro-step
            real_clip = engine.clip_grad_norm

            def clip(max_norm):
                if self.poisoner:
                    _local(param.grad).view(-1)[0] = float("inf")
                return real_clip(max_norm)

            engine.clip_grad_norm = clip
            return lambda: delattr(engine, "clip_grad_norm")
        handle = param.register_hook(lambda g: g + float("inf") if self.poisoner else g)  # in backward
        return handle.remove


def run_cases(env, engine: str, workdir: Path, cache: str) -> dict:
    """Both runs for one engine; the result (complete on rank 0) is plain JSON."""
    from dora_dist.config import load_config
    from dora_dist.metrics import read_metrics
    from dora_dist.train import NonFiniteLossError, train

    base = common_overrides(cache) + [
        f"parallel.engine={engine}",
        "training.max_steps=5",
        "training.max_bad_steps=2",
        "checkpoint.keep_last=10",
    ]
    if engine.startswith("zero"):
        base += ["model.dtype=float32", "dora.adapter_dtype=float32"]
    result: dict = {}
    out = workdir / f"{engine}_skip"
    with Injector(env, {GRAD_STEP}, {LOSS_STEP}) as inj:
        summary = train(load_config(None, base + [f"output.dir={out}", "checkpoint.every_steps=2"]))
    result["skip"] = {"per_step": inj.per_step, "summary": summary}
    out_stop = workdir / f"{engine}_stop"
    error = None
    with Injector(env, set(), set(), from_step=2) as inj_stop:
        try:
            train(load_config(None, base + [f"output.dir={out_stop}", "checkpoint.every_steps=1"]))
        except NonFiniteLossError as exc:
            error = str(exc)
    result["stop"] = {"per_step": inj_stop.per_step, "error": error}
    if env.is_main:
        result["skip"]["records"] = read_metrics(out)
        result["skip"]["checkpoints"] = sorted(p.name for p in (out / "checkpoints").iterdir())
        result["stop"]["records"] = read_metrics(out_stop)
        result["stop"]["checkpoints"] = sorted(p.name for p in (out_stop / "checkpoints").iterdir())
        result["stop"]["adapter_written"] = (out_stop / "adapter").exists()
    return result


def main() -> int:
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--engines", default="ddp,fsdp2")
    args = p.parse_args()
    dist.init_process_group("gloo")
    from dora_dist.parallel.dist_env import DistEnv

    env = DistEnv.from_environ(device="cpu")
    results = {"world_size": env.world_size}
    for engine in args.engines.split(","):
        results[engine] = run_cases(env, engine, Path(args.workdir), args.cache)
    if env.is_main:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
