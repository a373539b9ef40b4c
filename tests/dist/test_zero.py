"""ZeRO-2 / ZeRO-3 engines on 2 real gloo processes vs one process over the same global batch.

Each stage is one launch of tests/dist/zero_worker.py (DeepSpeed's start on the CPU is slow): ZeRO-3 under the
`deepspeed` launcher, ZeRO-2 under torchrun, so both launch paths are covered. The worker checks the magnitude init,
4 training steps (losses, gradient norms, final adapter), kill-and-resume from a DeepSpeed checkpoint, and 4-bit
bases (trained with ZeRO-2, refused by ZeRO-3); see its docstring.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from netutil import run_workers  # noqa: E402

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).with_name("zero_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def launch(stage: int, launcher: str, tmp_path: Path) -> dict:
    out = tmp_path / f"zero{stage}.json"
    run_workers(
        WORKER, ["--stage", str(stage), "--out", str(out), "--workdir", str(tmp_path)], out, launcher, timeout=600
    )
    return json.loads(out.read_text())


def check_common(res: dict) -> None:
    assert res["world_size"] == 2
    # magnitude init equals the single-process one
    assert res["magnitude_init_vs_ref"] < 1e-6
    assert res["init_adapter_vs_ref"] < 1e-6
    # same losses and gradient norms as one process on the whole global batch
    assert res["losses"] == pytest.approx(res["ref_losses"], rel=1e-5, abs=1e-6)
    assert res["norms"] == pytest.approx(res["ref_norms"], rel=1e-4, abs=1e-6)
    # the adapter moved, and it is the single-process adapter
    assert res["final_adapter_moved"] > 1e-2
    assert res["final_adapter_vs_ref"] < 1e-4
    # resume from the step-2 checkpoint equals the uninterrupted run
    assert res["extra_state_ok"]
    assert res["resumed_losses"] == pytest.approx(res["losses"][2:], rel=1e-6, abs=1e-7)
    assert res["resumed_norms"] == pytest.approx(res["norms"][2:], rel=1e-6, abs=1e-7)
    assert res["resumed_adapter_vs_uninterrupted"] < 1e-6


def check_saved_adapter(tmp_path: Path) -> None:
    """The PEFT directory written from the gathered state loads back to the same tensors."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    final = torch.load(tmp_path / "final_adapter.pt", weights_only=True)
    assert sorted(saved) == sorted(final)
    for k in saved:
        torch.testing.assert_close(saved[k], final[k], rtol=0, atol=0)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA"


def test_zero3_deepspeed_launcher(tmp_path):
    res = launch(3, "deepspeed", tmp_path)
    assert res["partitioned"], "base weights were not partitioned by ZeRO-3"
    check_common(res)
    # the local-partition path moved only (out,) fp32 vectors, the gather path whole weights; both agree
    stats, gstats = res["norm_init_stats"], res["gather_stats"]
    assert stats["method"] == "partition" and stats["gathered_bytes"] == 0 and stats["local_layers"] == 0
    assert stats["allreduce_bytes"] == 4 * sum([30, 10, 10, 30, 75, 75, 30]) * 2  # 14 layers: Σ out x fp32
    assert gstats["gathered_bytes"] > 40 * stats["allreduce_bytes"]
    assert res["row_sq_paths_diff"] < 1e-5
    assert res["magnitude_gather_vs_ref"] < 1e-6
    assert res["no_gathered_left"], "a parameter stayed gathered after the magnitude init"
    assert "zero3 does not support 4/8-bit" in res["qdora_error"] and "zero2" in res["qdora_error"]
    # loading inside zero.Init (engine.model_init_context) gives the same training, when the layer core supports it
    zi = res["zero_init"]
    if zi != "unsupported":
        assert zi["partitioned_at_load"]
        assert zi["losses"] == pytest.approx(zi["ref_losses"], rel=1e-5, abs=1e-6)
        assert zi["adapter_vs_ref"] < 1e-4
    check_saved_adapter(tmp_path)


def test_zero2_torchrun(tmp_path):
    res = launch(2, "torchrun", tmp_path)
    check_common(res)
    # QDoRA (NF4 bases) trains under ZeRO-2 like one process
    assert res["qdora_losses"] == pytest.approx(res["qdora_ref_losses"], rel=1e-5, abs=1e-6)
    assert res["qdora_adapter_vs_ref"] < 1e-4
    check_saved_adapter(tmp_path)
