"""The training job. `python -m dora_dist.train [--config F] [key=value ...]`, alone or under torchrun / the
deepspeed launcher; `dora-dist train ...` is the same.

Everything engine-specific lives behind `dora_dist.parallel.base.Engine`; this file has no engine branches.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from dora_dist.config import Config, load_job_config
from dora_dist.data import IGNORE_INDEX, GlobalBatchSampler, build_dataset
from dora_dist.losses import DEFAULT_CHUNK_TOKENS, causal_lm_loss_sum
from dora_dist.metrics import MetricsLogger, format_line, plot_loss
from dora_dist.parallel import DistEnv, make_engine

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class NonFiniteLossError(FloatingPointError):
    pass


def resolve_batching(cfg: Config, world: int, n_samples: int) -> None:
    """Fill training.grad_accum (from global_batch_size) and training.max_steps (from epochs) in place."""
    t = cfg.training
    if t.global_batch_size:
        per_step = t.micro_batch_size * world
        if t.global_batch_size % per_step:
            raise ValueError(f"training.global_batch_size={t.global_batch_size} is not a multiple of "
                             f"micro_batch_size × world_size = {t.micro_batch_size} × {world}")
        t.grad_accum = t.global_batch_size // per_step
    else:
        t.global_batch_size = t.micro_batch_size * t.grad_accum * world
    if not t.max_steps:
        t.max_steps = max(1, int(t.epochs * n_samples // t.global_batch_size))


def micro_batch_loss(model, batch: dict[str, torch.Tensor], global_targets: int,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Sum of next-token losses of this micro-batch / target tokens of the whole global batch (see Engine).
    lm_head + cross-entropy run over chunks of `chunk_tokens` tokens (0: whole fp32 logits), see losses.py."""
    loss_sum = causal_lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                  chunk_tokens=chunk_tokens, ignore_index=IGNORE_INDEX)
    return loss_sum / global_targets


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train", file=sys.stderr)


def train(cfg: Config) -> dict:
    """Run the job described by `cfg`; returns a summary (rank 0 has the full one)."""
    env = DistEnv.from_environ(device=cfg.training.device)
    try:
        return _train(cfg, env)
    finally:
        env.destroy()


def _train(cfg: Config, env: DistEnv) -> dict:
    from dora_dist import models
    from dora_dist.checkpoint import CheckpointManager

    t0 = time.time()
    main = env.is_main
    out_dir = Path(cfg.output.dir)
    torch.manual_seed(cfg.training.seed)

    # --- data ------------------------------------------------------------------------------------------
    tokenizer = models.load_tokenizer(cfg, env)
    dataset = build_dataset(cfg, tokenizer, env)
    resolve_batching(cfg, env.world_size, len(dataset))
    tcfg = cfg.training
    sampler = GlobalBatchSampler(len(dataset), tcfg.micro_batch_size, tcfg.grad_accum, env.world_size, env.rank,
                                 tcfg.seed)

    # --- model + engine ------------------------------------------------------------------------------------
    engine = make_engine(cfg, env)
    with engine.model_init_context():
        model = models.load_model(cfg, env, device=engine.load_device())
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(tcfg.seed)  # adapter init (lora_A) identical on every rank and for any world size
    models.add_adapters(model, cfg)
    if tcfg.compile:
        from dora_dist.compile import compile_for_engine

        compile_for_engine(model, engine.name)  # per decoder block, before the engine wraps the model
    trainable, total = models.count_parameters(model)
    model = engine.prepare(model)
    model.train()

    # --- resume ----------------------------------------------------------------------------------------
    ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out_dir / "checkpoints"
    manager = CheckpointManager(ckpt_root, cfg.checkpoint.keep_last, env)
    start_step = 0
    resume = cfg.checkpoint.resume
    resume_dir = manager.latest() if resume == "auto" else (None if resume == "none" else Path(resume))
    if resume_dir is not None:
        extra = manager.load(engine, resume_dir)
        sampler.load_state_dict(extra["data"])
        start_step = int(extra["step"])

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")
        print(f"[dora_dist] engine={engine.name} world={env.world_size} device={env.device} "
              f"model={cfg.model.name_or_path} trainable={trainable:,}/{total:,} "
              f"({100 * trainable / max(1, total):.2f}%) samples={len(dataset)} global_batch={tcfg.global_batch_size}"
              f" (micro {tcfg.micro_batch_size} × accum {tcfg.grad_accum} × world {env.world_size}) "
              f"steps={tcfg.max_steps}" + (f" resumed_from={resume_dir}" if resume_dir else ""), flush=True)
    logger = MetricsLogger(out_dir, main, resume_step=start_step)
    bar = _progress(tcfg.max_steps, start_step, main and cfg.output.progress_bar)

    # --- loop ------------------------------------------------------------------------------------------
    stop_at = tcfg.max_steps if not tcfg.stop_after_steps else min(tcfg.max_steps, tcfg.stop_after_steps)
    every = cfg.checkpoint.every_steps
    history: list[float] = []
    last_saved = start_step if resume_dir is not None else -1
    step = start_step
    try:
        while step < stop_at:
            step_t0 = time.perf_counter()
            global_idx = sampler.global_indices(step)
            global_targets = dataset.n_targets(global_idx)
            global_tokens = sum(len(dataset.input_ids[i]) for i in global_idx)
            micro_batches = sampler.micro_batches(step)
            local_loss = torch.zeros((), dtype=torch.float64, device=env.device)
            for j, indices in enumerate(micro_batches):
                batch = {k: v.to(env.device, non_blocking=True) for k, v in dataset.collate(indices).items()}
                with engine.accumulate(last=(j == len(micro_batches) - 1)):
                    loss = micro_batch_loss(model, batch, global_targets, chunk_tokens=tcfg.loss_chunk_tokens)
                    engine.backward(loss)
                local_loss += loss.detach().double()
            step_loss = env.all_reduce_sum(local_loss)  # COLLECTIVE: one float (the global-batch mean loss)
            if not math.isfinite(step_loss):
                raise NonFiniteLossError(
                    f"loss is {step_loss} at step {step + 1}; stopping before the optimizer step (no checkpoint is "
                    "written for this step). Lower training.lr, enable clipping or check the data.")
            lr = engine.current_lr()
            grad_norm = engine.step()
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {step + 1}; stopping (no checkpoint "
                                         "is written for this step)")
            step += 1
            sampler.step = step
            dt = time.perf_counter() - step_t0
            history.append(step_loss)
            rec = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": global_tokens / dt, "step_time_s": dt,
                   "peak_mem_bytes": engine.peak_memory_bytes(), "epoch": sampler.epoch_of(step)}
            logger.log(rec)
            if main and step % tcfg.log_every == 0:
                bar.write(format_line(rec, tcfg.max_steps), file=sys.stdout)
                sys.stdout.flush()
            bar.update(1)
            if (every and step % every == 0) or (step == stop_at and stop_at < tcfg.max_steps and every):
                manager.save(engine, step, {"step": step, "data": sampler.state_dict()})
                last_saved = step
        if cfg.checkpoint.save_final and last_saved != step:
            manager.save(engine, step, {"step": step, "data": sampler.state_dict()})
    finally:
        bar.close()

    finished = step >= tcfg.max_steps
    # --- outputs ---------------------------------------------------------------------------------------
    summary = {"steps": step, "finished": finished, "engine": engine.name, "world_size": env.world_size,
               "first_loss": history[0] if history else None, "last_loss": history[-1] if history else None,
               "wall_s": time.time() - t0}
    if finished and cfg.output.save_adapter:
        state = engine.adapter_state_dict()  # all ranks take part; full tensors on rank 0
        if main:
            from dora_dist.adapters import save_adapter

            save_adapter(engine.unwrap(), out_dir / "adapter", state_dict=state,
                         base_model_name_or_path=models.resolve_model_path(cfg, env))
            tokenizer.save_pretrained(out_dir / "adapter")
    if main:
        if cfg.output.plot and (out_dir / "metrics.jsonl").exists():
            plot_loss(out_dir / "metrics.jsonl", out_dir / "loss.png")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"[dora_dist] done: {step} steps, loss {summary['first_loss']} -> {summary['last_loss']}, "
              f"{summary['wall_s']:.1f}s; outputs in {out_dir}", flush=True)
    env.barrier()
    engine.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dora_dist.train",
                                     description="DoRA/QDoRA fine-tuning (1 process, or N under torchrun/deepspeed)")
    parser.add_argument("--config", "-c", default=None, help="YAML config file (default: the built-in quickstart)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=1e-3 parallel.engine=fsdp2")
    args = parser.parse_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    from dora_dist.config import ConfigError

    try:
        cfg = load_job_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"dora_dist.train: error: {exc}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
