"""Validation: config checks, the held-out split, rank shares, the eval loss against a direct computation, and a
short single-process run that logs eval records, plots them and keeps the best adapter."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dora_dist.config import ConfigError, load_config
from dora_dist.data import IGNORE_INDEX, TokenizedDataset, split_eval_indices
from dora_dist.evaluate import eval_batches, eval_shard, evaluate
from dora_dist.parallel.dist_env import DistEnv


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.eval_fraction=1.0"], "data.eval_fraction: must be in"),
        (["data.eval_fraction=0.1", "data.eval_source=x.jsonl"], "set one of them"),
        (["training.eval_every=5"], "training.eval_every=5 needs an eval set"),
        (["checkpoint.keep_best=true"], "checkpoint.keep_best=True needs an eval set"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_config_accepts_eval_keys():
    cfg = load_config(None, ["data.eval_fraction=0.05", "training.eval_every=10", "checkpoint.keep_best=true"])
    assert cfg.data.eval_fraction == 0.05 and cfg.training.eval_every == 10


def test_split_is_seeded_disjoint_and_complete():
    train, held = split_eval_indices(100, 0.1, seed=42)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held) == list(range(100))
    assert split_eval_indices(100, 0.1, seed=42) == (train, held)
    assert split_eval_indices(100, 0.1, seed=43)[1] != held
    assert len(split_eval_indices(5, 0.01, 0)[1]) == 1  # at least one eval example
    assert len(split_eval_indices(2, 0.9, 0)[0]) == 1  # at least one training example


@pytest.mark.parametrize("n, world, bs", [(7, 2, 3), (1, 2, 4), (10, 3, 1), (5, 1, 2), (16, 4, 3)])
def test_rank_shares_cover_the_set_with_equal_forwards(n, world, bs):
    seen, forwards = [], set()
    for rank in range(world):
        share = eval_shard(n, rank, world)
        batches, n_fwd = eval_batches(n, rank, world, bs)
        assert [i for b in batches for i in b] == list(share)
        assert len(batches) <= n_fwd and all(0 < len(b) <= bs for b in batches)
        forwards.add(n_fwd)
        seen += list(share)
    assert sorted(seen) == list(range(n)) and len(forwards) == 1


def tiny_dataset(seed: int = 0) -> TokenizedDataset:
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for length in (5, 9, 3, 12, 7):
        x = torch.randint(1, 50, (length,), generator=g).tolist()
        lab = list(x)
        lab[: length // 3] = [IGNORE_INDEX] * (length // 3)  # a masked prompt, as prompt_completion data
        ids.append(x)
        labels.append(lab)
    targets = [sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in labels]
    return TokenizedDataset(ids, labels, targets, "prompt_completion", 0)


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).double().train()


def test_eval_loss_is_the_masked_mean_token_loss():
    model, ds = tiny_model(), tiny_dataset()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, lab in zip(ds.input_ids, ds.labels, strict=True):
            logits = model.eval()(input_ids=torch.tensor([x])).logits[0, :-1]
            total += float(F.cross_entropy(logits, torch.tensor(lab[1:]), ignore_index=IGNORE_INDEX, reduction="sum"))
            count += sum(1 for t in lab[1:] if t != IGNORE_INDEX)
    model.train()
    res = evaluate(model, ds, DistEnv(), batch_size=2)
    assert model.training  # the mode is restored
    assert res["eval_tokens"] == count
    # float64 model: padding and batching change only the summation order
    assert res["eval_loss"] == pytest.approx(total / count, rel=1e-12)
    assert res["eval_ppl"] == pytest.approx(math.exp(total / count), rel=1e-12)
    assert evaluate(model, ds, DistEnv(), batch_size=5)["eval_loss"] == pytest.approx(res["eval_loss"], rel=1e-12)


def test_run_logs_eval_records_and_keeps_best(builtin_cache, tmp_path):
    from dora_dist.metrics import read_metrics
    from dora_dist.train import train

    out = tmp_path / "run"
    has_tb = importlib.util.find_spec("tensorboard") is not None
    loggers = "[jsonl,tensorboard]" if has_tb else "[jsonl]"
    summary = train(
        load_config(
            None,
            [
                f"output.loggers={loggers}",
                f"model.cache_dir={builtin_cache}",
                "data.seq_len=32",
                "data.synthetic_samples=80",
                "data.eval_fraction=0.1",
                "training.eval_every=2",
                "training.max_steps=3",
                "training.micro_batch_size=2",
                "training.global_batch_size=4",
                "training.lr=5e-3",
                "output.progress_bar=false",
                "checkpoint.resume=none",
                "checkpoint.keep_best=true",
                f"output.dir={out}",
            ],
        )
    )
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps, and at the end
    for r in evals:
        assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12)
    best = min(r["eval_loss"] for r in evals)
    assert summary["best_eval_loss"] == best
    saved = json.loads((out / "adapter_best" / "eval.json").read_text())
    assert saved["eval_loss"] == best
    assert (out / "adapter_best" / "adapter_model.safetensors").is_file()
    assert (out / "adapter_best" / "tokenizer_config.json").is_file()
    assert (out / "loss.png").stat().st_size > 0
    if has_tb:  # the trackers get the eval records too
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tensorboard")).Reload()
        assert [e.step for e in acc.Scalars("eval/loss")] == [2, 3]
        assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


def test_default_eval_loss_is_the_training_loss():
    """masked_loss_sum (evaluate's default) == the trainer's micro_batch_loss with denominator 1."""
    from dora_dist.evaluate import masked_loss_sum
    from dora_dist.train import micro_batch_loss

    model, ds = tiny_model().eval(), tiny_dataset(1)
    batch = ds.collate([0, 1, 3])
    with torch.no_grad():
        assert float(masked_loss_sum(model, batch)) == pytest.approx(
            float(micro_batch_loss(model, batch, 1)), rel=1e-12
        )
