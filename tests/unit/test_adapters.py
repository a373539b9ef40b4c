"""apply_dora target matching, freezing, PEFT-format save/load, interop with peft both ways, merging."""

import json

import pytest
import torch
from _dora_helpers import BaseKind, close, make_base, randomize_adapter
from torch import nn

from dora_dist import DoRAConfig, apply_dora, dora_layers, load_adapter, merge_and_unload, save_adapter
from dora_dist.adapters import set_merged

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NF4 = BaseKind("nf4_dq1", "4bit", bias=False, double_quant=True)
INT8 = BaseKind("int8", "8bit", bias=False)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict(
            {
                "q_proj": nn.Linear(16, 16),
                "k_proj": nn.Linear(16, 8, bias=False),
                "v_proj": nn.Linear(16, 8),
                "o_proj": nn.Linear(16, 16),
            }
        )
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(16, 32), "down_proj": nn.Linear(32, 16)})
        self.norm = nn.LayerNorm(16)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 10, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for blk in self.layers:
            a = blk.attn
            h = h + a["o_proj"](a["q_proj"](h) * torch.cat([a["k_proj"](h), a["v_proj"](h)], -1))
            h = blk.norm(h + blk.mlp["down_proj"](torch.relu(blk.mlp["up_proj"](h))))
        return self.lm_head(h)


def adapted(model):
    return sorted(name for name, _ in dora_layers(model))


def perturb(model, seed=0):
    for i, (_, layer) in enumerate(dora_layers(model)):
        randomize_adapter(layer, seed=seed + i)
    return model


@pytest.mark.parametrize(
    "targets, expected",
    [
        (
            ["q_proj", "v_proj"],
            ["layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.q_proj", "layers.1.attn.v_proj"],
        ),
        (["1.attn.q_proj"], ["layers.1.attn.q_proj"]),
        (["down_proj"], ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]),
        (
            r"layers\.0\..*_proj",
            [
                "layers.0.attn.k_proj",
                "layers.0.attn.o_proj",
                "layers.0.attn.q_proj",
                "layers.0.attn.v_proj",
                "layers.0.mlp.down_proj",
                "layers.0.mlp.up_proj",
            ],
        ),
        (
            r".*\.(k|o)_proj",
            ["layers.0.attn.k_proj", "layers.0.attn.o_proj", "layers.1.attn.k_proj", "layers.1.attn.o_proj"],
        ),
    ],
)
def test_target_matching(targets, expected):
    model = apply_dora(Toy(), DoRAConfig(r=2, alpha=4, target_modules=targets))
    assert adapted(model) == expected


def test_suffix_matches_whole_name_components_only():
    with pytest.raises(ValueError):
        apply_dora(Toy(), DoRAConfig(r=2, target_modules=["proj"]))  # "q_proj" does not end with ".proj"


def test_all_linear_excludes_output_head():
    model = apply_dora(Toy(), DoRAConfig(r=2, target_modules="all-linear"))
    names = adapted(model)
    assert len(names) == 12 and not any("lm_head" in n for n in names) and "embed" not in names


def tiny_llama(kind=None, layers=1):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    if kind is not None:  # same weights, quantized like a bnb-loaded checkpoint (lm_head stays dense)
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and "lm_head" not in name:
                parent, _, attr = name.rpartition(".")
                setattr(
                    model.get_submodule(parent),
                    attr,
                    make_base(kind, mod.out_features, mod.in_features, weight=mod.weight.detach()),
                )
        model.is_loaded_in_4bit = kind.kind == "4bit"
        model.is_loaded_in_8bit = kind.kind == "8bit"
    return model


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_all_linear_on_hf_model_excludes_lm_head():
    model = apply_dora(tiny_llama(), DoRAConfig(r=2, target_modules="all-linear"))
    names = adapted(model)
    assert len(names) == 7 and all(".layers.0." in n for n in names)
    assert isinstance(model.lm_head, nn.Linear)


def test_only_adapters_trainable():
    model = apply_dora(tiny_llama(), DoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B", "magnitude")) for n in trainable)
    assert len(trainable) == 2 * 3
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == sum(
        layer.lora_A.numel() + layer.lora_B.numel() + layer.magnitude.numel() for _, layer in dora_layers(model)
    )


def test_apply_twice_refused():
    model = apply_dora(Toy(), DoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has DoRA"):
        apply_dora(model, DoRAConfig(r=2, target_modules=["v_proj"]))


def test_save_load_round_trip(tmp_path):
    ids = torch.randint(0, 10, (2, 5))
    model = perturb(apply_dora(Toy(), DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"])))
    model.eval()
    y = model(ids)
    out = save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["q_proj", "up_proj"]
    loaded = load_adapter(Toy(), out).eval()
    assert adapted(loaded) == adapted(model)
    for (_, a), (_, b) in zip(dora_layers(model), dora_layers(loaded), strict=True):
        for attr in ("lora_A", "lora_B", "magnitude"):
            assert torch.equal(getattr(a, attr), getattr(b, attr))
    assert torch.equal(loaded(ids), y)
    # loading into a model that already has the DoRA layers overwrites them
    again = apply_dora(Toy(), DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"]))
    assert torch.equal(load_adapter(again, out).eval()(ids), y)


def _peft_loaded_output(model_fn, directory, ids):
    # peft's model built from the saved config, then the saved tensors loaded into it: what from_pretrained does,
    # without its load path, which in peft 0.21 breaks the quant_state of a 4-bit base on the CPU.
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = peft.LoraConfig.from_pretrained(str(directory))
    pm = peft.get_peft_model(model_fn(), cfg)
    result = set_peft_model_state_dict(pm, load_file(str(directory / "adapter_model.safetensors")))
    assert not result.unexpected_keys, result.unexpected_keys
    pm = pm.eval()
    n_dora = sum(1 for n, _ in pm.named_modules() if n.endswith("lora_magnitude_vector"))
    with torch.no_grad():
        return pm(ids).logits, n_dora


@pytest.mark.parametrize("which", ["llama", "gpt2_conv1d", "llama_nf4", "llama_int8"])
def test_our_adapter_loads_in_peft(which, tmp_path):
    model_fn = {
        "llama": tiny_llama,
        "gpt2_conv1d": tiny_gpt2,
        "llama_nf4": lambda: tiny_llama(NF4),
        "llama_int8": lambda: tiny_llama(INT8),
    }[which]
    targets = ["c_attn", "c_proj"] if which.startswith("gpt2") else ["q_proj", "v_proj", "down_proj"]
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        y_base = model_fn()(ids).logits
    model = perturb(apply_dora(model_fn(), DoRAConfig(r=4, alpha=8, target_modules=targets))).eval()
    with torch.no_grad():
        y = model(ids).logits
    assert not torch.allclose(y, y_base, atol=1e-3), "the adapter should change the output"
    save_adapter(model, tmp_path)
    y_peft, n_dora = _peft_loaded_output(model_fn, tmp_path, ids)
    assert n_dora == len(adapted(model))
    close(y, y_peft)


@pytest.mark.parametrize("which", ["llama", "gpt2_conv1d", "llama_nf4", "llama_int8"])
def test_peft_saved_adapter_loads(which, tmp_path):
    model_fn = {
        "llama": tiny_llama,
        "gpt2_conv1d": tiny_gpt2,
        "llama_nf4": lambda: tiny_llama(NF4),
        "llama_int8": lambda: tiny_llama(INT8),
    }[which]
    targets = ["c_attn", "c_proj"] if which.startswith("gpt2") else ["q_proj", "v_proj", "down_proj"]
    ids = torch.randint(0, 64, (2, 7))
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        use_dora=True,
        task_type="CAUSAL_LM",
        fan_in_fan_out=which.startswith("gpt2"),
    )
    pm = peft.get_peft_model(model_fn(), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    pm.eval()
    with torch.no_grad():
        y_peft = pm(ids).logits
    pm.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] == which.startswith("gpt2")
    model = load_adapter(model_fn(), tmp_path).eval()
    n_expected = sum(1 for n, _ in pm.named_modules() if n.endswith("lora_magnitude_vector"))
    assert len(adapted(model)) == n_expected
    assert all(layer.fan_in_fan_out == which.startswith("gpt2") for _, layer in dora_layers(model))
    with torch.no_grad():
        y = model(ids).logits
    close(y, y_peft)


def test_save_unmerged_after_merge_round_trip(tmp_path):
    """set_merged(True/False) on a whole dense model round-trips outputs and weights."""
    ids = torch.randint(0, 64, (2, 7))
    model = perturb(apply_dora(tiny_gpt2(), DoRAConfig(r=4, alpha=8, target_modules="all-linear"))).eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        y = model(ids).logits
        set_merged(model, True)
        assert all(layer.merged for _, layer in dora_layers(model))
        close(model(ids).logits, y, rtol=1e-5, atol_frac=1e-5)
        set_merged(model, False)
        close(model(ids).logits, y, rtol=1e-5, atol_frac=1e-5)
    for n, p in model.named_parameters():
        close(p.detach(), weights[n], rtol=1e-5, atol_frac=1e-5, msg=n)


@pytest.mark.parametrize("which", ["llama", "gpt2_conv1d", "llama_nf4", "llama_int8"])
def test_merge_and_unload_model(which):
    model_fn = {
        "llama": tiny_llama,
        "gpt2_conv1d": tiny_gpt2,
        "llama_nf4": lambda: tiny_llama(NF4),
        "llama_int8": lambda: tiny_llama(INT8),
    }[which]
    ids = torch.randint(0, 64, (2, 7))
    model = perturb(apply_dora(model_fn(), DoRAConfig(r=4, alpha=8, target_modules="all-linear"))).eval()
    with torch.no_grad():
        y = model(ids).logits
        merged = merge_and_unload(model)
        ym = merged(ids).logits
    assert not list(dora_layers(merged)) and not hasattr(merged, "dora_config")
    kinds = {type(m).__name__ for n, m in merged.named_modules() if n.endswith(("q_proj", "c_attn"))}
    assert kinds == ({"Conv1D"} if which.startswith("gpt2") else {"Linear"})
    if which == "llama_int8":  # the int8 kernel also quantizes activations; the merged model is exact fp32
        close(ym, y, rtol=5e-2, atol_frac=5e-2)
    else:
        close(ym, y, rtol=1e-5, atol_frac=1e-5)


def test_merge_and_unload_requantize_model():
    ids = torch.randint(0, 64, (2, 7))
    model = perturb(apply_dora(tiny_llama(NF4), DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"])))
    model.eval()
    with torch.no_grad():
        y = model(ids).logits
        merged = merge_and_unload(model, requantize=True)
        ym = merged(ids).logits
    q = merged.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_state.nested
    # lossy: a second quantization error, but the same model
    assert (ym - y).norm() / y.norm() < 0.2


def test_float64_adapter_round_trip_keeps_its_dtype_exactly(tmp_path):
    """A float64 adapter (dora.adapter_dtype=float64) on a float64 base, saved and loaded back, is the same model
    bit for bit, and so is its merge; peft reading the same files holds the very same float64 tensors."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    def base():
        return tiny_llama().double()

    targets = ["q_proj", "v_proj", "down_proj"]
    ids = torch.randint(0, 64, (2, 7))
    model = perturb(
        apply_dora(base(), DoRAConfig(r=4, alpha=8, target_modules=targets, adapter_dtype="float64"))
    ).eval()
    with torch.no_grad():
        y = model(ids).logits
    save_adapter(model, tmp_path)
    loaded = load_adapter(base(), tmp_path).eval()
    for (_, a), (_, b) in zip(dora_layers(model), dora_layers(loaded), strict=True):
        for attr in ("lora_A", "lora_B", "magnitude"):
            assert getattr(b, attr).dtype == torch.float64 and torch.equal(getattr(a, attr), getattr(b, attr))
    ours = {
        f"{n}.{a}": getattr(layer, a) for n, layer in dora_layers(loaded) for a in ("lora_A", "lora_B", "magnitude")
    }
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, y)
        merged, merged_again = merge_and_unload(model), merge_and_unload(loaded)
        for (name, p), (_, q) in zip(merged.named_parameters(), merged_again.named_parameters(), strict=True):
            assert torch.equal(p, q), name
        assert torch.equal(merged_again(ids).logits, merged(ids).logits)
    pm = peft.get_peft_model(base(), peft.LoraConfig.from_pretrained(str(tmp_path)))
    set_peft_model_state_dict(pm, load_file(str(tmp_path / "adapter_model.safetensors")))
    theirs = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert len(theirs) == len(ours) and all(p.dtype == torch.float64 for p in theirs.values())
    for name, p in theirs.items():
        key = (
            name.replace("base_model.model.", "")
            .replace(".lora_A.default.weight", ".lora_A")
            .replace(".lora_B.default.weight", ".lora_B")
            .replace(".lora_magnitude_vector.default.weight", ".magnitude")
        )
        assert torch.equal(p, ours[key]), name  # peft: 0 difference as well


def test_merge_cli_keeps_a_float64_adapter(tmp_path):
    """`dora-dist merge` of a float64 adapter into a float64 base writes the merge of the adapter as trained (before:
    the adapter was cast to float32 on load and the merged weights moved by ~1e-7)."""
    from transformers import AutoModelForCausalLM

    from dora_dist.cli import main

    tiny_llama().double().save_pretrained(tmp_path / "base")
    model = perturb(
        apply_dora(
            tiny_llama().double(),
            DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], adapter_dtype="float64"),
        ),
        seed=3,
    )
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    expected = merge_and_unload(model)
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    state = merged.state_dict()
    for name, p in expected.state_dict().items():
        assert state[name].dtype == torch.float64 and torch.equal(state[name], p), name
