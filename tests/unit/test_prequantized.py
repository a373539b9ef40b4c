"""Pre-quantized bitsandbytes checkpoints (issue 22, item 2): the settings rule (models/prequantized.py) and the
FSDP2 streaming of stored packed rows, bit for bit equal to quantizing the dense model on the fly, for nf4 and fp4,
with and without double quantization. The trainer runs: tests/integration/test_prequantized_train.py (one
process) and tests/dist/test_prequantized_engines.py (fsdp2, ddp, zero2)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("bitsandbytes")

from prequant_fixture import COMBOS, combo_name, dense_dir, save_prequantized  # noqa: E402

from dora_dist.config import load_config  # noqa: E402
from dora_dist.errors import ConfigError, ModelError  # noqa: E402
from dora_dist.models.prequantized import (  # noqa: E402
    CheckpointQuantization,
    check_loaded_config,
    checkpoint_quantization,
    reconcile,
)

NF4_DQ = {
    "quantization_config": {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
    }
}


# ------------------------------------------------------------------------------------------------------------
# the settings rule
# ------------------------------------------------------------------------------------------------------------
def test_settings_read_from_config_json():
    assert checkpoint_quantization(NF4_DQ) == CheckpointQuantization("nf4", True, "bfloat16", "uint8")
    assert checkpoint_quantization({"model_type": "llama"}) is None
    eight = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}
    assert checkpoint_quantization(eight).mode == "int8"
    with pytest.raises(ModelError, match="quant_method='gptq'"):
        checkpoint_quantization({"quantization_config": {"quant_method": "gptq", "bits": 4}})


def test_mode_none_takes_the_checkpoint_settings_with_a_notice():
    cfg = load_config(None, ["model.name_or_path=/some/ckpt"])
    assert cfg.quantization.mode == "none"
    run, notice = reconcile(cfg, checkpoint_quantization(NF4_DQ))
    q = run.quantization
    assert (q.mode, q.double_quant, q.compute_dtype, q.quant_storage) == ("nf4", True, "bfloat16", "uint8")
    assert cfg.quantization.mode == "none"  # the caller's config is not changed behind its back
    assert "pre-quantized" in notice and "quantization.mode=nf4" in notice and "\n" not in notice


def test_matching_section_is_kept_and_reported():
    cfg = load_config(None, ["model.name_or_path=/some/ckpt", "quantization.mode=nf4"])
    run, report = reconcile(cfg, checkpoint_quantization(NF4_DQ))
    assert run is cfg and "mode=nf4" in report and "double_quant=true" in report


@pytest.mark.parametrize(
    "override, named",
    [
        ("quantization.mode=fp4", "quantization.mode=fp4 vs the checkpoint's bnb_4bit_quant_type=nf4"),
        (
            "quantization.double_quant=false",
            "quantization.double_quant=false vs the checkpoint's bnb_4bit_use_double_quant=true",
        ),
        (
            "quantization.compute_dtype=float32",
            "quantization.compute_dtype=float32 vs the checkpoint's bnb_4bit_compute_dtype=bfloat16",
        ),
    ],
)
def test_contradicting_section_is_an_error_naming_both(override, named):
    overrides = ["model.name_or_path=/some/ckpt", "quantization.mode=nf4", override]
    with pytest.raises(ConfigError, match=named.replace("'", ".")):
        reconcile(load_config(None, overrides), checkpoint_quantization(NF4_DQ))


def test_a_4bit_base_is_never_loaded_as_dense():
    """A hub checkpoint not cached at preflight: the loader sees its config and refuses mode=none."""
    from transformers import LlamaConfig

    hf = LlamaConfig(**{"quantization_config": NF4_DQ["quantization_config"]})
    with pytest.raises(ConfigError, match="pre-quantized .* quantization.mode=none: set quantization.mode=nf4"):
        check_loaded_config(load_config(None, ["model.name_or_path=org/model"]), hf)


# ------------------------------------------------------------------------------------------------------------
# FSDP2 streaming: the stored bytes, unchanged, equal to quantizing on the fly
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prequantized")
    cache = root / "cache"
    out = {combo_name(*c): save_prequantized(cache, root / combo_name(*c), *c) for c in COMBOS}
    return cache, out


def _sharded_modules(model):
    from dora_dist.quant.sharded4bit_linear import ShardedLinear4bit

    return [(n, m) for n, m in model.named_modules() if isinstance(m, ShardedLinear4bit)]


@pytest.mark.slow  # the fixture quantizes and saves the model four times (~20 s on 2 cores)
@pytest.mark.parametrize("quant_type, double_quant", COMBOS, ids=[combo_name(*c) for c in COMBOS])
def test_streamed_rows_equal_quantizing_on_the_fly(checkpoints, quant_type, double_quant, monkeypatch):
    """Each half of every 4-bit weight (the rows a rank of 2 keeps) read from the pre-quantized checkpoint equals
    the same rows quantized from the dense checkpoint, byte for byte; the whole model too, through the loader
    FSDP2 uses, which never calls bitsandbytes' quantizer on a pre-quantized checkpoint (no re-quantization)."""
    import bitsandbytes.functional as bnbf
    from safetensors import safe_open

    from dora_dist.models.lowmem_load import (
        build_lowmem_qdora_model,
        load_safetensors_lowmem,
        materialize,
        quantize_rows_streaming,
    )
    from dora_dist.models.prequantized import load_quant_state, quant_state_keys, read_packed_rows

    cache, dirs = checkpoints
    ckpt = dirs[combo_name(quant_type, double_quant)]
    base = [
        f"model.cache_dir={cache}",
        "model.dtype=float32",
        f"quantization.mode={quant_type}",
        f"quantization.double_quant={str(double_quant).lower()}",
        "quantization.compute_dtype=float32",
    ]
    fly = build_lowmem_qdora_model(load_config(None, base))
    materialize(fly, "cpu")
    load_safetensors_lowmem(fly, dense_dir(cache), weight_dtype=torch.float32)

    with (
        safe_open(str(ckpt / "model.safetensors"), "pt") as f,
        safe_open(str(dense_dir(cache) / "model.safetensors"), "pt") as d,
    ):
        keys = list(f.keys())
        for name, module in _sharded_modules(fly):
            key = f"{name}.weight"
            qs = load_quant_state(key, {k: f.get_tensor(k) for k in quant_state_keys(key, keys)})
            out_f, in_f = module.weight.shape
            for rows in ((0, out_f // 2), (out_f // 2, out_f)):
                stored = read_packed_rows(f.get_slice(key), qs, rows, torch.float32, module.weight.meta, key)
                dense = d.get_slice(key)
                fresh = quantize_rows_streaming(
                    lambda a, b, dense=dense: dense[a:b].float(),
                    out_f,
                    in_f,
                    rows,
                    quant_type,
                    64,
                    double_quant,
                    torch.float32,
                )
                assert torch.equal(stored.qdata, fresh.qdata), (key, rows)
                assert stored.meta.offset == fresh.meta.offset

    def refuse(*a, **k):
        raise AssertionError("a pre-quantized checkpoint was quantized again")

    monkeypatch.setattr(bnbf, "quantize_4bit", refuse)
    monkeypatch.setattr(bnbf, "quantize_blockwise", refuse)
    cfg = load_config(None, base + [f"model.name_or_path={ckpt}"])
    pre = build_lowmem_qdora_model(cfg)
    materialize(pre, "cpu")
    stats = load_safetensors_lowmem(pre, ckpt, weight_dtype=torch.float32)
    assert stats["skipped"] == []  # the quant-state entries are read with their weight, not left over
    for (name, a), (_, b) in zip(_sharded_modules(fly), _sharded_modules(pre), strict=True):
        assert torch.equal(a.weight.qdata, b.weight.qdata), name
        assert a.weight.meta.offset == b.weight.meta.offset
    dense_fly = {n: p for n, p in fly.named_parameters() if type(p.data) is torch.Tensor}
    for n, p in pre.named_parameters():
        if type(p.data) is torch.Tensor:
            assert torch.equal(p, dense_fly[n]), n
    assert math.isfinite(float(next(iter(_sharded_modules(pre)))[1].weight.dequantize().abs().sum()))


@pytest.mark.slow
def test_bfloat16_quant_storage_streams_the_same_bytes(checkpoints, tmp_path):
    """A checkpoint whose packed bytes are stored as bfloat16 (FSDP1-style quant_storage) holds the same bytes:
    each rank's rows read from it equal the uint8 checkpoint's; the job's section need not name the storage."""
    from safetensors import safe_open

    from dora_dist.models.lowmem_load import build_lowmem_qdora_model, load_safetensors_lowmem, materialize
    from dora_dist.models.prequantized import adopt_checkpoint_quantization

    cache, dirs = checkpoints
    ckpt = save_prequantized(cache, tmp_path / "bf16", "nf4", True, quant_storage="bfloat16")
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() == "BF16"
    models = []
    for path in (dirs["nf4-dq"], ckpt):
        cfg, report = adopt_checkpoint_quantization(
            load_config(
                None,
                [
                    f"model.name_or_path={path}",
                    "model.dtype=float32",
                    "quantization.mode=nf4",
                    "quantization.compute_dtype=float32",
                ],
            )
        )
        model = build_lowmem_qdora_model(cfg)
        materialize(model, "cpu")
        load_safetensors_lowmem(model, path, weight_dtype=torch.float32)
        models.append(model)
    assert "quant_storage=bfloat16" in report
    for (name, a), (_, b) in zip(_sharded_modules(models[0]), _sharded_modules(models[1]), strict=True):
        assert torch.equal(a.weight.qdata, b.weight.qdata), name


@pytest.mark.slow
def test_streaming_into_a_model_of_other_settings_names_both(checkpoints):
    """A checkpoint streamed into 4-bit layers built for another format fails naming the stored and expected one."""
    from dora_dist.models.lowmem_load import build_lowmem_qdora_model, load_safetensors_lowmem, materialize

    cache, dirs = checkpoints
    cfg = load_config(
        None,
        [
            f"model.cache_dir={cache}",
            "model.dtype=float32",
            "quantization.mode=fp4",
            "quantization.double_quant=false",
            "quantization.compute_dtype=float32",
        ],
    )
    model = build_lowmem_qdora_model(cfg)  # the built-in (dense) model's architecture, fp4 layers
    materialize(model, "cpu")
    with pytest.raises(
        ModelError,
        match="stored as nf4 blocksize=64 double_quant=True, but the model was built for "
        "fp4 blocksize=64 double_quant=False",
    ):
        load_safetensors_lowmem(model, dirs["nf4-dq"], weight_dtype=torch.float32)
