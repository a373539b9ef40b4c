"""Training a pre-quantized bitsandbytes checkpoint in one process (issue 22, item 2): `python -m dora_dist.train`
on such a directory with no quantization section takes the checkpoint's settings and says so (it used to train the
4-bit base believing it dense, with only a transformers warning); a contradicting section stops before any work,
naming both values; and for nf4/fp4 ± double quantization the loaded base holds the very bytes of quantizing the
dense model on the fly, and the runs' losses and adapters are equal. (fsdp2, ddp, zero2: tests/dist.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("bitsandbytes")

from prequant_fixture import COMBOS, combo_name, job_overrides, on_the_fly, save_prequantized  # noqa: E402

from dora_dist.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prequantized")
    cache = root / "cache"
    return cache, {combo_name(*c): save_prequantized(cache, root / combo_name(*c), *c) for c in COMBOS}


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return subprocess.run(
        [sys.executable, "-m", "dora_dist.train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def _read_run(out: Path) -> tuple[list[float], dict]:
    from dora_dist.adapters import read_adapter
    from dora_dist.metrics import read_metrics

    return [r["loss"] for r in read_metrics(out)], read_adapter(out / "adapter")[1]


def _train(overrides: list[str]) -> tuple[list[float], dict]:
    from dora_dist.train import train

    cfg = load_config(None, overrides)
    train(cfg)
    return _read_run(Path(cfg.output.dir))


def _assert_same_run(a, b):
    assert a[0] == b[0]  # same bytes, same numerics: equal losses, not close ones
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k


def test_cli_takes_the_checkpoint_settings_and_reports_them(checkpoints, tmp_path):
    cache, dirs = checkpoints
    ckpt = dirs["nf4-dq"]
    out = tmp_path / "pre"
    proc = _run_cli(job_overrides(cache) + [f"model.name_or_path={ckpt}", f"output.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    notice = [line for line in proc.stdout.splitlines() if "pre-quantized bitsandbytes checkpoint" in line]
    assert (
        len(notice) == 1
        and "quantization.mode=nf4, quantization.double_quant=true, quantization.compute_dtype="
        "float32, quantization.quant_storage=uint8"
        in notice[0]
    ), proc.stdout[-2000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())["quantization"]
    assert saved == {"mode": "nf4", "compute_dtype": "float32", "double_quant": True, "quant_storage": "uint8"}
    fly_out = tmp_path / "fly"
    proc = _run_cli(job_overrides(cache) + on_the_fly("nf4", True) + [f"output.dir={fly_out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(_read_run(out), _read_run(fly_out))


def test_cli_contradicting_section_stops_naming_both(checkpoints, tmp_path):
    cache, dirs = checkpoints
    proc = _run_cli(
        job_overrides(cache)
        + [f"model.name_or_path={dirs['nf4-dq']}", "quantization.mode=fp4", f"output.dir={tmp_path / 'x'}"]
    )
    assert proc.returncode != 0
    assert "quantization.mode=fp4 vs the checkpoint's bnb_4bit_quant_type=nf4" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


@pytest.mark.parametrize("quant_type, double_quant", COMBOS, ids=[combo_name(*c) for c in COMBOS])
def test_one_process_base_bytes_equal_quantizing_on_the_fly(checkpoints, quant_type, double_quant):
    from dora_dist.models import load_model
    from dora_dist.models.prequantized import adopt_checkpoint_quantization

    cache, dirs = checkpoints
    ckpt = dirs[combo_name(quant_type, double_quant)]
    fly_cfg = load_config(None, job_overrides(cache) + on_the_fly(quant_type, double_quant))
    pre_cfg, _ = adopt_checkpoint_quantization(load_config(None, job_overrides(cache) + [f"model.name_or_path={ckpt}"]))
    fly_m, pre_m = load_model(fly_cfg), load_model(pre_cfg)
    import bitsandbytes as bnb

    layers = [(n, m) for n, m in fly_m.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 21
    for name, a in layers:
        b = pre_m.get_submodule(name)
        assert torch.equal(a.weight.data.view(torch.uint8), b.weight.data.view(torch.uint8)), name
        qa, qb = a.weight.quant_state, b.weight.quant_state
        assert (qa.quant_type, qa.nested) == (qb.quant_type, qb.nested) == (quant_type, double_quant)
        assert torch.equal(qa.absmax, qb.absmax), name


#: nf4-dq trains in test_cli_takes_the_checkpoint_settings_and_reports_them; the other extreme here (the base bytes
#: of all four are compared above)
@pytest.mark.parametrize("quant_type, double_quant", [("fp4", False)])
def test_one_process_training_equals_quantizing_on_the_fly(checkpoints, tmp_path, quant_type, double_quant):
    cache, dirs = checkpoints
    ckpt = dirs[combo_name(quant_type, double_quant)]
    fly = _train(job_overrides(cache) + on_the_fly(quant_type, double_quant) + [f"output.dir={tmp_path / 'fly'}"])
    pre = _train(job_overrides(cache) + [f"model.name_or_path={ckpt}", f"output.dir={tmp_path / 'pre'}"])
    _assert_same_run(pre, fly)
