"""Faults a long job meets, on 2 real gloo processes: SIGTERM (preemption) and a rank killed mid-step under
`torchrun --max-restarts 1`. Each run must end with the losses of a run never stopped.

float64 base and adapters (as in test_engines.py): a resumed run then differs from the uninterrupted one only by the
order of reductions, ~1e-16 relative, so losses are compared at 1e-10 (same engine and world: 1e-12).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from netutil import free_port

from dora_dist.checkpoint import find_latest
from dora_dist.preemption import REQUEUE_EXIT_CODE

# spawns torchrun (2 gloo ranks) and kills ranks
pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).with_name("fault_worker.py")
ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def overrides(cache: str, out: Path, engine: str = "fsdp2") -> list[str]:
    return [
        f"model.cache_dir={cache}",
        f"output.dir={out}",
        f"parallel.engine={engine}",
        "data.seq_len=32",
        "data.synthetic_samples=200",
        f"training.max_steps={STEPS}",
        "training.global_batch_size=8",
        "training.micro_batch_size=2",
        "training.lr=5e-3",
        "training.warmup_steps=1",
        "model.dtype=float64",
        "dora.adapter_dtype=float64",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=3",
        "output.progress_bar=false",
        "output.plot=false",
    ]


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


def launch_ranks(args: list[str], nproc: int = 2, timeout: int = 600) -> list[tuple[int, str]]:
    """One process per rank, started directly as srun starts tasks (RANK/WORLD_SIZE/MASTER_* in the environment),
    so each rank's own exit status is seen; returns (status, output) per rank."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(
                _env(),
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
        )
        for r in range(nproc)
    ]
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]


def torchrun(args: list[str], extra: list[str] = (), timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        *extra,
        str(WORKER),
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), "each step logged once, in order"
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def cache(builtin_cache) -> str:
    return str(builtin_cache)  # built once per session (tests/conftest.py)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> list[float]:
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    proc = torchrun(["none", "0", "0", *overrides(cache, out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return losses(out)


def test_sigterm_checkpoints_exits_for_requeue_and_resumes_exactly(tmp_path, cache, reference):
    out = tmp_path / "preempted"
    # rank 1 alone is signalled after step 3: both ranks must stop after that same step
    ranks = launch_ranks(["sigterm", "3", "1", *overrides(cache, out)])
    assert [rc for rc, _ in ranks] == [REQUEUE_EXIT_CODE] * 2, ranks[0][1][-3000:] + ranks[1][1][-3000:]
    assert "stopped by a signal on another rank after step 3" in ranks[0][1]  # rank 0 speaks, once
    assert "Traceback" not in ranks[0][1] + ranks[1][1]
    assert find_latest(out / "checkpoints").name == "step_00000003"  # saved although every_steps=2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preempted"] and not summary["finished"] and summary["steps"] == 3
    assert not (out / "adapter").exists()
    shutil.copytree(out, tmp_path / "one_rank")  # for the world-size change below

    ranks = launch_ranks(["none", "0", "0", *overrides(cache, out)])  # the requeued job
    assert [rc for rc, _ in ranks] == [0, 0], ranks[0][1][-3000:]
    assert losses(out) == pytest.approx(reference, rel=1e-12, abs=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and [(s["start_step"], s["end_step"], s["preempted"]) for s in summary["segments"]] == [
        (0, 3, True),
        (3, STEPS, False),
    ]

    # FSDP2 on 2 ranks -> one process (engine none): DCP reshards, the data order is global
    proc = subprocess.run(
        [sys.executable, str(WORKER), "none", "0", "0", *overrides(cache, tmp_path / "one_rank", engine="none")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert losses(tmp_path / "one_rank") == pytest.approx(reference, rel=1e-10, abs=1e-12)


def test_rank_killed_mid_step_restarts_and_matches(tmp_path, cache, reference):
    out = tmp_path / "killed"
    proc = torchrun(["kill", "4", "1", *overrides(cache, out, engine="ddp")], extra=["--max-restarts", "1"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "resumed_from=" in proc.stdout and "step_00000002" in proc.stdout  # the restart resumed at step 2
    assert losses(out) == pytest.approx(reference, rel=1e-10, abs=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["segments"][-1]["start_step"] == 2
    assert summary["first_loss"] == pytest.approx(
        reference[0], rel=1e-10
    )  # from metrics.jsonl: no summary before the crash
