"""modules_to_save: a module trained in full next to the adapters, saved under peft's keys, interoperable with peft
(peft loads ours with the same logits, we load peft's)."""

import json

import pytest
import torch
from _dora_helpers import close, randomize_adapter

from dora_dist import DoRAConfig, apply_dora, dora_layers, load_adapter, merge_and_unload, save_adapter
from dora_dist.adapters import adapter_state_dict, read_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["query", "value"]


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def ids():
    return torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))


def trained_ours():
    model = apply_dora(tiny_bert(), DoRAConfig(r=4, alpha=8, target_modules=TARGETS, modules_to_save=["classifier"]))
    for i, (_, layer) in enumerate(dora_layers(model)):
        randomize_adapter(layer, seed=i)
    with torch.no_grad():  # a "trained" head: the base model's head would hide a failure to save it
        model.classifier.weight.add_(torch.randn(model.classifier.weight.shape) * 0.5)
        model.classifier.bias.add_(1.0)
    return model.eval()


def test_trainable_set_and_keys():
    model = trained_ours()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(n.startswith("classifier.") or n.endswith(("lora_A", "lora_B", "magnitude")) for n in trainable)
    keys = set(adapter_state_dict(model))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert not any("modules_to_save" in k for k in keys)


def test_unknown_or_overlapping_module_refused():
    with pytest.raises(ValueError, match="match no module"):
        apply_dora(tiny_bert(), DoRAConfig(r=2, target_modules=TARGETS, modules_to_save=["nope"]))
    with pytest.raises(ValueError, match="adapted or"):
        apply_dora(tiny_bert(), DoRAConfig(r=2, target_modules=TARGETS, modules_to_save=["attention"]))


def test_ours_round_trip_and_peft_loads_ours(tmp_path):
    model = trained_ours()
    with torch.no_grad():
        y = model(ids()).logits
        y_base = tiny_bert()(ids()).logits
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"] and cfg["task_type"] == "SEQ_CLS"
    with torch.no_grad():
        y_ours = load_adapter(tiny_bert(), tmp_path).eval()(ids()).logits
        pm = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
        y_peft = pm(ids()).logits
    assert (y - y_base).abs().max() > 0.1
    assert torch.equal(y_ours, y)
    close(y_peft, y)
    # merged: the head already holds its trained weights
    with torch.no_grad():
        close(merge_and_unload(model)(ids()).logits, y, rtol=1e-5, atol_frac=1e-5)


def test_we_load_peft_saved(tmp_path):
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, task_type="SEQ_CLS", modules_to_save=["classifier"]
    )
    pm = peft.get_peft_model(tiny_bert(), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or ("modules_to_save" in n and "classifier" in n):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    pm.eval()
    with torch.no_grad():
        y_peft = pm(ids()).logits
    pm.save_pretrained(str(tmp_path))
    dcfg, tensors = read_adapter(tmp_path)
    assert "classifier" in dcfg.modules_to_save and "base_model.model.classifier.weight" in tensors
    model = load_adapter(tiny_bert(), tmp_path).eval()
    assert model.classifier.weight.requires_grad
    with torch.no_grad():
        close(model(ids()).logits, y_peft)


def test_missing_module_tensor_is_an_error(tmp_path):
    model = trained_ours()
    state = {k: v for k, v in adapter_state_dict(model).items() if not k.endswith("classifier.bias")}
    save_adapter(model, tmp_path, state_dict=state)
    with pytest.raises(ValueError, match="classifier.bias"):
        load_adapter(tiny_bert(), tmp_path)
