"""launch/deepspeed.sh end to end on the quickstart (2 CPU processes, ZeRO-3, DeepSpeed's cpu accelerator + gloo).

Three launches, each short: one process as the reference; ZeRO-3 under launch/deepspeed.sh stopped after step 2
(checkpoint at step 2); the same command again, which resumes from that checkpoint and finishes. The ZeRO-3 losses
of steps 1-4 (two before and two after the resume) equal the single-process ones; the adapter is saved in PEFT
format and `dora-dist merge` turns it into a model transformers loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from netutil import free_port  # noqa: E402

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "deepspeed.sh"
QUICK = [
    "--config",
    str(ROOT / "configs" / "quickstart.yaml"),
    "training.max_steps=4",
    "data.synthetic_samples=400",
    "output.progress_bar=false",
    "output.plot=false",
    "checkpoint.every_steps=2",
]


def run(cmd: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_BUILD_OPS="0", TOKENIZERS_PARALLELISM="false")
    env.update(env_extra or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(out_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in recs}


def test_deepspeed_sh_quickstart_zero3_resume_and_merge(tmp_path):
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    ref_dir, ds_dir = tmp_path / "ref", tmp_path / "zero3"
    run([sys.executable, "-m", "dora_dist.train", *QUICK, f"output.dir={ref_dir}", "parallel.engine=none"])
    ds_env = {"NUM_GPUS": "2", "ENGINE": "zero3"}
    first = run(
        ["bash", str(SCRIPT), *QUICK, f"output.dir={ds_dir}", "training.stop_after_steps=2"],
        dict(ds_env, MASTER_PORT=str(free_port())),
    )
    assert "engine=zero3" in first.stdout and "world=2" in first.stdout, first.stdout[-2000:]
    assert (ds_dir / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    assert not (ds_dir / "adapter").exists()  # stopped early: no final adapter yet
    second = run(["bash", str(SCRIPT), *QUICK, f"output.dir={ds_dir}"], dict(ds_env, MASTER_PORT=str(free_port())))
    assert "resumed_from" in second.stdout, second.stdout[-2000:]

    ref, ds = losses(ref_dir), losses(ds_dir)
    assert sorted(ds) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert ds[step] == pytest.approx(ref[step], rel=1e-4), (step, ds, ref)
    assert ds[4] < ds[1]

    adapter = ds_dir / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    # same adapter as one process (small drift from reduction order only)
    from safetensors.torch import load_file

    a, b = (
        load_file(str(adapter / "adapter_model.safetensors")),
        load_file(str(ref_dir / "adapter" / "adapter_model.safetensors")),
    )
    assert sorted(a) == sorted(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4

    merged = tmp_path / "merged"
    run([sys.executable, "-m", "dora_dist.cli", "merge", "--adapter", str(adapter), "--out", str(merged)])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())
