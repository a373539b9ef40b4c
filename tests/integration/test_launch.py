"""The launch scripts end to end on the quickstart config (short runs), compared with one in-process run:

- launch/torchrun.sh (2 processes, FSDP2): SIGKILLed after its step-4 checkpoint, relaunched with the same
  command (resume=auto), finishes; all 8 losses equal the uninterrupted single-process run.
- launch/multinode.sh: two "nodes" (NNODES=2, one process each) meeting over a c10d rendezvous on 127.0.0.1.
- launch/slurm.sh: run as sbatch would, with stand-in `srun`/`scontrol` executables (one node, 2 processes).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dora_dist.config import load_config
from dora_dist.metrics import read_metrics
from netutil import free_port  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]



@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def quick(cache: str, out: Path, steps: int) -> list[str]:
    return ["--config", str(ROOT / "configs" / "quickstart.yaml"), f"training.max_steps={steps}",
            "data.synthetic_samples=300", "data.seq_len=64", "output.progress_bar=false", "output.plot=false",
            f"model.cache_dir={cache}", f"output.dir={out}"]


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


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]


def test_torchrun_script_killed_and_resumed(tmp_path, cache, reference):
    out = tmp_path / "run"
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), *quick(cache, out, 8), "checkpoint.every_steps=2"]
    env = script_env(NPROC_PER_NODE=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
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
            os.killpg(proc.pid, signal.SIGKILL)  # the whole launch: torchrun and both workers
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
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=script_env(NNODES=2, NODE_RANK=node, MASTER_ADDR="127.0.0.1",
                                                            MASTER_PORT=port, NPROC_PER_NODE=1,
                                                            RDZV_ID=f"test{port}"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-5000:]
    assert "world=2" in "".join(outs)
    assert losses(out) == pytest.approx(reference[:2], rel=1e-5, abs=1e-6)


def test_slurm_script_with_stand_in_srun(tmp_path, cache, reference):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    # srun on one node: drop srun's own options and run the command once
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "run"
    env = script_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES=1, SLURM_JOB_NODELIST="node1",
                     SLURM_JOB_ID=f"job{os.getpid()}", MASTER_PORT=free_port(), NPROC_PER_NODE=2)
    proc = run(["bash", str(ROOT / "launch" / "slurm.sh"), *quick(cache, out, 2)], env)
    assert "world=2" in proc.stdout
    assert losses(out) == pytest.approx(reference[:2], rel=1e-5, abs=1e-6)
