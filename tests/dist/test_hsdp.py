"""FSDP2 HSDP (issue 23): 4 real gloo processes as 2 shard groups × 2, in both launch forms, equal one process.

- the plain 4-rank form (one torchrun, parallel.shard_group=2; tests/dist/hsdp_worker.py runs every case in one
  launch): float64 dense and fp32 NF4 bases give the one-process losses and adapters; DCP checkpoints move between
  HSDP, flat FSDP2, DDP and one process both ways with the same losses; the magnitude init, DoRA's health metrics,
  CPU offload and training.compile under HSDP;
- two torchrun agents through launch/multinode.sh on loopback (2 "nodes" × 2 processes, shard_group left at auto,
  which makes one node's processes a shard group): the one-process losses and adapter;
- in both, the bytes counted per mesh dimension (inside a shard group, across groups) on every step and rank equal
  the planner's prediction (plan/comm.py), and across groups only the gradient shards travel, once per step
  although every step has 2 micro-steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dora_dist.config import load_config
from dora_dist.metrics import read_metrics

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from engine_worker import QDORA  # noqa: E402
from hsdp_worker import HSDP, RESUMES, ckpt_dir, overrides, resumed  # noqa: E402
from netutil import free_port, run_workers  # noqa: E402
from test_engines import adamw_drift_bound, assert_same_adapter  # noqa: E402

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "reduce", "other")


def single_run(out: Path, cfg_overrides: list[str]) -> dict:
    from safetensors.torch import load_file

    from dora_dist.train import train

    train(load_config(None, cfg_overrides))
    recs = read_metrics(out)
    return {
        "steps": [r["step"] for r in recs],
        "losses": [r["loss"] for r in recs],
        "grad_norms": [r["grad_norm"] for r in recs],
        "lrs": [r["lr"] for r in recs],
        "adapter": load_file(str(out / "adapter" / "adapter_model.safetensors")),
        "health": {k: v for k, v in recs[-1].items() if k.startswith("dora_")},
        "out": out,
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hsdp")


@pytest.fixture(scope="module")
def cache(builtin_cache):
    return str(builtin_cache)


@pytest.fixture(scope="module")
def reference(workdir, cache):
    """One process (engine none), float64, checkpointing at step 2 (HSDP resumes that checkpoint)."""
    out = workdir / "single"
    return single_run(out, overrides(cache, out, "parallel.engine=none", "checkpoint.every_steps=2"))


@pytest.fixture(scope="module")
def reference_nf4(workdir, cache):
    out = workdir / "single_nf4"
    return single_run(out, overrides(cache, out, "parallel.engine=none", *QDORA))


@pytest.fixture(scope="module")
def results(workdir, cache, reference):
    out = workdir / "results.json"
    single_ckpt = str(ckpt_dir(workdir, "single", 2))
    args = ["--workdir", str(workdir), "--cache", cache, "--out", str(out), "--single-ckpt", single_ckpt]
    run_workers(Path(__file__).with_name("hsdp_worker.py"), args, out, nproc=4)
    return json.loads(out.read_text())


def counted_steps(probe: Path, rank: int) -> list[dict]:
    return json.loads((probe / f"comm_rank{rank}.json").read_text())["steps"]


def check_counts_equal_prediction(probe: Path, cfg, local_world: int | None, steps: int) -> dict:
    """Every rank's bytes on every step, per kind in total and per mesh dimension, equal plan/comm.py's
    prediction for the mesh resolve_dims makes of the config on 4 processes, `local_world` per node."""
    from dora_dist.parallel.mesh import resolve_dims
    from dora_dist.plan.comm import bytes_by_dim, bytes_by_kind, predict_collectives
    from dora_dist.plan.model_spec import model_spec

    dims = resolve_dims(cfg, 4, local_world, "fsdp2")
    assert (dims.dp_replicate, dims.dp_shard) == (2, 2)
    colls = predict_collectives(cfg, model_spec(cfg), "fsdp2", 4, dims)
    total, by_dim = bytes_by_kind(colls), bytes_by_dim(colls)
    for rank in range(4):
        got_steps = counted_steps(probe, rank)
        assert [s["step"] for s in got_steps] == list(range(1, steps + 1))
        for got in got_steps:
            where = f"rank {rank} step {got['step']}"
            assert {k: got[f"comm_{k}_bytes"] for k in KINDS} == total, where
            for dim in ("dp_shard", "dp_replicate"):
                counted = {k: got.get(f"comm_{dim}_{k}_bytes", 0) for k in KINDS}
                assert counted == by_dim[dim], f"{where} {dim}: counted {counted}, predicted {by_dim[dim]}"
    return by_dim


def test_hsdp_dense_float64_equals_one_process(results, reference):
    res = results["hsdp"]
    assert res["steps"] == [1, 2, 3, 4]
    assert res["losses"] == pytest.approx(reference["losses"], rel=1e-12, abs=1e-12)
    assert res["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-10, abs=1e-12)
    assert_same_adapter(res["adapter"], reference["adapter"])
    # DoRA's health metrics (dora_row_views: the rows of the first shard group, lora_A gathered inside groups)
    assert res["health"].keys() == reference["health"].keys() and len(res["health"]) > 4
    assert res["health"] == pytest.approx(reference["health"], rel=1e-9, abs=1e-12)


def test_hsdp_nf4_equals_one_process(results, reference_nf4):
    """fp32 (bitsandbytes has no fp64): losses to fp32 rounding, the adapter within AdamW's drift bound."""
    res = results["hsdp_nf4"]
    assert res["steps"] == [1, 2, 3]
    assert res["losses"] == pytest.approx(reference_nf4["losses"], rel=1e-5, abs=1e-6)
    assert res["grad_norms"] == pytest.approx(reference_nf4["grad_norms"], rel=1e-4, abs=1e-6)
    bound = adamw_drift_bound(reference_nf4["lrs"])
    assert_same_adapter(res["adapter"], reference_nf4["adapter"], rtol=0, atol=bound)


@pytest.mark.parametrize(("name", "extra", "steps"), [("hsdp", [], 4), ("hsdp_nf4", QDORA, 3)])
def test_counted_bytes_per_dimension_equal_prediction(results, workdir, cache, name, extra, steps):
    by_dim = check_counts_equal_prediction(
        workdir / name / "probe", load_config(None, overrides(cache, workdir / name, *HSDP, *extra)), None, steps
    )
    # across groups: only the all-reduce of the reduce-scattered gradient shards (half of a 2-rank reduce-scatter),
    # once per step although gas = 2: nothing crosses a group on the first micro-step
    across = by_dim["dp_replicate"]
    assert across["all_reduce"] * 2 == by_dim["dp_shard"]["reduce_scatter"] > 0
    assert sum(across.values()) == across["all_reduce"]


@pytest.mark.parametrize("name", list(RESUMES))
def test_checkpoints_cross_hsdp_flat_ddp_and_one_process(results, reference, name):
    """A DCP checkpoint of one mesh resumed on another continues with the uninterrupted one-process losses."""
    res = results[name]
    first = RESUMES[name][1][1] + 1 if RESUMES[name][1] != "single" else 3
    assert res["steps"] == list(range(first, 5))
    assert res["losses"] == pytest.approx(reference["losses"][first - 1 :], rel=1e-12, abs=1e-12)
    assert_same_adapter(res["adapter"], reference["adapter"])


def test_hsdp_compiled_blocks_match_eager_one_process(results, reference):
    """training.compile=true under HSDP: the eager one-process losses, reassociated by inductor (as
    test_engines.test_compiled_blocks_match_eager_single_process: rel 1e-4 over 2 steps)."""
    if "hsdp_compile" not in results:
        pytest.skip("inductor's CPU backend needs a C++ compiler (g++/clang++)")
    res = results["hsdp_compile"]
    assert res["steps"] == [1, 2]
    assert res["losses"] == pytest.approx(reference["losses"][:2], rel=1e-4, abs=1e-6)
    assert res["grad_norms"] == pytest.approx(reference["grad_norms"][:2], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize(("key", "layers"), [("magnitude", 14), ("magnitude_gpt2", 8)])
def test_hsdp_magnitude_init_equals_one_process(results, key, layers):
    """From each rank's rows inside its shard group (lora_B != 0, uneven shards of the 99-wide MLP); GPT-2's Conv1D
    bases gather one layer inside the group. down_proj (64 rows) holds 32 rows a rank: sharded over a group of 2,
    not over all 4 ranks."""
    mag = results[key]
    assert mag["n_layers"] == layers
    assert mag["magnitude_max_rel_err"] < 1e-6
    assert mag["rowsq_max_err"] < 1e-4
    assert mag["forward_max_err"] < 1e-5
    if key == "magnitude":
        assert mag["probe_local_rows"] == 32


def test_one_process_resumes_hsdp_checkpoint(results, workdir, cache, reference):
    out = workdir / "single_from_hsdp"
    res = single_run(out, resumed(cache, out, ckpt_dir(workdir, "hsdp", 2), "parallel.engine=none"))
    assert res["steps"] == [3, 4]
    assert res["losses"] == pytest.approx(reference["losses"][2:], rel=1e-12, abs=1e-12)
    assert_same_adapter(str(out / "adapter"), reference["adapter"])


def test_two_agents_through_multinode_launcher(workdir, cache, reference):
    """launch/multinode.sh twice (NODE_RANK 0 and 1, 2 processes each) on loopback with the one-process run's own
    saved config: shard_group auto = one node's 2 processes, so the mesh is HSDP 2 × 2 across the 2 "nodes"."""
    out = workdir / "multinode"
    keys = [f"output.dir={out}", "parallel.engine=fsdp2", "parallel.shard_group=0", "checkpoint.every_steps=0"]
    port = str(free_port())
    env = dict(os.environ, NNODES="2", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
               RDZV_ID=f"hsdp{port}", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               DORA_DIST_COUNT_COMM="1", DORA_DIST_COUNT_COMM_DIR=str(out / "probe"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip
    cmd = ["bash", str(ROOT / "launch" / "multinode.sh"), "--config", str(reference["out"] / "config.yaml"), *keys]
    logs = [workdir / f"node{node}.log" for node in (0, 1)]  # files, not pipes: neither agent blocks on output
    agents = []
    for node, log in enumerate(logs):
        with log.open("w") as f:
            agents.append(subprocess.Popen(cmd, cwd=ROOT, env=dict(env, NODE_RANK=str(node)), stdout=f, stderr=f))
    codes = [a.wait(timeout=600) for a in agents]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    recs = read_metrics(out)
    assert [r["loss"] for r in recs] == pytest.approx(reference["losses"], rel=1e-12, abs=1e-12)
    assert_same_adapter(str(out / "adapter"), reference["adapter"])
    check_counts_equal_prediction(out / "probe", load_config(str(out / "config.yaml"), []), 2, 4)
