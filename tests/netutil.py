"""Small helpers shared by the multi-process tests (tests/ is on sys.path through its conftest)."""

import socket


def free_port() -> int:
    """A TCP port on the loopback that is free right now, for one test's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script, args: list[str], out, launcher: str = "torchrun", nproc: int = 2, timeout: int = 900) -> None:
    """Launch `script` on `nproc` local processes (torchrun, or the deepspeed launcher) and fail the test with the
    tail of its output unless it exits 0 and wrote `out`. The one launch/teardown path of the dist tests."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[1]
    port = str(free_port())
    if launcher == "deepspeed":
        exe = shutil.which("deepspeed")
        if exe is None:
            pytest.skip("the deepspeed launcher is not on PATH")
        cmd = [exe, "--num_gpus", str(nproc), "--master_port", port, str(script), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            port,
            str(script),
            *args,
        ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        DS_BUILD_OPS="0",
        PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not Path(out).is_file():
        pytest.fail(f"{launcher} launch failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
