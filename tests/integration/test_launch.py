"""The launch scripts end to end on the quickstart config (short runs), compared with one in-process run:

- launch/torchrun.sh (2 processes, FSDP2): SIGKILLed after its step-4 checkpoint, relaunched with the same
  command (resume=auto), finishes; all 8 losses equal the uninterrupted single-process run.
- launch/multinode.sh: two "nodes" (NNODES=2, one process each) meeting over a c10d rendezvous on 127.0.0.1.
- launch/slurm.sh: run as sbatch would, with stand-in `srun`/`scontrol` executables (one node, 2 tasks): scancel,
  the time-limit warning (requeue) and the requeued job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from netutil import free_port  # noqa: E402

from dora_dist.config import load_config
from dora_dist.metrics import read_metrics

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(builtin_cache):
    return str(builtin_cache)  # built once per session (tests/conftest.py)


def quick(cache: str, out: Path, steps: int) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        f"training.max_steps={steps}",
        "data.synthetic_samples=300",
        "data.seq_len=64",
        "output.progress_bar=false",
        "output.plot=false",
        f"model.cache_dir={cache}",
        f"output.dir={out}",
    ]


def script_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    from dora_dist.train import train

    out = tmp_path_factory.mktemp("single")
    args = quick(cache, out, 8)
    train(load_config(args[1], args[2:] + ["parallel.engine=none"]))
    return [r["loss"] for r in read_metrics(out)]


def kill_processes_naming(needle: str) -> None:
    """SIGKILL every process whose command line contains `needle` (a run's output directory)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if needle in cmdline and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]


def test_torchrun_script_killed_and_resumed(tmp_path, cache, reference):
    out = tmp_path / "run"
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), *quick(cache, out, 8), "checkpoint.every_steps=2"]
    env = script_env(NPROC_PER_NODE=2)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    marker = out / "checkpoints" / "step_00000004" / "COMPLETE"
    deadline = time.time() + 400
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"run ended before its step-4 checkpoint:\n{proc.stdout.read()[-5000:]}")
            if time.time() > deadline:
                pytest.fail("no step-4 checkpoint within the time limit")
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the script and torchrun's agent
        kill_processes_naming(str(out))  # the workers: torchrun starts each in a session of its own
        proc.wait()
    killed_at = len(losses(out))
    assert 4 <= killed_at < 8, f"killed after step {killed_at}"
    assert not (out / "adapter").exists()
    second = run(cmd, env)
    assert "resumed_from=" in second.stdout
    got = losses(out)
    assert len(got) == 8
    assert got == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert (out / "metrics.jsonl").is_file() and (out / "summary.json").is_file()


def test_multinode_script_two_nodes_on_loopback(tmp_path, cache, reference):
    out = tmp_path / "run"
    port = free_port()
    cmd = ["bash", str(ROOT / "launch" / "multinode.sh"), *quick(cache, out, 2)]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=script_env(
                NNODES=2,
                NODE_RANK=node,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                NPROC_PER_NODE=1,
                RDZV_ID=f"test{port}",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs, strict=True):
        assert p.returncode == 0, o[-5000:]
    assert "world=2" in "".join(outs)
    assert losses(out) == pytest.approx(reference[:2], rel=1e-5, abs=1e-6)


SRUN = """#!/usr/bin/env bash
# stand-in srun on one node: drop srun's options, start $SLURM_NTASKS tasks, exit with the highest task status;
# 75 is reported as 143, as srun --kill-on-bad-exit may when it kills the other ranks after the first exits 75
while [[ $1 == --* ]]; do shift; done
pids=()
for ((r = 0; r < SLURM_NTASKS; r++)); do
  SLURM_PROCID=$r SLURM_LOCALID=$r "$@" &
  pids+=($!)
done
echo "${pids[@]}" > "$STUB_PIDS"
rc=0
for p in "${pids[@]}"; do wait "$p"; s=$?; (( s > rc )) && rc=$s; done
(( rc == 75 )) && rc=143
exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
if [[ $1 == show ]]; then echo 127.0.0.1; else echo "$@" >> "$STUB_LOG"; fi
"""


def _signal_tasks_after_a_step(proc, out: Path, pids_file: Path, sig: int, also_script: bool = False) -> int:
    """Once the run has logged a new step, signal its tasks (as SLURM does); returns the steps logged before."""
    start = len(losses(out)) if (out / "metrics.jsonl").exists() else 0
    deadline = time.time() + 400
    while not (out / "metrics.jsonl").exists() or len(losses(out)) <= start:
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"no new step was logged (rc={proc.poll()}):\n{proc.stdout.read()[-5000:]}")
        time.sleep(0.05)
    for pid in pids_file.read_text().split():
        os.kill(int(pid), sig)
    if also_script:
        os.kill(proc.pid, signal.SIGTERM)
    return start


def test_slurm_script_requeues_on_preemption_not_on_cancel(tmp_path, cache, reference):
    """launch/slurm.sh as sbatch runs it, with stand-in srun/scontrol (one node, 2 tasks): scancel (SIGTERM to the
    script and the tasks) stops after a checkpoint without requeueing; the time-limit warning (SIGUSR1 to the tasks)
    checkpoints and requeues; the requeued job finishes with the losses of an uninterrupted run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "scontrol").write_text(SCONTROL)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out, pids, log = tmp_path / "run", tmp_path / "pids", tmp_path / "scontrol.log"
    env = script_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NODELIST="node1",
        SLURM_JOB_ID="4242",
        SLURM_NTASKS=2,
        SLURM_NTASKS_PER_NODE=2,
        MASTER_PORT=free_port(),
        STUB_PIDS=pids,
        STUB_LOG=log,
        SLURM_SUBMIT_DIR=tmp_path,
    )
    cmd = ["bash", str(ROOT / "launch" / "slurm.sh"), *quick(cache, out, 8)]

    def launch():
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    cancelled = launch()
    _signal_tasks_after_a_step(cancelled, out, pids, signal.SIGTERM, also_script=True)
    text = cancelled.communicate(timeout=300)[0]
    assert cancelled.returncode == 143, text[-5000:]  # srun's status, passed on
    assert not log.exists(), "a cancelled job must not requeue itself"
    assert "world=2" in text and "stopped by SIGTERM" in text
    stopped_at = json.loads((out / "summary.json").read_text())["steps"]

    preempted = launch()
    _signal_tasks_after_a_step(preempted, out, pids, signal.SIGUSR1)
    text = preempted.communicate(timeout=300)[0]
    assert preempted.returncode == 0, text[-5000:]
    assert log.read_text().split() == ["requeue", "4242"]  # from the ranks' marker, whatever srun said
    assert f"step_{stopped_at:08d}" in text  # it resumed from the first stop
    assert stopped_at < json.loads((out / "summary.json").read_text())["steps"] < 8

    requeued = run(cmd, env)  # the requeued job runs the script again
    assert "resumed_from=" in requeued.stdout
    assert losses(out) == pytest.approx(reference, rel=1e-5, abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and len(summary["segments"]) == 3
    assert log.read_text().split() == ["requeue", "4242"]  # finished: not requeued again
    assert not list(tmp_path.glob(".dora_dist_requeue_*"))  # the marker is always cleaned up
