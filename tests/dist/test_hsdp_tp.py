"""HSDP composed with tensor parallelism: 8 gloo processes as dp_replicate=2 × dp_shard=2 × tp=2 (fsdp2 with
parallel.shard_group=2 and parallel.tp=2: the linears split over tp, the tp-local shards sharded inside each shard
group and replicated across the two groups). Float64: losses and the saved PEFT adapter equal a one-process run's to
1e-10 (the runs differ by reduction order, ~1e-16 per sum, which 2 AdamW steps cannot amplify past that), and the
collectives counted on each mesh dimension (tp, dp_shard, dp_replicate, dp) equal plan.comm's prediction on every
rank and step (tp's activation all-reduces for the padded batch each rank computed: the step probe's
padded_tokens). One torchrun launch of the real entry point (`python -m dora_dist.train`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from netutil import free_port  # noqa: E402

TOL = 1e-10
STEPS = 3  # the third step's batch on ranks 0-1 holds the corpus's short tail block (padded shorter)
WORLD = 8
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "reduce", "other")


def overrides(cache: str, out: Path, engine: str, *extra: str) -> list[str]:
    return [
        f"model.cache_dir={cache}",
        "data.seq_len=32",
        "data.synthetic_samples=120",
        "data.eval_fraction=0",
        f"training.max_steps={STEPS}",
        "training.global_batch_size=8",
        "training.micro_batch_size=1",
        "training.lr=5e-3",
        "training.warmup_steps=1",
        "model.dtype=float64",
        "dora.adapter_dtype=float64",
        "output.progress_bar=false",
        "output.plot=false",
        "checkpoint.resume=none",
        f"output.dir={out}",
        f"parallel.engine={engine}",
        *extra,
    ]


MESH = ("parallel.tp=2", "parallel.shard_group=2")


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{cmd[:4]} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("hsdp_tp")
    cache = str(tmp_path_factory.mktemp("cache"))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    _run([sys.executable, "-m", "dora_dist.train", *overrides(cache, work / "one", "none")], env)
    counted = dict(env, DORA_DIST_COUNT_COMM="1", DORA_DIST_COUNT_COMM_DIR=str(work / "comm"))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD)]
    launch += ["--master-port", str(free_port()), "-m", "dora_dist.train"]
    _run([*launch, *overrides(cache, work / "mesh", "fsdp2", *MESH)], counted)
    return work, cache


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "eval_loss" not in r}


def test_losses_and_adapter_equal_one_process(runs):
    from safetensors.torch import load_file

    work, _ = runs
    ref, got = losses(work / "one"), losses(work / "mesh")
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(got[step] - ref[step]) <= TOL, f"step {step}: {got[step]!r} vs one process {ref[step]!r}"
    want = load_file(str(work / "one" / "adapter" / "adapter_model.safetensors"))
    have = load_file(str(work / "mesh" / "adapter" / "adapter_model.safetensors"))
    assert sorted(have) == sorted(want)
    for key, t in want.items():
        assert have[key].shape == t.shape, key
        assert float((have[key] - t).abs().max()) <= TOL, key
    assert any(float(t.abs().max()) > 0 for k, t in have.items() if "lora_B" in k)  # it trained


def test_collectives_per_dimension_equal_prediction(runs):
    from dora_dist.config import load_config
    from dora_dist.parallel.mesh import MeshDims
    from dora_dist.plan.comm import bytes_by_dim, predict_collectives
    from dora_dist.plan.model_spec import model_spec

    work, cache = runs
    cfg = load_config(None, overrides(cache, work / "mesh", "fsdp2", *MESH))
    dims = MeshDims(dp_replicate=2, dp_shard=2, tp=2)
    spec = model_spec(cfg)
    full = bytes_by_dim(predict_collectives(cfg, spec, "fsdp2", WORLD, dims))
    assert {"tp", "dp_shard", "dp_replicate"} <= set(full)
    assert full["dp_replicate"]["all_reduce"] > 0 and full["tp"]["all_reduce"] > 0
    padded = set()
    for rank in range(WORLD):
        steps = json.loads((work / "comm" / f"comm_rank{rank}.json").read_text())["steps"]
        assert [s["step"] for s in steps][-1] == STEPS
        for got in steps:
            where = f"rank {rank} step {got['step']}"
            padded.add(got["padded_tokens"])
            predicted = bytes_by_dim(predict_collectives(cfg, spec, "fsdp2", WORLD, dims, got["padded_tokens"]))
            total = {k: sum(d.get(k, 0) for d in predicted.values()) for k in KINDS}
            assert {k: got[f"comm_{k}_bytes"] for k in KINDS} == total, where
            for dim in ("tp", "dp_shard", "dp_replicate"):
                assert {k: got.get(f"comm_{dim}_{k}_bytes", 0) for k in KINDS} == predicted[dim], f"{where} {dim}"
    assert len(padded) > 1  # full blocks and the short one: the prediction followed the batch shapes
