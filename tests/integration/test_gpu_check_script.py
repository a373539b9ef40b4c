"""benchmarks/gpu_check.sh on a CPU machine: it parses its arguments, and every command it would run exists and
accepts the arguments it is given (no GPU run can be faked here; `--dry-run` prints the commands). The report
writer turns a work directory of step results into the JSON the script promises."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def dry_run(gpus: int) -> list[list[str]]:
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GPU_CHECK_DRY_RUN_GPUS": str(gpus)},
    )
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line[len("CMD: ") :]) for line in proc.stdout.splitlines() if line.startswith("CMD: ")]


def test_script_is_valid_bash_and_refuses_unknown_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = subprocess.run(["bash", str(SCRIPT), "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument '--no-such-flag'" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "--out"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.slow  # spawns python for every benchmark's --help
def test_dry_run_lists_every_step_of_the_issue():
    cmds = [" ".join(c) for c in dry_run(2)]
    assert any("pytest" in c and "-m gpu" in c for c in cmds)
    assert any(
        "torchrun" in c and "--nproc-per-node 2" in c and "quantization.mode=nf4" in c and "parallel.engine=fsdp2" in c
        for c in cmds
    )
    layer = [c for c in cmds if "layer_bench.py" in c]
    sizes = {(re.search(r"--in-features (\d+)", c)[1], re.search(r"--rank (\d+)", c)[1]) for c in layer}
    assert sizes == {("4096", "16"), ("4096", "384"), ("8192", "16"), ("8192", "384")}
    assert all("--device cuda" in c and "--dtype bfloat16" in c for c in layer)
    assert any("train_bench.py" in c and "--device cuda" in c and "--dtype bf16" in c for c in cmds)
    one_gpu = " ".join(" ".join(c) for c in dry_run(1))
    assert "--nproc-per-node 1" in one_gpu and "parallel.engine=none" in one_gpu


def _python_script_accepts(cmd: list[str], helps: dict[str, str]) -> None:
    """`python X.py --flag value ...`: the script exists and its --help names every flag; choice values are
    among its choices. helps: --help texts already read, by script."""
    script = ROOT / cmd[1]
    assert script.is_file(), f"{cmd[1]} does not exist"
    if cmd[1] not in helps:
        helps[cmd[1]] = subprocess.run(
            [sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        ).stdout
    help_text = helps[cmd[1]]
    for i, arg in enumerate(cmd[2:], start=2):
        if arg.startswith("--"):
            assert arg in help_text, f"{cmd[1]} has no {arg}"
            choices = re.search(re.escape(arg) + r" \{([^}]*)\}", help_text)
            if choices and i + 1 < len(cmd):
                assert cmd[i + 1] in choices[1].split(","), f"{cmd[1]} {arg}: {cmd[i + 1]} not in {choices[1]}"


@pytest.mark.slow
def test_every_command_exists_and_accepts_its_arguments(tmp_path):
    cmds = dry_run(2) + [c for c in dry_run(1) if c[0] == "torchrun"]  # one GPU differs only in the run's world
    helps: dict[str, str] = {}
    for cmd in cmds:
        if cmd[:3] == ["python", "-m", "pytest"]:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "--collect-only",
                    "-q",
                    "-m",
                    "gpu",
                    "tests",
                    "-p",
                    "no:cacheprovider",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, proc.stdout[-2000:]
            collected = re.search(r"(\d+)/\d+ tests collected", proc.stdout)
            assert collected and int(collected[1]) >= 20, proc.stdout[-500:]
        elif cmd[0] == "torchrun":
            assert shutil.which("torchrun"), "torchrun is not on PATH"
            nproc = cmd[cmd.index("--nproc-per-node") + 1]
            train_args = cmd[cmd.index("dora_dist.train") + 1 :]
            proc = subprocess.run(
                [sys.executable, "-m", "dora_dist.train", *train_args, "--check"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, "WORLD_SIZE": nproc},
            )
            assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr[-1500:]}"
        elif cmd[0] == "python" and cmd[1].endswith(".py"):
            _python_script_accepts(cmd, helps)
        else:
            pytest.fail(f"gpu_check.sh runs a command this test does not know: {cmd}")


@pytest.mark.slow  # spawns the report script (matplotlib)
def test_report_collects_steps_figures_and_failures(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "steps.tsv").write_text(
        "pytest_gpu\t0\t61234\tpython -m pytest -m gpu\n"
        "layer_4096_r16\t0\t9000\tpython benchmarks/layer_bench.py\n"
        "train_bench\t124\t100000\tpython benchmarks/train_bench.py\n"
    )
    (work / "layer_4096_r16.json").write_text(json.dumps({"dora_over_lora": 1.02}))
    (work / "train_bench.log").write_text("step 1\nstep 2\n")
    (work / "figures.jsonl").write_text(json.dumps({"base": "linear", "lost": 0.01}) + "\n")
    (work / "pytest_gpu.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.unit.test_gpu_paths" name="test_a"/>'
        '<testcase classname="tests.unit.test_gpu_paths" name="test_b"><failure message="x"/></testcase>'
        "</testsuite></testsuites>"
    )
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check_report.py"), str(work), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "failed: train_bench" in proc.stdout
    report = json.loads(out.read_text())
    assert report["steps"]["pytest_gpu"]["seconds"] == 61.2
    assert report["steps"]["pytest_gpu"]["tests"] == {
        "tests.unit.test_gpu_paths::test_a": "passed",
        "tests.unit.test_gpu_paths::test_b": "failure",
    }
    assert report["steps"]["layer_4096_r16"]["result"] == {"dora_over_lora": 1.02}
    assert report["steps"]["train_bench"]["exit"] == 124
    assert report["steps"]["train_bench"]["log_tail"] == ["step 1", "step 2"]
    assert report["fidelity"] == [{"base": "linear", "lost": 0.01}]
