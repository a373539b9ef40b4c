"""`dora-dist generate`: greedy output is the argmax decoding of the adapted model, merged == unmerged, sampling
is seeded, a 4-bit base is used when asked (flag or training config), and bad input is one line + exit code 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dora_dist.cli import main
from dora_dist.generate import encode_prompt, generate, load_for_generation

PROMPT = "17 + 5 ="


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, builtin_cache) -> Path:
    from dora_dist.config import load_config
    from dora_dist.train import train

    work = tmp_path_factory.mktemp("gen")
    train(
        load_config(
            None,
            [
                f"model.cache_dir={builtin_cache}",
                "data.seq_len=32",
                "data.synthetic_samples=60",
                "training.max_steps=2",
                "training.micro_batch_size=2",
                "training.global_batch_size=2",
                "training.lr=5e-2",
                "output.progress_bar=false",
                "output.plot=false",
                "checkpoint.resume=none",
                f"output.dir={work / 'run'}",
            ],
        )
    )
    return work / "run" / "adapter"


def greedy_by_hand(model, ids: list[int], n: int) -> list[int]:
    """Argmax decoding with full forwards (no KV cache): what greedy `generate` must reproduce."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, len(ids) :].tolist()


def test_greedy_is_argmax_decoding_and_merge_agrees(adapter):
    from dora_dist.adapters import dora_layers

    model, tok = load_for_generation(str(adapter))
    assert len(dict(dora_layers(model))) == 7 * model.config.num_hidden_layers and not model.training
    assert any(float(layer.lora_B.abs().max()) > 0 for _, layer in dora_layers(model))  # a trained adapter
    ids = encode_prompt(tok, PROMPT, chat=False)
    want = tok.decode(greedy_by_hand(model, ids, 6), skip_special_tokens=True)
    assert generate(model, tok, [PROMPT], max_new_tokens=6, chat=False) == [want]
    merged, _ = load_for_generation(str(adapter), merge=True)
    assert not list(dora_layers(merged))
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    assert generate(merged, tok, [PROMPT], max_new_tokens=6, chat=False) == [want]


def test_chat_template_and_sampling(adapter):
    model, tok = load_for_generation(str(adapter))
    assert tok.chat_template  # the built-in tokenizer has one
    chat_ids = encode_prompt(tok, PROMPT, chat=True)
    plain_ids = encode_prompt(tok, PROMPT, chat=False)
    assert chat_ids != plain_ids and len(chat_ids) > len(plain_ids)
    a = generate(model, tok, [PROMPT, "copy : red fox ->"], 8, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, tok, [PROMPT, "copy : red fox ->"], 8, temperature=1.0, top_p=0.9, seed=3)
    assert a == b and len(a) == 2
    outs = {generate(model, tok, [PROMPT], 8, temperature=2.0, seed=s)[0] for s in range(4)}
    assert len(outs) > 1  # the seed matters when sampling


def test_4bit_base_from_flag_and_from_training_config(adapter, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from dora_dist.adapters import dora_layers

    model, tok = load_for_generation(str(adapter), load_in_4bit=True)
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for _, layer in dora_layers(model))
    assert len(generate(model, tok, [PROMPT], 4, chat=False)) == 1
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    cfg = (copy / "training_config.yaml").read_text().replace("mode: none", "mode: nf4")
    (copy / "training_config.yaml").write_text(cfg)
    model, _ = load_for_generation(str(copy))
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for _, layer in dora_layers(model))


def _other_bases(tmp_path: Path) -> dict[str, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    wider = tmp_path / "wider"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(wider)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(gpt2)
    return {"shape": wider, "modules": gpt2}


def test_bad_input_is_one_line_and_exit_2(adapter, tmp_path, capsys):
    bases = _other_bases(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (["--adapter", str(tmp_path / "nope"), "--prompt", "x"], "is not an adapter directory"),
        (["--adapter", str(adapter), "--prompt", "  "], "--prompt is empty"),
        (["--adapter", str(adapter), "--prompts", str(empty)], "holds no prompt"),
        (["--adapter", str(adapter), "--base", str(bases["shape"]), "--prompt", "x"], "does not fit the base"),
        (["--adapter", str(adapter), "--base", str(bases["modules"]), "--prompt", "x"], "does not fit the base"),
        (["--adapter", str(adapter), "--base", str(tmp_path / "no_base"), "--prompt", "x"], "cannot load the base"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["generate", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("dora_dist: error: ") and message in err[-1], (args, err)


def test_cli_prints_each_completion(adapter, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "17 + 5 ="}\n{"prompt": "copy : red ->"}\n')
    assert main(["generate", "--adapter", str(adapter), "--prompts", str(prompts), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "=== [1/2] 17 + 5 =" in out and "=== [2/2] copy : red ->" in out
