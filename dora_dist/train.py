"""The training job. `python -m dora_dist.train [--config F] [key=value ...]`, alone or under torchrun / the
deepspeed launcher; `dora-dist train ...` is the same.

Everything engine-specific lives behind `dora_dist.parallel.base.Engine`; this file has no engine branches.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dora_dist.adapter_export import export_adapter
from dora_dist.batching import Batching
from dora_dist.config import Config, load_job_config
from dora_dist.console import Console, quiet_third_party
from dora_dist.data import IGNORE_INDEX, GlobalBatchSampler, TokenizedDataset, build_datasets
from dora_dist.errors import JobFault, UserError, report_error
from dora_dist.evaluate import eval_due, format_eval_line, run_eval
from dora_dist.health_log import HealthMonitor, format_health
from dora_dist.loggers import RunLoggers, make_loggers
from dora_dist.losses import DEFAULT_CHUNK_TOKENS, causal_lm_loss_sum
from dora_dist.metrics import format_line, plot_loss
from dora_dist.models.prequantized import adopt_checkpoint_quantization
from dora_dist.nonfinite import NonFiniteLossError, applied_nonfinite_step, report_skipped_step, skip_reason  # noqa: F401 (re-exported)
from dora_dist.optim import adamw_factory
from dora_dist.parallel import DistEnv, Engine, make_engine, step_probe
from dora_dist.parallel.mesh import data_parallel_rank
from dora_dist.preemption import PreemptionGuard, exit_code_of, interrupted_now, stopped_line, write_requeue_marker
from dora_dist.preflight import preflight, resume_error
from dora_dist.run_state import (
    PriorRun,
    check_extension,
    check_rerun,
    check_resume,
    find_finished_run,
    first_logged_loss,
    keep_earlier_metrics,
    length_of,
    merge_summary,
    read_summary,
    run_identity,
    unused_changes,
    write_json_atomic,
)
from dora_dist.train_state import TrainState

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from dora_dist.checkpoint import CheckpointManager


class RunAlreadyFinished(Exception):
    """build() found that output.dir holds this run, finished: nothing to train (not an error)."""

    def __init__(self, prior: PriorRun):
        super().__init__(str(prior.out_dir))
        self.prior = prior


def micro_batch_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], global_targets: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Sum of next-token losses of this micro-batch / target tokens of the whole global batch (see Engine).
    lm_head + cross-entropy run over chunks of `chunk_tokens` tokens (0: whole fp32 logits), see losses.py."""
    loss_sum = causal_lm_loss_sum(
        model,
        batch["input_ids"],
        batch.get("attention_mask"),
        batch["labels"],
        chunk_tokens=chunk_tokens,
        ignore_index=IGNORE_INDEX,
        position_ids=batch.get("position_ids"),
    )
    return loss_sum / global_targets


@dataclass
class Job:
    """Everything a run is made of, built once by `build`; the loop functions of this file (and only they) advance
    it. `state` is the part a checkpoint saves and restores (train_state.py)."""

    cfg: Config
    env: DistEnv
    tokenizer: PreTrainedTokenizerBase
    dataset: TokenizedDataset
    batching: Batching
    sampler: GlobalBatchSampler
    engine: Engine
    model: nn.Module
    manager: CheckpointManager
    out_dir: Path
    state: TrainState
    start_step: int = 0
    resume_dir: Path | None = None
    last_saved: int = -1
    history: list[float] = field(default_factory=list)
    t0: float = field(default_factory=time.time)
    eval_dataset: TokenizedDataset | None = None  # the eval set, or None (dora_dist/evaluate.py)
    last_eval: int = -1
    last_eval_record: dict[str, Any] | None = None
    preempted: str | None = None  # the signal that stopped the run (preemption.py), None otherwise
    bad_streak: list[tuple[int, str]] = field(default_factory=list)  # (step, why) of the current skipped streak
    skipped_steps: list[int] = field(default_factory=list)
    checkpoint_owed: bool = False  # a checkpoint fell on a skipped step: take it at the next
    health: HealthMonitor | None = None  # DoRA's health in the log (health_log.py)

    @property
    def step(self) -> int:
        """Optimizer steps taken (skipped ones included): the TrainState's."""
        return self.state.step

    @property
    def stop_at(self) -> int:
        t = self.cfg.training
        return min(self.batching.max_steps, t.stop_after_steps) if t.stop_after_steps else self.batching.max_steps


def train(cfg: Config) -> dict:
    """Run the job described by `cfg`; returns a summary (rank 0 has the full one)."""
    quiet_third_party()
    # a pre-quantized checkpoint's bitsandbytes settings become the job's (models/prequantized.py), before any check
    cfg, notice = adopt_checkpoint_quantization(cfg)
    # what the config and this machine can tell, before any process group or model work; a checkpoint's contents
    # are read later, once, on rank 0 (_resume_point)
    preflight(cfg, checkpoint_contents=False)
    env = DistEnv.from_environ(device=cfg.training.device)
    if notice and env.is_main:
        print(notice, flush=True)
    try:
        # step_probe: off unless a benchmark sets DORA_DIST_COUNT_COMM / DORA_DIST_MEMORY_STEP
        with step_probe.probing(), PreemptionGuard() as guard:
            return _train(cfg, env, guard)
    except (UserError, JobFault):  # the group lives until the error is reported (a peer waiting on it would see
        # only a closed connection before the message)
        atexit.register(env.destroy)
        env = None
        raise
    finally:
        if env is not None:
            env.destroy()


def _train(cfg: Config, env: DistEnv, guard: PreemptionGuard) -> dict:
    prior = find_finished_run(cfg.output.dir)  # a finished run in output.dir: done, extend, or refuse
    if prior is not None and check_rerun(cfg, prior):
        return _already_finished(prior, env, cfg)
    try:
        job = build(cfg, env, prior)
    except RunAlreadyFinished as done:
        return _already_finished(done.prior, env, cfg)
    logger = make_loggers(cfg, job.out_dir, env.is_main, resume_step=job.start_step)  # metrics.jsonl + trackers
    bar = Console(job.batching.max_steps, job.start_step, env.is_main, cfg.output.progress_bar)  # bar: TTY only
    try:
        job.preempted = guard.stop_reason(env)  # signalled while loading: nothing new to save
        while job.step < job.stop_at and not job.preempted:
            rec = train_step(job)
            warning = _measure_health(job, rec)  # COLLECTIVE when due
            logger.log(rec)
            if rec.get("skipped"):  # stops the run at training.max_bad_steps in a row
                report_skipped_step(rec, job.bad_streak, cfg.training.max_bad_steps, env.is_main, bar.line)
            elif env.is_main and job.step % cfg.training.log_every == 0:
                bar.line(format_line(rec, job.batching.max_steps) + format_health(rec))
            if warning and env.is_main:
                bar.line(warning)
            bar.update(1)
            if job.eval_dataset is not None and eval_due(job.step, cfg.training.eval_every):
                _log_eval(job, logger, bar)
            maybe_checkpoint(job)
            if job.step < job.stop_at:  # all ranks stop after the same step (the last one just
                job.preempted = guard.stop_reason(env)  # finishes)
        if job.preempted:
            # whatever checkpoint.every_steps says, except inside a non-finite streak, whose last good state is the
            # latest checkpoint already (the skipped steps changed no parameter)
            if job.step != job.start_step and job.last_saved != job.step and not job.bad_streak:
                save_checkpoint(job)
            if env.is_main:
                bar.line(
                    stopped_line(
                        job.preempted, job.step, job.manager.final_dir(job.last_saved) if job.last_saved >= 0 else None
                    )
                )
            write_requeue_marker(job.step, job.preempted, job.out_dir, env.is_main)
        else:
            if job.eval_dataset is not None and job.last_eval != job.step:
                _log_eval(job, logger, bar)  # the final (or stopped-early) model
            if cfg.checkpoint.save_final and job.last_saved != job.step:
                save_checkpoint(job)
    finally:
        bar.close()
        logger.close()
    return finish(job)


def _measure_health(job: Job, rec: dict) -> str | None:
    """DoRA's health into the step's record when due (every rank: collective); the one-time warning text, if any."""
    health = job.health
    if health is None or not health.due(job.step, job.stop_at):
        return None
    rec.update(health.measure(job.engine, job.env, job.step))
    return health.check(job.step, rec)


def _log_eval(job: Job, logger: RunLoggers, bar: Console) -> None:
    rec = eval_and_keep_best(job)  # COLLECTIVE
    logger.log(rec)
    if job.env.is_main:
        bar.line(format_eval_line(rec, job.batching.max_steps))


def eval_and_keep_best(job: Job, loss_fn: Callable[..., torch.Tensor] | None = None) -> dict[str, Any]:
    """Evaluate now (loss_fn: default the training loss with its loss_chunk_tokens, same masking); a new best eval
    loss becomes the TrainState's, and with checkpoint.keep_best its adapter is exported to
    <output.dir>/adapter_best. Returns the metrics record ("best": True when that adapter was kept). COLLECTIVE."""
    if job.eval_dataset is None:
        raise ValueError("eval_and_keep_best: the job has no eval set")
    if loss_fn is None:
        loss_fn = functools.partial(micro_batch_loss, chunk_tokens=job.cfg.training.loss_chunk_tokens)
    batch_size = job.cfg.training.eval_batch_size or job.batching.micro_batch_size
    result = run_eval(job.model, job.eval_dataset, job.env, batch_size, job.step, loss_fn, job.cfg.parallel.tp)
    kept = False
    if job.state.improves(result.eval_loss):  # the same float on every rank: every rank decides alike
        job.state.best_eval = result.eval_loss
        if job.cfg.checkpoint.keep_best:
            best = {"step": result.step, "eval_loss": result.eval_loss}
            export_adapter(job.out_dir / "adapter_best", job.engine, job.env, job.cfg, job.tokenizer, best)
            kept = True
    rec = result.record(best=kept)
    job.last_eval, job.last_eval_record = job.step, rec
    return rec


def _already_finished(prior: PriorRun, env: DistEnv, cfg: Config) -> dict:
    if env.is_main:
        print(
            f"[dora_dist] output.dir={prior.out_dir} holds this run, finished ({prior.steps} steps"
            + (f"; adapter in {prior.out_dir / 'adapter'}" if (prior.out_dir / "adapter").is_dir() else "")
            + "): nothing to do. Raise training.max_steps to train further, or choose another output.dir.",
            flush=True,
        )
        changed = unused_changes(prior, cfg)
        if changed:
            print(
                f"[dora_dist] not used (the run is finished): {'; '.join(changed)}; to train with them, choose "
                "another output.dir",
                flush=True,
            )
    return dict(prior.summary, already_finished=True, preempted=False)


def _resume_point(
    cfg: Config, env: DistEnv, manager: CheckpointManager, engine: Engine
) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint to resume from (checkpoint.resume) and its COMPLETE record, checked against this job before
    any model work. Its files are read (sha256) once, by rank 0 (latest / verify), whose verdict every rank gets;
    the load that follows does not read them again."""
    from dora_dist.checkpoint import checkpoint_info

    resume = cfg.checkpoint.resume
    if resume == "none":
        return None, {}
    if resume == "auto":
        resume_dir = manager.latest()
        if resume_dir is None:
            return None, {}
    else:
        resume_dir = Path(resume)
        problem = manager.verify(resume_dir)  # preflight checked the cheap part (marker, sizes)
        if problem is not None:
            raise resume_error(resume_dir, problem)
    info = checkpoint_info(resume_dir)
    check_resume(resume_dir, info, cfg, engine, env.world_size)
    return resume_dir, info


def build(cfg: Config, env: DistEnv, prior: PriorRun | None = None) -> Job:
    """Data, batching, engine, resume point, model (loaded as the engine's plan says), adapters, resume state;
    prints the banner. `prior`: a finished run in output.dir that this job may extend (run_state.py)."""
    from dora_dist import models
    from dora_dist.checkpoint import CheckpointManager

    out_dir = Path(cfg.output.dir)
    tcfg = cfg.training
    torch.manual_seed(tcfg.seed)
    tokenizer = models.load_tokenizer(cfg, env)
    dataset, eval_dataset = build_datasets(cfg, tokenizer, env)
    dp_rank, dp_size = data_parallel_rank(cfg, env.rank, env.world_size)  # a tp group shares its batches
    batching = Batching.resolve(tcfg, dp_size, len(dataset))
    sampler = GlobalBatchSampler(
        len(dataset), batching.micro_batch_size, batching.grad_accum, dp_size, dp_rank, tcfg.seed
    )

    optimizer = adamw_factory(tcfg, batching.max_steps, env.device)  # the job's optimizer + LR policy (optim.py)
    engine = make_engine(cfg, env, batching, optimizer)
    ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out_dir / "checkpoints"
    manager = CheckpointManager(ckpt_root, cfg.checkpoint.keep_last, env)
    resume_dir, resume_info = _resume_point(cfg, env, manager, engine)
    if prior is not None and check_extension(prior, batching.max_steps, resume_info.get("step")):
        raise RunAlreadyFinished(prior)
    plan = engine.load_plan()
    with engine.model_init_context():
        model = models.load_model(cfg, env, plan)
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    models.add_adapters(model, cfg)  # drawn from training.seed: the same on every engine and world size
    if tcfg.compile:
        from dora_dist.compile import compile_for_engine

        compile_for_engine(model, engine.name)  # per decoder block, before the engine wraps the model
    trainable, total = models.count_parameters(model)
    model = engine.prepare(model)
    model.train()

    job = Job(
        cfg=cfg,
        env=env,
        tokenizer=tokenizer,
        dataset=dataset,
        batching=batching,
        sampler=sampler,
        engine=engine,
        model=model,
        manager=manager,
        out_dir=out_dir,
        state=TrainState(data=sampler),
        eval_dataset=eval_dataset,
        resume_dir=resume_dir,
        health=HealthMonitor.from_config(cfg),
    )
    if job.resume_dir is not None:
        saved = manager.load(engine, job.resume_dir)  # verified once already (_resume_point)
        engine.lr_from_schedule()  # this job's schedule, not the saved optimizer's lr
        job.state.load_state_dict(saved)  # step, data position, best eval loss
        job.start_step = job.last_saved = job.state.step

    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = keep_earlier_metrics(out_dir) if job.resume_dir is None else None
        if kept is not None:
            print(
                f"[dora_dist] no checkpoint in {manager.root}: starting from step 0; the earlier records of "
                f"{out_dir / 'metrics.jsonl'} are kept in {kept}",
                flush=True,
            )
        cfg.save(out_dir / "config.yaml")
        print(
            f"[dora_dist] engine={engine.name} world={env.world_size} device={env.device} "
            f"model={cfg.model.name_or_path} trainable={trainable:,}/{total:,} "
            f"({100 * trainable / max(1, total):.2f}%) samples={len(dataset)} "
            + (f"eval_samples={len(eval_dataset)} " if eval_dataset is not None else "")
            + f"{batching.describe()}"
            + (f" resumed_from={job.resume_dir}" if job.resume_dir else ""),
            flush=True,
        )
        if dataset.packing is not None:
            print(f"[dora_dist] {dataset.packing.describe()}", flush=True)
    return job


def train_step(job: Job) -> dict:
    """One optimizer step over the global batch (all micro-batches of this rank); returns its metrics record."""
    env, engine, dataset, sampler = job.env, job.engine, job.dataset, job.sampler
    step_probe.start_step(job.step)
    step_t0 = time.perf_counter()
    global_idx = sampler.global_indices(job.step)
    global_targets = dataset.n_targets(global_idx)
    global_tokens = sum(len(dataset.input_ids[i]) for i in global_idx)
    micro_batches = sampler.micro_batches(job.step)
    local_loss = torch.zeros((), dtype=torch.float64, device=env.device)
    for j, indices in enumerate(micro_batches):
        batch = {k: v.to(env.device, non_blocking=True) for k, v in dataset.collate(indices).items()}
        step_probe.note_batch(int(batch["input_ids"].numel()))
        with engine.accumulate(last=(j == len(micro_batches) - 1)):
            loss = micro_batch_loss(job.model, batch, global_targets, chunk_tokens=job.cfg.training.loss_chunk_tokens)
            engine.backward(loss)
        local_loss += loss.detach().double()
    # COLLECTIVE: one float (the global-batch mean loss); the tp ranks of a group each hold the same share
    step_loss = env.all_reduce_sum(local_loss) / job.cfg.parallel.tp
    loss_ok = math.isfinite(step_loss)
    lr = engine.current_lr()
    result = engine.guarded_step(loss_ok)  # COLLECTIVE; skips (no update, no LR tick) a non-finite step
    if result.stepped and not (loss_ok and math.isfinite(result.grad_norm)):
        raise applied_nonfinite_step(job.step + 1, step_loss, result.grad_norm, engine.name)
    job.state.step += 1
    sampler.step = job.step  # a skipped step's batch is consumed too: the data order is kept
    dt = time.perf_counter() - step_t0
    rec = {
        "step": job.step,
        "loss": step_loss,
        "lr": lr,
        "grad_norm": result.grad_norm,
        "tokens_per_s": global_tokens / dt,
        "step_time_s": dt,
        "peak_mem_bytes": engine.peak_memory_bytes(),
        "epoch": sampler.epoch_of(job.step),
        **step_probe.end_step(),
    }
    if result.stepped:
        job.history.append(step_loss)
        job.bad_streak = []
        return rec
    reason = skip_reason(step_loss, result.grad_norm, result.bad_param)
    job.bad_streak.append((job.step, reason))
    job.skipped_steps.append(job.step)
    return {**rec, "skipped": True, "skip_reason": reason, "bad_param": result.bad_param}


def save_checkpoint(job: Job) -> None:
    job.manager.save(job.engine, job.step, job.state.state_dict(), run=run_identity(job.cfg))
    job.last_saved = job.step
    job.checkpoint_owed = False


def maybe_checkpoint(job: Job) -> None:
    """Every checkpoint.every_steps, and at an early stop (training.stop_after_steps) when checkpointing is on.
    Never inside a streak of skipped steps (it may end in NonFiniteLossError: the last checkpoint then stays the
    last good one); one that falls there is taken at the next good step."""
    every = job.cfg.checkpoint.every_steps
    if not every:
        return
    due = job.step % every == 0 or (job.step == job.stop_at and job.stop_at < job.batching.max_steps)
    if job.bad_streak:
        job.checkpoint_owed = job.checkpoint_owed or due
    elif due or job.checkpoint_owed:
        save_checkpoint(job)


def finish(job: Job) -> dict:
    """Export the adapter (PEFT format) of a finished run, plot, write summary.json; close the engine."""
    cfg, env, engine, out_dir = job.cfg, job.env, job.engine, job.out_dir
    finished = job.step >= job.batching.max_steps
    summary = {
        "steps": job.step,
        "finished": finished,
        "preempted": job.preempted is not None,
        "stop_signal": job.preempted,
        "engine": engine.name,
        "world_size": env.world_size,
        "length": length_of(cfg),
        "batching": job.batching.to_dict(),
        "skipped_steps": job.skipped_steps,
        "packing": job.dataset.packing.to_dict() if job.dataset.packing is not None else None,
        "first_loss": job.history[0] if job.history else None,
        "last_loss": job.history[-1] if job.history else None,
        "wall_s": time.time() - job.t0,
    }
    health = job.health.summary() if job.health is not None else None
    if health is not None:
        summary["dora_health"] = health
    if job.eval_dataset is not None:
        summary.update(
            eval_samples=len(job.eval_dataset), best_eval_loss=job.state.best_eval, last_eval=job.last_eval_record
        )
    if finished and cfg.output.save_adapter:
        export_adapter(out_dir / "adapter", engine, env, cfg, job.tokenizer)  # COLLECTIVE
    if env.is_main:
        if cfg.output.plot and (out_dir / "metrics.jsonl").exists():
            plot_loss(out_dir / "metrics.jsonl", out_dir / "loss.png")
        summary = merge_summary(read_summary(out_dir), summary, job.start_step, first_logged_loss(out_dir))
        write_json_atomic(out_dir / "summary.json", summary)  # "finished": the run's completion mark
        print(
            f"[dora_dist] {'stopped' if job.preempted else 'done'}: {job.step} steps, loss "
            f"{summary['first_loss']} -> {summary['last_loss']}, {summary['wall_s']:.1f}s; outputs in {out_dir}",
            flush=True,
        )
    env.barrier()
    engine.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dora_dist.train",
        description="DoRA/QDoRA fine-tuning (1 process, or N under torchrun/deepspeed)",
    )
    parser.add_argument("--config", "-c", default=None, help="YAML config file (default: the built-in quickstart)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_entry_flags(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=1e-3 parallel.engine=fsdp2")
    args = parser.parse_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    try:
        return run_job(args.config, args.overrides, check_only=args.check)
    except (UserError, JobFault) as exc:  # one line from rank 0, exit 2 (bad input) or 1 everywhere; a bug
        return report_error(exc, args.debug)  # (any other exception) keeps its traceback
    except KeyboardInterrupt:  # a second Ctrl-C (or one before training started): stop now
        return interrupted_now(args.debug)


def add_entry_flags(parser) -> None:
    """--check and --debug, shared by `python -m dora_dist.train` and `dora-dist train`."""
    parser.add_argument(
        "--check",
        action="store_true",
        help="only load and validate the config for WORLD_SIZE "
        "processes (what the launch scripts run first), then exit",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an input error (also DORA_DIST_DEBUG=1)"
    )


def run_job(config: str | None, overrides: list[str], check_only: bool = False) -> int:
    """Load the config, then train (or, with check_only, only run the preflight checks)."""
    cfg = load_job_config(config, overrides)
    if check_only:
        preflight(cfg)
        return 0
    summary = train(cfg)
    return exit_code_of(summary)


if __name__ == "__main__":
    sys.exit(main())
