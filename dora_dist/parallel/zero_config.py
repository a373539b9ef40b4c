"""The DeepSpeed JSON for the ZeRO engines, generated from our config and checked against a user's own JSON.

Our config stays the single source of truth for the training math, so a ZeRO run computes what a single process
computes on the same global batch:

- optimizer and LR schedule: the trainer's torch AdamW and warmup/cosine LambdaLR are handed to
  `deepspeed.initialize` (a client optimizer; ZeRO partitions its state). A user JSON with an "optimizer" or
  "scheduler" section is refused: it would silently replace that math.
- precision: DeepSpeed's "bf16"/"fp16" modes cast the *whole* model, adapters included, to 16 bits and keep fp32
  master copies. We don't use them: the trainer already sets the frozen base dtype (`model.dtype`, bf16 under
  `training.precision=bf16`) and keeps adapters in `dora.adapter_dtype` (fp32 by default), exactly as in one process.
  A user JSON that enables "bf16" or "fp16" is therefore a conflict.
- batch: train_micro_batch_size_per_gpu = training.micro_batch_size, gradient_accumulation_steps = the trainer's
  accumulation, train_batch_size = their product with the world size.
- gradient_clipping = training.max_grad_norm (0 disables, as in our config).
- zero_optimization.stage = 2 or 3 (the engine); parallel.cpu_offload=true offloads the optimizer state to the CPU
  (ZeRO-2 and ZeRO-3) and, for ZeRO-3, the partitioned parameters too.
- zero_optimization.zero_hpz_partition_size = the shard group (parallel.shard_group, resolved by parallel/mesh.py)
  when ZeRO-3 runs several groups: ZeRO++ hierarchical partitioning (hpZ). Each rank keeps its 1/world primary
  partition (optimizer, checkpoint, gradient reduce-scatter: the whole world) and a secondary copy of every frozen
  parameter split over its shard group only, from which the forward/backward all-gathers run, inside the group.

Keys the user JSON adds (bucket sizes, overlap_comm, stage3_* thresholds, offload details, ...) are merged in. A key
set both ways with different values is an error naming the key and both values; "auto" (the Hugging Face
convention) takes our value.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dora_dist.errors import ConfigError

if TYPE_CHECKING:
    from dora_dist.config import Config

AUTO = "auto"


class DeepSpeedConfigError(ConfigError):
    """A DeepSpeed JSON that contradicts our config, or one we cannot read."""


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step, resolved by the job's one Batching rule (dora_dist/batching.py)."""
    from dora_dist.batching import Batching

    try:
        return Batching.accumulation(cfg.training, world_size)
    except ValueError as exc:
        raise DeepSpeedConfigError(str(exc)) from exc


def hpz_partition_size(cfg: Config, world_size: int, stage: int, local_world: int | None = None) -> int:
    """ZeRO++'s zero_hpz_partition_size for this job: the shard group when ZeRO-3 replicates groups, else 1.
    local_world: processes per node (None: the launch's LOCAL_WORLD_SIZE, or one node)."""
    if stage != 3 or world_size <= 1:
        return 1
    from dora_dist.dist_env import launch_local_world_size
    from dora_dist.parallel.mesh import resolve_dims

    local = local_world if local_world is not None else launch_local_world_size(world_size)
    dims = resolve_dims(cfg, world_size, local, "zero3")
    return dims.dp_shard if dims.dp_replicate > 1 else 1


def generated_config(
    cfg: Config, world_size: int, stage: int, grad_accum: int | None = None, local_world: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed config implied by our config alone (local_world: processes per node, for the shard group)."""
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage!r}")
    t = cfg.training
    gas = grad_accum if grad_accum is not None else grad_accum_steps(cfg, world_size)
    zero: dict[str, Any] = {"stage": stage}
    if cfg.parallel.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if stage == 3:  # 1 (DeepSpeed's default) when one group spans the world; a user JSON cannot contradict it
        zero["zero_hpz_partition_size"] = hpz_partition_size(cfg, world_size, stage, local_world)
        # We save adapters ourselves (gathering only adapter tensors); never gather the whole base on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": int(t.micro_batch_size),
        "gradient_accumulation_steps": int(gas),
        "train_batch_size": int(t.micro_batch_size) * int(gas) * int(world_size),
        "gradient_clipping": float(t.max_grad_norm),
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # the client torch AdamW is what the single-process run uses; DeepSpeed calls it "untested" for ZeRO
        "zero_allow_untested_optimizer": True,
        # ... and, with optimizer offload, would otherwise insist on DeepSpeedCPUAdam (a JIT-built op)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def read_user_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DeepSpeedConfigError(f"parallel.deepspeed_config: file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(f"parallel.deepspeed_config: {p} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"parallel.deepspeed_config: {p} must hold a JSON object")
    return data


# Where each generated key comes from in our config, for error messages.
_ORIGIN = {
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.grad_accum / training.global_batch_size",
    "train_batch_size": "training.micro_batch_size x accumulation x world size",
    "gradient_clipping": "training.max_grad_norm",
    "bf16.enabled": "training.precision / dora.adapter_dtype (dora_dist handles precision itself)",
    "fp16.enabled": "training.precision / dora.adapter_dtype (dora_dist handles precision itself)",
    "zero_optimization.stage": "parallel.engine",
    "zero_optimization.offload_optimizer.device": "parallel.cpu_offload",
    "zero_optimization.offload_param.device": "parallel.cpu_offload",
    "zero_optimization.zero_hpz_partition_size": "parallel.shard_group",
}

_REFUSED_SECTIONS = {
    "optimizer": "the optimizer is the trainer's AdamW (training.lr, training.adam_*, training.weight_decay)",
    "scheduler": "the LR schedule is the trainer's (training.warmup_steps, training.lr_schedule, "
    "training.min_lr_ratio)",
    "amp": "precision is set by training.precision and dora.adapter_dtype",
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b if isinstance(a, bool) and isinstance(b, bool) else False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _merge(ours: dict, theirs: dict, prefix: str, source: str) -> dict:
    out = copy.deepcopy(ours)
    for key, value in theirs.items():
        full = f"{prefix}{key}"
        if key not in ours:
            out[key] = copy.deepcopy(value)
        elif isinstance(ours[key], dict):
            if isinstance(value, dict):
                out[key] = _merge(ours[key], value, full + ".", source)
            elif isinstance(value, bool) and key in ("bf16", "fp16"):  # tolerate {"bf16": false}-style shorthand
                out[key] = _merge(ours[key], {"enabled": value}, full + ".", source)
            else:
                raise DeepSpeedConfigError(f"{source}: '{full}' must be an object, got {value!r}")
        elif value == AUTO:
            continue
        elif not _same(value, ours[key]):
            origin = _ORIGIN.get(full, "the dora_dist config")
            raise DeepSpeedConfigError(
                f"{source}: '{full}' is {value!r} but the dora_dist config gives {ours[key]!r} (from {origin}); "
                f"remove the key from the JSON or change the dora_dist setting"
            )
    return out


def build_ds_config(
    cfg: Config,
    world_size: int,
    stage: int,
    user: dict | str | Path | None = None,
    grad_accum: int | None = None,
    local_world: int | None = None,
) -> dict[str, Any]:
    """Our generated config, merged with the user's JSON (a dict or a path; default parallel.deepspeed_config)."""
    ours = generated_config(cfg, world_size, stage, grad_accum, local_world)
    if user is None:
        user = getattr(cfg.parallel, "deepspeed_config", None)
    if user is None:
        return ours
    source = "parallel.deepspeed_config"
    if not isinstance(user, dict):
        source = f"parallel.deepspeed_config ({user})"
        user = read_user_config(user)
    for section, why in _REFUSED_SECTIONS.items():
        if section in user:
            raise DeepSpeedConfigError(f"{source}: the '{section}' section is not supported: {why}; remove it")
    return _merge(ours, user, "", source)


def describe(ds_config: dict[str, Any]) -> str:
    """One line for the log: stage, batch and offload."""
    z = ds_config.get("zero_optimization", {})
    off = [
        k.replace("offload_", "")
        for k in ("offload_optimizer", "offload_param")
        if isinstance(z.get(k), dict) and z[k].get("device", "none") != "none"
    ]
    return (
        f"ZeRO-{z.get('stage')} micro_batch={ds_config['train_micro_batch_size_per_gpu']} "
        f"accum={ds_config['gradient_accumulation_steps']} clip={ds_config['gradient_clipping']} "
        f"offload={'+'.join(off) or 'none'}"
    )
