"""The same config and seed give the same initial adapter on every engine and world size, dense and 4-bit: lora_A
and lora_B bit for bit, the magnitude (a norm computed from each engine's own layout of W) to fp32 rounding."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.dist, pytest.mark.slow]
sys.path.insert(0, str(Path(__file__).parent))
from init_cases import CASES, overrides  # noqa: E402
from netutil import run_workers  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("same_init"), str(tmp_path_factory.mktemp("same_init_cache"))


@pytest.fixture(scope="module")
def single(work):
    """One process (engine none) for the dense and the 4-bit job."""
    from dora_dist.config import load_config
    from dora_dist.parallel.dist_env import DistEnv
    from dora_dist.train import build

    workdir, cache = work
    out = {}
    for quant in ("none", "nf4"):
        job = build(
            load_config(
                None, overrides(cache, quant) + ["parallel.engine=none", f"output.dir={workdir / ('single_' + quant)}"]
            ),
            DistEnv(),
        )
        out[quant] = job.engine.adapter_state_dict()
        job.engine.close()
    return out


@pytest.fixture(scope="module")
def distributed(work, single):
    pytest.importorskip("deepspeed")
    workdir, cache = work
    out = workdir / "written.json"
    run_workers(
        Path(__file__).with_name("init_worker.py"),
        ["--workdir", str(workdir), "--cache", cache, "--out", str(out)],
        out,
    )
    return {name: torch.load(path, weights_only=True) for name, path in json.loads(out.read_text()).items()}


@pytest.mark.parametrize("name, engine, quant", CASES, ids=[c[0] for c in CASES])
def test_initial_adapter_equals_single_process(distributed, single, name, engine, quant):
    got, ref = distributed[name], single[quant]
    assert got.keys() == ref.keys() and len(ref) == 3 * 3 * 3  # 3 targets × 3 layers × (A, B, m)
    for key, value in ref.items():
        if key.endswith("magnitude_vector"):
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=0, msg=key)
        else:
            assert torch.equal(got[key], value), f"{name}: {key} differs from one process"
