"""ZeRO-3 with ZeRO++ hierarchical partitioning (hpZ) on 4 real gloo processes as 2 "nodes" × 2.

One launch: two deepspeed launchers on the loopback, one per "node" of a two-host hostfile (`deepspeed --hostfile
--no_ssh --node_rank k`, the multi-node form launch/deepspeed.sh runs without ssh), so each rank sees the node layout
(LOCAL_SIZE=2) the way a real two-node job does and parallel.shard_group=0 resolves to one node's 2 processes. The
worker (zero_hpz_worker.py) trains through the real trainer; this module compares with one process:

- losses, gradient norms and the saved adapter equal one process on the same global batch (fp32: DeepSpeed's
  ZeRO-3 reduce-scatters gradients in fp16/bf16/fp32 only, so no float64 run: the losses to fp32 rounding and the
  adapter within the AdamW drift bound, as the other fp32 engine-parity tests);
- the collective bytes counted per mesh dimension (inside a shard group: dp_shard; over all ranks: dp) equal the
  projection's (plan/comm.py) for both dimensions, at a persistence threshold that puts adapters both among the
  per-layer gathers and among the parameters kept whole;
- the engine alone: DeepSpeed's hpZ groups are the nodes, the magnitude init's all-reduce stays inside them;
- the step-2 DeepSpeed checkpoint of the hpZ run resumes on a flat ZeRO-3 run at the same world size with the
  uninterrupted run's losses;
- parallel.cpu_offload=true with hpZ trains the same steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from netutil import free_port  # noqa: E402
from zero_hpz_worker import HPZ, PERSISTENCE, STEPS, overrides  # noqa: E402

from dora_dist.config import load_config  # noqa: E402
from dora_dist.parallel.mesh import resolve_dims  # noqa: E402

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "reduce", "other")


def launch_two_nodes(workdir: Path, cache: str, timeout: int = 480) -> None:
    """Both "nodes" of the hostfile started at once on this machine, as `deepspeed --no_ssh` does on real ones."""
    exe = shutil.which("deepspeed")
    if exe is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    hostfile = workdir / "hostfile"
    hostfile.write_text("localhost slots=2\n127.0.0.1 slots=2\n")
    port = str(free_port())
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        DS_BUILD_OPS="0",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("LOCAL_WORLD_SIZE", None)
    worker = str(Path(__file__).with_name("zero_hpz_worker.py"))
    procs = []
    for node in (0, 1):
        cmd = [exe, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1",
               "--master_port", port, worker, "--workdir", str(workdir), "--cache", cache]  # fmt: skip
        log = open(workdir / f"node{node}.log", "w")  # noqa: SIM115  (closed below)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((proc, log))
    deadline, codes = time.monotonic() + timeout, []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        codes.append("timeout")
    finally:  # nothing outlives the test: each launcher's session (its ranks included) is stopped
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    if any(codes):
        tails = "\n".join((workdir / f"node{n}.log").read_text()[-5000:] for n in (0, 1))
        pytest.fail(f"deepspeed two-node launch failed (exit codes {codes}):\n{tails}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, builtin_cache):
    work = tmp_path_factory.mktemp("hpz")
    launch_two_nodes(work, str(builtin_cache))
    return work


@pytest.fixture(scope="module")
def reference(tmp_path_factory, builtin_cache):
    """One process on the whole global batch (in this process: no launcher variables)."""
    from dora_dist.config import load_config
    from dora_dist.metrics import read_metrics
    from dora_dist.train import train

    out = tmp_path_factory.mktemp("hpz_single")
    train(load_config(None, overrides(str(builtin_cache), str(out), ["parallel.engine=none"])))
    return out, read_metrics(out)


def records(run: Path) -> list[dict]:
    from dora_dist.metrics import read_metrics

    return read_metrics(run)


def assert_adapter_close(path: Path, ref: Path, atol: float) -> None:
    import torch
    from safetensors.torch import load_file

    got, want = (
        load_file(str(path / "adapter" / "adapter_model.safetensors")),
        load_file(str(ref / "adapter" / "adapter_model.safetensors")),
    )
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    assert any(float(v.abs().max()) > 0 for k, v in got.items() if "lora_B" in k)  # it trained


def test_hpz_matches_single_process(workdir, reference):
    from test_engines import adamw_drift_bound

    ref_dir, ref = reference
    got = records(workdir / "hpz")
    assert len(got) == STEPS
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-5, abs=1e-6)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-4, abs=1e-6)
    assert_adapter_close(workdir / "hpz", ref_dir, adamw_drift_bound([r["lr"] for r in ref]))


def test_hpz_counted_bytes_per_dimension_equal_prediction(workdir, builtin_cache, monkeypatch):
    """Inside the shard groups (dp_shard) and over all ranks (dp), on every rank, at the run's persistence threshold
    (zero_hpz_worker.PERSISTENCE): base weights gathered per layer from the secondary partitions, adapters among
    them (their first gather after the step over all ranks), small parameters re-gathered after the step."""
    from dora_dist.plan import comm
    from dora_dist.plan.model_spec import model_spec

    monkeypatch.setattr(comm, "ZERO3_PERSISTENCE_THRESHOLD", PERSISTENCE)
    cfg = load_config(None, overrides(str(builtin_cache), str(workdir / "hpz"), HPZ))
    dims = resolve_dims(cfg, 4, 2, "zero3")
    assert (dims.dp_replicate, dims.dp_shard) == (2, 2)
    collectives = comm.predict_collectives(cfg, model_spec(cfg), "zero3", 4, dims)
    predicted = comm.bytes_by_dim(collectives)
    assert predicted["dp_shard"]["all_gather"] > 0 and predicted["dp"]["reduce_scatter"] > 0
    assert sum(c.nbytes for c in collectives if "first gather after the step" in c.what) > 0  # adapters per layer
    for rank in range(4):
        data = json.loads((workdir / "hpz" / "probe" / f"comm_rank{rank}.json").read_text())
        step = next(s for s in data["steps"] if s["step"] == STEPS)  # steady state
        shard = {k: step.get(f"comm_dp_shard_{k}_bytes", 0) for k in KINDS}
        flat = {k: step[f"comm_{k}_bytes"] - shard[k] for k in KINDS}
        assert not any(step.get(f"comm_other_{k}_bytes", 0) for k in KINDS), step
        assert shard == predicted["dp_shard"], f"rank {rank}: dp_shard counted {shard}, predicted {predicted}"
        assert flat == predicted["dp"], f"rank {rank}: dp counted {flat}, predicted {predicted}"


def test_hpz_checkpoint_resumes_on_flat_zero3(workdir):
    full, resumed = records(workdir / "hpz"), records(workdir / "resume")
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full[2:]], rel=1e-6, abs=1e-7)
    assert [r["grad_norm"] for r in resumed] == pytest.approx([r["grad_norm"] for r in full[2:]], rel=1e-5)


def test_hpz_with_cpu_offload_matches_single_process(workdir, reference):
    _, ref = reference
    got = records(workdir / "offload")
    assert len(got) == 2
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref[:2]], rel=1e-5, abs=1e-6)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref[:2]], rel=1e-4, abs=1e-6)


def test_hpz_engine_groups_and_shard_local_magnitude_init(workdir):
    """DeepSpeed's hpZ groups are the nodes ([0, 1], [2, 3]); the magnitude init reads each weight's secondary
    (shard-group) partition and all-reduces the (out,) ‖W‖² inside the group only, equal to one process and to the
    gather path; each rank holds its 1/4 primary partitions plus 1/2 secondary copies of the frozen weights; the
    engine leaves no hpZ group behind for a later engine of the process."""
    ranks = json.loads((workdir / "engine.json").read_text())
    assert [r["hpz_group"] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for r in ranks:
        stats = r["stats"]
        assert stats["method"] == "partition" and stats["gathered_bytes"] == 0
        assert stats["allreduce_group_size"] == 2
        assert stats["allreduce_bytes"] == 4 * sum([30, 10, 10, 30, 75, 75, 30]) * 2  # Σ out × fp32, 14 layers
        held = r["held"]
        assert held["secondary_frozen"] == held["secondary_frozen_model"] > 0
        assert r["group_released"]
    assert ranks[0]["magnitude_rel_err"] < 1e-6 and ranks[0]["magnitude_gather_rel_err"] < 1e-6
