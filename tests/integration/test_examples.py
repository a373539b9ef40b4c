"""Each example in examples/ runs in its reduced (--quick) mode and shows the effect it claims."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]  # each example trains end to end (10-30 s)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def test_digits_mlp_adaptation_beats_base(tmp_path):
    pytest.importorskip("sklearn")
    res = example("digits_mlp").main(["--quick", "--out", str(tmp_path)])
    t = res["table"]
    assert t["base"]["acc_orig"] > 0.9 and t["base"]["acc_rot"] < 0.3  # 10 classes: the base is near chance
    for method in ("full", "lora", "dora"):
        assert t[method]["acc_rot"] > 0.7, (method, t[method])
    r, h = 4, 128  # the defaults: rank 4 on 64 -> 128 -> 128 -> 10
    lora = r * (64 + h) + r * (h + h) + r * (h + 10)
    assert t["lora"]["trainable"] == lora and t["dora"]["trainable"] == lora + h + h + 10
    assert t["full"]["trainable"] == 64 * h + h + h * h + h + h * 10 + 10
    assert (tmp_path / "results.json").is_file()


def test_encoder_classify_learns_and_reloads(tmp_path):
    pytest.importorskip("peft")
    res = example("encoder_classify").main(["--quick", "--out", str(tmp_path)])
    assert res["dora"]["acc"] > res["base_sentiment_acc"] + 0.2 and res["dora"]["acc"] > res["head_only"]["acc"]
    assert res["reload_max_abs_diff"] == 0.0  # same code, same tensors: bit-identical
    assert res["peft_max_abs_diff"] <= 1e-5 * res["logit_scale"]  # peft's DoRA: fp32 reordering only
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_grad_flow_identical_first_step(tmp_path):
    res = example("grad_flow").main(["--quick", "--out", str(tmp_path)])
    assert res["step1_B_rel_diff"] <= 1e-5
    first_dora = res["dora"]["grads"][0]
    assert all(g["m"] > 0 for g in first_dora.values()) and all("m" not in g for g in res["lora"]["grads"][0].values())
    for m in ("lora", "dora"):
        assert res[m]["loss"][-1] < res[m]["loss"][0]
    assert (tmp_path / "grad_flow.png").stat().st_size > 10_000


def test_qdora_from_python_trains_saves_merges_and_analyzes(tmp_path):
    pytest.importorskip("bitsandbytes")
    from dora_dist.analysis import analyze

    res = example("qdora_from_python").main(["--quick", "--out", str(tmp_path)])
    assert res["linear4bit_layers"] == res["dora_layers"] == 7 * res["args"]["layers"]
    assert res["loss_last"] < res["loss_first"] - 0.5 and res["test_loss_after"] < res["test_loss_before"]
    assert res["merge_max_abs_diff"] <= 1e-4 * res["logit_scale"]
    # analyze against the NF4 base: the adapter and the merged dense model are the same weights W'
    rep = analyze(
        tmp_path / "base",
        [str(tmp_path / "adapter"), f"merged={tmp_path / 'merged'}"],
        base_quant="nf4",
        layers=r"_proj$",
        verbose=False,
        plot=False,
    )
    by = {(r["method"], r["layer"]): r for r in rep["records"]}
    dora = {layer: r for (m, layer), r in by.items() if m == "dora"}
    assert len(dora) == res["dora_layers"]
    for layer, r in dora.items():
        merged = by[("merged", layer)]
        assert merged["delta_m"] == pytest.approx(r["delta_m"], rel=1e-3)
        assert merged["delta_d"] == pytest.approx(r["delta_d"], rel=1e-3)


def test_weight_decomposition_writes_the_figure(tmp_path):
    res = example("weight_decomposition").main(["--quick", "--out", str(tmp_path)])
    corr = res["correlation"]
    assert set(corr) == {"full", "lora", "dora"} and all(c["points"] == 3 * 4 for c in corr.values())
    for method in corr:
        assert (tmp_path / "analysis" / f"scatter_{method}.png").is_file()
    assert all(r["delta_d"] > 0 and r["delta_m"] > 0 for r in res["records"])
