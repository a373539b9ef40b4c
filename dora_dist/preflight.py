"""What a job's config and this machine can tell before any work starts, checked before any process group,
tokenizer or model exists: a bad combination fails in a second, once, instead of after minutes of loading on every
rank (or inside a collective).

    preflight(cfg, world_size)      # raises a UserError (dora_dist/errors.py) naming the key and the fix

Each rule is one function of (cfg, world_size) that calls the check the late code path uses too (the engine's
`config_problem`, `Batching.accumulation`, `verify_checkpoint`, ...), so a rule lives in one place. `train()` runs
preflight first; `python -m dora_dist.train --check ...` runs only this (the launch scripts call it before
starting torchrun or the deepspeed launcher, so a config error never reaches their agents). To add a rule, write
`check_<what>(cfg, world_size)` and append it to RULES.

LOAD_RULES are earlier still: they judge a value of the config alone against a layer above config (the engine
registry, the trackers), and run on every config dora_dist.config loads (registered there on import: config, a leaf,
cannot import what they read), so `load_config` itself refuses an unknown engine or logger.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dora_dist.config import Config, register_load_rule
from dora_dist.dist_env import launch_local_world_size
from dora_dist.errors import CheckpointError, ConfigError, InputNotFoundError


def check_engine_choice(cfg: Config) -> None:
    """parallel.engine names an engine (or auto)."""
    from dora_dist.parallel import ENGINE_CHOICES

    if cfg.parallel.engine not in ENGINE_CHOICES:
        raise ConfigError(f"parallel.engine: expected one of {', '.join(ENGINE_CHOICES)}, got {cfg.parallel.engine!r}")


def check_fsdp2_quant_storage(cfg: Config) -> None:
    """An engine that shards packed 4-bit records itself (FSDP2) ignores quantization.quant_storage: refused."""
    from dora_dist.parallel import ENGINES, capabilities

    q = cfg.quantization
    name = cfg.parallel.engine
    if name not in ENGINES or q.mode not in ("nf4", "fp4") or q.quant_storage == "uint8":
        return
    caps = capabilities(name)
    if caps.shards_params and caps.holds(q.mode):
        raise ConfigError(
            f"quantization.quant_storage={q.quant_storage} has no effect with parallel.engine={name}: its "
            "4-bit weights are row-sharded packed uint8 records that the engine shards itself (the bfloat16 "
            "storage convention exists for FSDP1's flat parameters). Remove the key or set uint8."
        )


def check_logger_choice(cfg: Config) -> None:
    """output.loggers names known trackers (whether their packages are installed is check_loggers')."""
    from dora_dist.loggers import LOGGER_CHOICES

    bad = [n for n in cfg.output.loggers if n not in LOGGER_CHOICES]
    if bad:
        raise ConfigError(f"output.loggers: unknown logger(s) {bad}; choose from {', '.join(LOGGER_CHOICES)}")


#: run by dora_dist.config on every config it loads (after its own checks), in this order
LOAD_RULES: tuple[Callable[[Config], None], ...] = (check_engine_choice, check_fsdp2_quant_storage, check_logger_choice)
for _rule in LOAD_RULES:
    register_load_rule(_rule)


def check_device(cfg: Config, world_size: int) -> None:
    """training.device=cuda (the nccl backend) needs a visible GPU, and nccl one GPU per process of the node."""
    import torch

    device = cfg.training.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "training.device=cuda (nccl backend) but no CUDA GPU is visible here (torch.cuda."
            "is_available() is False); set training.device=auto or cpu (gloo), or run on a GPU node"
        )
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "").strip() or 1)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # one GPU visible per process (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank) is fine: each rank uses it
    if device in ("auto", "cuda") and 1 < visible < local:
        raise ConfigError(
            f"{local} processes on this node but {torch.cuda.device_count()} CUDA GPU(s) visible: "
            f"nccl needs one GPU per process; launch --nproc-per-node {torch.cuda.device_count()} (or "
            "NUM_GPUS / NPROC_PER_NODE), or set training.device=cpu (gloo)"
        )


def check_engine(cfg: Config, world_size: int) -> None:
    """The engine exists, is installed, and can run this config on world_size processes."""
    from dora_dist.parallel import engine_class, resolve_engine_name

    problem = engine_class(resolve_engine_name(cfg, world_size)).config_problem(cfg, world_size)
    if problem is not None:
        raise ConfigError(problem)


def check_mesh(cfg: Config, world_size: int) -> None:
    """parallel.tp and parallel.shard_group fit the world size, the node layout (LOCAL_WORLD_SIZE) and the engine."""
    from dora_dist.parallel.mesh import resolve_dims

    resolve_dims(cfg, world_size, launch_local_world_size(world_size))
    if cfg.parallel.tp > 1:
        from dora_dist.parallel.tp_plan import tp_config_problem

        problem = tp_config_problem(cfg, None)  # the base's kind first: no model config needed
        if problem is None:
            problem = tp_config_problem(cfg, _model_config_or_none(cfg))
        if problem is not None:
            raise ConfigError(problem)


def _model_config_or_none(cfg: Config):
    """The model's transformers config when it is known here without building or downloading anything (the built-in
    model, a from-scratch config, an embedded known architecture, a local directory), else None: the heads are then
    checked where the model is loaded (parallel/tp.py)."""
    from dora_dist import models
    from dora_dist.models.builtin import _arch

    name = str(cfg.model.name_or_path or "")
    try:
        if name == models.BUILTIN_NAME:
            return models.hf_config_from_dict({"model_type": "llama", **_arch(cfg.model.config)})
        if cfg.model.builds_from_scratch:
            return models.hf_config_from_dict(cfg.model.config)
        arch = models.known_architecture(name)
        if arch is not None:
            return models.hf_config_from_dict(arch)
        if (Path(name) / "config.json").is_file():
            return models.model_config(cfg)
    except Exception:  # noqa: BLE001 - a config that cannot be read now is read (and reported) at load time
        return None
    return None


def check_deepspeed_config(cfg: Config, world_size: int) -> None:
    """A user DeepSpeed JSON (parallel.deepspeed_config) exists, parses and agrees with the config (ZeRO engines)."""
    from dora_dist.parallel import capabilities, resolve_engine_name

    stage = capabilities(resolve_engine_name(cfg, world_size)).deepspeed_stage
    if stage is not None and cfg.parallel.deepspeed_config:
        from dora_dist.parallel.zero_config import build_ds_config

        build_ds_config(cfg, world_size, stage)


def check_compile(cfg: Config, world_size: int) -> None:
    """training.compile=true only with the engines it composes with."""
    if cfg.training.compile:
        from dora_dist.compile import compile_problem
        from dora_dist.parallel import resolve_engine_name

        problem = compile_problem(resolve_engine_name(cfg, world_size))
        if problem is not None:
            raise ConfigError(problem)


def check_loggers(cfg: Config, world_size: int) -> None:
    """The chosen trackers' packages are installed."""
    from dora_dist.loggers import check_loggers as check

    check(cfg.output.loggers)


def check_batch(cfg: Config, world_size: int) -> None:
    """training.global_batch_size splits evenly into micro-batches over the world."""
    from dora_dist.batching import Batching

    Batching.accumulation(cfg.training, max(1, world_size // max(1, cfg.parallel.tp)))  # data-parallel ranks


def check_quantization(cfg: Config, world_size: int) -> None:
    """A 4/8-bit base needs bitsandbytes."""
    from dora_dist.models import quantization_problem

    problem = quantization_problem(cfg)
    if problem is not None:
        raise ConfigError(problem)


def check_model(cfg: Config, world_size: int) -> None:
    """A local model path exists; a model with its own code is not loaded without model.trust_remote_code."""
    from dora_dist.models import check_model_path, check_remote_code

    check_model_path(cfg)
    check_remote_code(cfg)


def check_data(cfg: Config, world_size: int) -> None:
    """Local data files named by data.source / data.eval_source exist."""
    from dora_dist.data import check_source

    check_source(cfg.data.source)
    check_source(cfg.data.eval_source, "data.eval_source")


def check_resume(cfg: Config, world_size: int, contents: bool = True) -> None:
    """checkpoint.resume=<dir> names a complete, undamaged checkpoint. contents=False: only what needs no read of
    the files (marker, every file present at its size); train() leaves the sha256 to the resume itself, which reads
    the checkpoint once, on rank 0 (CheckpointManager.verify)."""
    from dora_dist.checkpoint.manager import verify_checkpoint

    resume = cfg.checkpoint.resume
    if resume in ("auto", "none"):
        return
    path = Path(resume)
    if not path.is_dir():
        raise InputNotFoundError(
            f"checkpoint.resume: no such directory: {resume}; give a checkpoint directory "
            "(<output.dir>/checkpoints/step_NNNNNNNN), auto or none"
        )
    problem = verify_checkpoint(path, contents=contents)
    if problem is not None:
        raise resume_error(path, problem)


def resume_error(path: Path, problem: str) -> CheckpointError:
    """The error for checkpoint.resume=<path> that is not an undamaged checkpoint (`problem`: what is wrong)."""
    from dora_dist.checkpoint.atomic import STEP_RE

    inside = sorted(p.name for p in path.iterdir() if STEP_RE.match(p.name))
    hint = (
        f"it holds checkpoints ({', '.join(inside[-3:])}): pass one of them, or checkpoint.resume=auto"
        if inside
        else "give a step_NNNNNNNN directory written by a run, or checkpoint.resume=auto / none"
    )
    return CheckpointError(f"checkpoint.resume: {problem}; {hint}")


def writable_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be used as a directory to write into (created when missing), or None. Probes with a
    temporary file in the nearest existing directory (removed at once), so a read-only filesystem or a missing
    permission shows here, before any work, whoever runs it (root ignores permission bits, not a read-only mount)."""
    import errno
    import tempfile

    path = path.expanduser()
    if path.exists() and not path.is_dir():
        return "is an existing file, not a directory"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be created: {existing} is a file"
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".dora_dist_probe_"):
            pass
    except OSError as exc:
        why = {
            errno.EROFS: "is on a read-only filesystem",
            errno.EACCES: "is not writable (permission denied)",
            errno.EPERM: "is not writable (operation not permitted)",
        }.get(exc.errno, exc.strerror or str(exc))
        return f"cannot be written: {existing} {why}"
    return None


def check_output(cfg: Config, world_size: int) -> None:
    """output.dir (and checkpoint.dir) can be created and written to: found here, not as a traceback after the
    model is loaded."""
    for key, value in (("output.dir", cfg.output.dir), ("checkpoint.dir", cfg.checkpoint.dir)):
        problem = writable_dir_problem(Path(value)) if value else None
        if problem:
            raise ConfigError(f"{key}={value} {problem}; choose a directory you can write to")


def note_length(cfg: Config, world_size: int) -> None:
    """Not an error: training.epochs given beside training.max_steps is not used; say so (rank 0)."""
    from dataclasses import fields

    from dora_dist.config import TrainingConfig
    from dora_dist.errors import is_reporting_rank

    t = cfg.training
    default_epochs = next(f.default for f in fields(TrainingConfig) if f.name == "epochs")
    if t.max_steps and t.epochs != default_epochs and is_reporting_rank():
        print(
            f"[dora_dist] note: training.max_steps={t.max_steps} sets the length; training.epochs={t.epochs:g} is "
            "not used (set training.max_steps=0 to train by epochs)",
            flush=True,
        )


RULES: tuple[Callable[[Config, int], None], ...] = (
    check_device,
    check_engine,
    check_mesh,
    check_batch,
    check_deepspeed_config,
    check_compile,
    check_quantization,
    check_loggers,
    check_model,
    check_data,
    check_resume,
    check_output,
    note_length,
)


def launch_world_size() -> int:
    """WORLD_SIZE as torchrun / the deepspeed launcher set it (1 when run alone)."""
    value = os.environ.get("WORLD_SIZE", "").strip()
    return int(value) if value else 1


def preflight(cfg: Config, world_size: int | None = None, checkpoint_contents: bool = True) -> None:
    """Run every rule; the first problem is raised as a UserError. world_size: default WORLD_SIZE (or 1).
    checkpoint_contents=False: an explicit checkpoint.resume is checked without reading its files (train() does:
    its resume verifies the checkpoint once, on rank 0)."""
    from dora_dist.models.prequantized import adopt_checkpoint_quantization

    world = launch_world_size() if world_size is None else world_size
    cfg, _ = adopt_checkpoint_quantization(cfg)  # a pre-quantized checkpoint's settings, or a contradiction error
    for rule in RULES:
        if rule is check_resume:
            check_resume(cfg, world, contents=checkpoint_contents)
        else:
            rule(cfg, world)


__all__ = [
    "preflight",
    "RULES",
    "LOAD_RULES",
    "check_engine_choice",
    "check_fsdp2_quant_storage",
    "check_logger_choice",
    "launch_world_size",
    "check_device",
    "check_engine",
    "check_mesh",
    "launch_local_world_size",
    "check_batch",
    "check_deepspeed_config",
    "check_compile",
    "check_quantization",
    "check_loggers",
    "check_model",
    "check_data",
    "check_resume",
    "resume_error",
    "check_output",
    "writable_dir_problem",
    "note_length",
]
