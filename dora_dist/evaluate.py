"""Validation: eval loss and perplexity over the whole eval set, under any engine.

Each rank evaluates a contiguous share of the eval set (`eval_shard`), in batches of `training.eval_batch_size`.
Every rank runs the same number of forwards, because under FSDP2 and ZeRO-3 a forward is a collective (the
parameters are gathered layer by layer); a rank whose share has fewer batches runs a padding forward whose
result is dropped. The loss is the training loss with the same masking: the trainer passes its own
`micro_batch_loss` (with a denominator of 1: the sum of next-token losses over the label positions that are not
IGNORE_INDEX); `masked_loss_sum` below is the same sum for callers without a trainer. Summed per batch in float64;
the token-loss sum and the target count of all ranks are all-reduced together as float64, so the result does not
depend on the world size beyond the reduction order (1e-12 relative for fp64 models).

    eval_loss = Σ token losses / Σ target tokens,  eval_ppl = exp(eval_loss)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from dora_dist.dist_env import DistEnv


def eval_shard(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of n samples: shares differ by at most one sample and cover [0, n)."""
    return range(rank * n // world, (rank + 1) * n // world)


def eval_batches(n: int, rank: int, world: int, batch_size: int) -> tuple[list[list[int]], int]:
    """(this rank's batches of indices, the number of forwards every rank must run)."""
    share = list(eval_shard(n, rank, world))
    batches = [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
    longest = math.ceil(math.ceil(n / world) / batch_size)
    return batches, longest


def masked_loss_sum(model, batch: dict[str, torch.Tensor], denominator: int = 1) -> torch.Tensor:
    """Sum of next-token cross-entropies over labels that are not IGNORE_INDEX, / denominator (≥ fp32)."""
    import torch.nn.functional as F

    from dora_dist.data import IGNORE_INDEX
    from dora_dist.losses import packed_forward_kwargs

    logits = model(**packed_forward_kwargs(model, batch)).logits
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss / denominator


@torch.no_grad()
def evaluate(
    model, dataset, env: DistEnv, batch_size: int, loss_fn: Callable = masked_loss_sum, tp: int = 1
) -> dict[str, float]:
    """{"eval_loss", "eval_ppl", "eval_tokens"} over all of `dataset`; loss_fn(model, batch, 1) is the batch's
    token-loss sum. COLLECTIVE: every rank calls it (with the same dataset); forwards per rank are equal; one
    all-reduce of two float64 numbers."""
    # the ranks of a tensor-parallel group (tp consecutive ranks) evaluate the same batches together
    batches, n_forwards = eval_batches(len(dataset), env.rank // tp, env.world_size // tp, batch_size)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    count = 0
    try:
        for j in range(n_forwards):
            indices = batches[j] if j < len(batches) else [0]  # padding forward: result dropped
            batch = {k: v.to(env.device) for k, v in dataset.collate(indices).items()}
            loss = loss_fn(model, batch, 1)  # sum of the batch's token losses
            if j < len(batches):
                loss_sum += loss.double()
                count += dataset.n_targets(indices)
    finally:
        model.train(was_training)
    totals = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=env.device)]) / tp
    if env.distributed:
        dist.all_reduce(totals)  # COLLECTIVE: 2 float64
    total_loss, total_count = float(totals[0]), float(totals[1])
    mean = total_loss / total_count if total_count else float("nan")
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 709.0)), "eval_tokens": int(total_count)}


def eval_due(step: int, every: int) -> bool:
    """An eval falls on `step` (training.eval_every; 0: never)."""
    return bool(every) and step % every == 0


@dataclass(frozen=True)
class EvalResult:
    """One evaluation of the model at a step: what `run_eval` measured. The training loop decides what follows
    from it (a new best adapter, the log line); `record` is its metrics.jsonl entry."""

    step: int
    eval_loss: float
    eval_ppl: float
    eval_tokens: int
    eval_time_s: float

    def record(self, best: bool = False) -> dict[str, Any]:
        """{"step", "eval_loss", "eval_ppl", "eval_tokens", "eval_time_s"}, plus "best": True when this eval's
        adapter was kept as the best."""
        rec: dict[str, Any] = asdict(self)
        if best:
            rec["best"] = True
        return rec


def run_eval(
    model, dataset, env: DistEnv, batch_size: int, step: int, loss_fn: Callable = masked_loss_sum, tp: int = 1
) -> EvalResult:
    """Evaluate `model` on all of `dataset` now (loss_fn: the trainer's micro_batch_loss), timed. COLLECTIVE (all
    ranks); changes nothing but the model's train/eval mode, which it restores."""
    import time

    t0 = time.perf_counter()
    res = evaluate(model, dataset, env, batch_size, loss_fn, tp)
    return EvalResult(step, res["eval_loss"], res["eval_ppl"], int(res["eval_tokens"]), time.perf_counter() - t0)


def format_eval_line(rec: dict, max_steps: int) -> str:
    return (
        f"eval  {rec['step']:>5}/{max_steps}  eval_loss {rec['eval_loss']:.4f}  eval_ppl {rec['eval_ppl']:.3f}  "
        f"tokens {rec['eval_tokens']}" + ("  (best, saved)" if rec.get("best") else "")
    )
