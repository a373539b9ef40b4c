"""The streaming merge (dora_dist/merge): the written tensors equal the in-memory merge (`load_adapter` +
`merge_and_unload`) bit for bit on the same dtype, for dense Llama (sharded), GPT-2 Conv1D with a tied head trained
in full, rsLoRA and plain LoRA; the safetensors writer; `--verify`'s bound catching a wrong merge."""

from __future__ import annotations

import json

import pytest
import torch
from _dora_helpers import randomize_adapter

from dora_dist import DoRAConfig, apply_dora, dora_layers, load_adapter, merge_and_unload, save_adapter
from dora_dist.merge import merge

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype=torch.float32, tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def save_pair(tmp_path, make, cfg: DoRAConfig, shard: str | None = "40KB", seed: int = 3):
    """A base checkpoint (sharded when `shard`) and a perturbed adapter for it; returns (base_dir, adapter_dir)."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    kwargs = {"max_shard_size": shard} if shard else {}
    make().save_pretrained(base_dir, **kwargs)
    model = apply_dora(make(), cfg)
    for i, (_, layer) in enumerate(dora_layers(model)):
        randomize_adapter(layer, seed=seed + i)
    with torch.no_grad():
        for name in cfg.modules_to_save or []:
            for p in model.get_submodule(name).parameters():
                p.add_(0.01 * torch.randn_like(p))
    save_adapter(model, adapter_dir, base_model_name_or_path=str(base_dir))
    return base_dir, adapter_dir


def in_memory(base_dir, adapter_dir, dtype=None) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype} if dtype else {}
    model = merge_and_unload(
        load_adapter(AutoModelForCausalLM.from_pretrained(base_dir, **kwargs), adapter_dir, allow_lora=True)
    )
    return model.state_dict()


def written(out_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def assert_equal_merges(out_dir, expected: dict[str, torch.Tensor], model_cls):
    """Every tensor of the streamed output equals the in-memory merge's, bit for bit, and transformers loads it."""
    got = written(out_dir)
    loaded = model_cls.from_pretrained(out_dir, dtype=next(iter(got.values())).dtype).state_dict()
    for name, want in expected.items():
        assert loaded[name].dtype == want.dtype and torch.equal(loaded[name], want), name
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_llama_equals_the_in_memory_merge(tmp_path, dtype):
    cfg = DoRAConfig(r=4, alpha=8, target_modules="all-linear")
    base_dir, adapter_dir = save_pair(tmp_path, lambda: tiny_llama(dtype), cfg)
    base_index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    assert len(set(base_index["weight_map"].values())) > 3  # many shards
    merge(str(adapter_dir), str(tmp_path / "merged"))
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]  # the base's layout, shard for shard
    got = assert_equal_merges(out, in_memory(base_dir, adapter_dir, dtype), transformers.LlamaForCausalLM)
    assert all(t.dtype == dtype for t in got.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).replace("torch.", "")


def test_gpt2_conv1d_with_a_tied_head_trained_in_full(tmp_path):
    """Conv1D weights are stored (in, out); lm_head is tied to wte in the base and in modules_to_save: the merged
    model gets its own lm_head (the adapter's) and keeps wte (the base's), untied, as the trainer does."""
    cfg = DoRAConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"], modules_to_save=["lm_head"])
    base_dir, adapter_dir = save_pair(tmp_path, tiny_gpt2, cfg, shard=None)
    assert "lm_head.weight" not in written(base_dir)  # tied: stored once
    merge(str(adapter_dir), str(tmp_path / "merged"))
    expected = in_memory(base_dir, adapter_dir)
    got = assert_equal_merges(tmp_path / "merged", expected, transformers.GPT2LMHeadModel)
    assert not torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize("variant", ["rslora", "lora"])
def test_rslora_and_plain_lora(tmp_path, variant):
    cfg = DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=variant == "rslora")
    if variant == "lora":
        cfg = DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], use_dora=False)
    base_dir, adapter_dir = save_pair(tmp_path, tiny_llama, cfg, shard=None)
    merge(str(adapter_dir), str(tmp_path / "merged"))
    assert_equal_merges(tmp_path / "merged", in_memory(base_dir, adapter_dir), transformers.LlamaForCausalLM)


def test_dtype_float32_from_bf16_is_one_rounding(tmp_path):
    """--dtype float32 of a bf16 base: the merge in fp32 from the bf16 weights (exactly representable), written
    without rounding; equals the in-memory merge of the base loaded in float32."""
    cfg = DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    base_dir, adapter_dir = save_pair(tmp_path, lambda: tiny_llama(torch.bfloat16), cfg, shard=None)
    merge(str(adapter_dir), str(tmp_path / "merged"), dtype="float32")
    expected = in_memory(base_dir, adapter_dir, torch.float32)
    got = assert_equal_merges(tmp_path / "merged", expected, transformers.LlamaForCausalLM)
    assert all(t.dtype == torch.float32 for t in got.values())


def test_writer_round_trips_every_dtype(tmp_path):
    from safetensors.torch import load_file

    from dora_dist.merge.safetensors_io import OutTensor, write_shard

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.randn(7, generator=g),
        "c": torch.randint(0, 255, (4, 1), generator=g).to(torch.uint8),
        "d": torch.randn(2, 2, generator=g).double(),
        "e": torch.tensor(3.5, dtype=torch.float16),
        "f": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    entries = [OutTensor(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    write_shard(tmp_path / "x.safetensors", entries, lambda e: tensors[e.key], {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_verify_passes_a_right_merge_and_catches_a_wrong_one(tmp_path, monkeypatch):
    """--verify's bound admits the output dtype's rounding and rejects a merge whose magnitude is off by 1%
    (far above bf16's 2^-8 relative rounding... so bf16 is checked with a 4% error, fp32 with 0.1%)."""
    from dora_dist.errors import JobFault
    from dora_dist.merge import tensors as merge_tensors

    cfg = DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    base_dir, adapter_dir = save_pair(tmp_path, lambda: tiny_llama(torch.bfloat16), cfg, shard=None)
    merge(str(adapter_dir), str(tmp_path / "ok"), verify=True)
    merge(str(adapter_dir), str(tmp_path / "ok32"), dtype="float32", verify=True)
    real = merge_tensors.produce

    def off(plan, key, dtype, factor):
        t = real(plan, key, dtype)
        return t * factor if plan.actions[key].kind == "merge" and "layers.1.self_attn.v_proj" in key else t

    for dtype, factor in (("auto", 1.04), ("float32", 1.001)):
        monkeypatch.setattr(merge_tensors, "produce", lambda p, k, d, f=factor: off(p, k, d, f))
        with pytest.raises(JobFault, match="layers.1.self_attn.v_proj.weight differs from base"):
            merge(str(adapter_dir), str(tmp_path / "bad"), dtype=dtype, verify=True)
        assert not (tmp_path / "bad").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]  # no temporary left behind
