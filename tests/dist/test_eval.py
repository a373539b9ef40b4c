"""Validation under every engine on 2 real gloo processes == one process.

The eval loss is Σ token losses / Σ target tokens over the whole eval set, each rank taking its share and the two
sums all-reduced in float64. Before any step the adapter is the same on every engine, so the only difference to
one process is the order of float64 additions (and, in fp32 models, the fp32 forward of differently shaped
batches): fp64 engines must agree to 1e-12 relative. After one optimizer step the engines' adapters differ from one
process by their training parity (engine tests: 1e-9 in fp64) and the fp32 ZeRO runs by fp32 rounding."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]
sys.path.insert(0, str(Path(__file__).parent))
from eval_worker import ENGINES, job_overrides, run_engine, write_eval_file  # noqa: E402
from netutil import run_workers  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval")
    eval_file = work / "eval.jsonl"
    write_eval_file(eval_file)
    return work, str(work / "cache"), str(eval_file)


@pytest.fixture(scope="module")
def reference(setup):
    """One process (engine none) per dtype, in this process."""
    from dora_dist.parallel.dist_env import DistEnv

    work, cache, eval_file = setup
    return {
        dtype: run_engine(
            job_overrides(cache, eval_file, dtype)
            + ["parallel.engine=none", f"output.dir={work / ('single_' + dtype)}"],
            DistEnv(),
        )
        for dtype in sorted(set(ENGINES.values()))
    }


@pytest.fixture(scope="module")
def dist_results(setup, reference):
    pytest.importorskip("deepspeed")
    work, cache, eval_file = setup
    out = work / "results.json"
    run_workers(
        Path(__file__).with_name("eval_worker.py"),
        ["--workdir", str(work), "--cache", cache, "--eval-file", eval_file, "--out", str(out)],
        out,
    )
    return json.loads(out.read_text())


def test_reference_is_a_mean_token_loss(reference):
    for res in reference.values():
        before = res["before"]
        assert before["eval_tokens"] > 0
        assert before["eval_ppl"] == pytest.approx(math.exp(before["eval_loss"]), rel=1e-12)
        # a random-init model over a vocabulary V scores about ln V; the adapter's first step lowers it
        assert 4.0 < before["eval_loss"] < 9.0
        assert res["after"]["eval_loss"] < before["eval_loss"]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_eval_matches_single_process(dist_results, reference, engine):
    dtype = ENGINES[engine]
    ref, got = reference[dtype], dist_results[engine]
    exact = 1e-12 if dtype == "float64" else 1e-6  # fp32: forwards of other batch shapes round differently
    assert got["before"]["eval_tokens"] == ref["before"]["eval_tokens"]
    assert got["before"]["eval_loss"] == pytest.approx(ref["before"]["eval_loss"], rel=exact, abs=0)
    after = 1e-9 if dtype == "float64" else 1e-5
    assert got["after"]["eval_loss"] == pytest.approx(ref["after"]["eval_loss"], rel=after, abs=0)
    assert got["after"]["best"] is True and got["adapter_best"]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_best_adapter_with_modules_to_save_matches_single_process(dist_results, reference, setup, engine):
    """adapter_best/ (gathered by the engine: adapters + the full lm_head of dora.modules_to_save) == one process.
    fp64: reduction order only. fp32 (ZeRO): one AdamW step moves an element by at most 2·lr when a near-zero
    gradient flips sign between runs (see test_engines.adamw_drift_bound), lr = 5e-3."""
    import torch
    from safetensors.torch import load_file

    work = setup[0]
    dtype = ENGINES[engine]
    ref = load_file(str(work / f"single_{dtype}" / "adapter_best" / "adapter_model.safetensors"))
    got = load_file(str(work / engine / "adapter_best" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(ref) and "base_model.model.lm_head.weight" in got
    atol = 1e-10 if dtype == "float64" else 2 * 5e-3
    for key in ref:
        torch.testing.assert_close(
            got[key], ref[key], rtol=1e-9 if dtype == "float64" else 0, atol=atol, msg=lambda m, key=key: f"{key}: {m}"
        )
