"""Data: formats and loss masks, packing, local files, clear errors, and the global-batch sampler (same samples
per optimizer step for any world size × accumulation split, resumable)."""

from __future__ import annotations

import json

import pytest

from dora_dist import models
from dora_dist.config import load_config
from dora_dist.data import IGNORE_INDEX, GlobalBatchSampler, build_dataset
from dora_dist.data.tokenize import encode_chat, encode_prompt_completion


@pytest.fixture(scope="module")
def tokenizer(builtin_cache):
    cfg = load_config(None, [f"model.cache_dir={builtin_cache}"])
    return models.load_tokenizer(cfg)


def test_prompt_completion_masks_prompt(tokenizer):
    ids, labels = encode_prompt_completion(tokenizer, "17 + 5 =", " 22 .", add_eos=True)
    n_prompt = len(tokenizer("17 + 5 =", add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE_INDEX for label in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    learned = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned, skip_special_tokens=True) == " 22 ."


def test_chat_loss_on_assistant_turns_only(tokenizer):
    messages = [
        {"role": "system", "content": "answer briefly ."},
        {"role": "user", "content": "1 + 2 ="},
        {"role": "assistant", "content": "3 ."},
        {"role": "user", "content": "2 + 2 ="},
        {"role": "assistant", "content": "4 ."},
    ]
    ids, labels = encode_chat(tokenizer, messages, add_eos=True)
    learned = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert "3 ." in learned and "4 ." in learned
    assert "1 + 2" not in learned and "answer briefly" not in learned and "<|user|>" not in learned


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "chat"])
def test_synthetic_formats_and_local_files(tmp_path, tokenizer, fmt):
    from dora_dist.data import synthetic

    rows = {
        "text": synthetic.text_examples,
        "prompt_completion": synthetic.prompt_completion_pairs,
        "chat": synthetic.chat_examples,
    }[fmt](40)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"data.source={path}", "data.seq_len=64", "data.packing=false"])
    ds = build_dataset(cfg, tokenizer)
    assert ds.fmt == fmt and len(ds) == 40
    batch = ds.collate([0, 1, 2])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    if fmt != "text":
        assert (batch["labels"] == IGNORE_INDEX).sum() > (batch["attention_mask"] == 0).sum()  # prompts masked


def test_parquet_and_csv(tmp_path, tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "1 + 1 =", "completion": " 2 ."}] * 5)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"))
    for name in ("d.parquet", "d.csv"):
        cfg = load_config(None, [f"data.source={tmp_path / name}", "data.packing=false"])
        assert len(build_dataset(cfg, tokenizer)) == 5


def test_missing_file_and_field_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_dataset(load_config(None, [f"data.source={tmp_path / 'nope.jsonl'}"]), tokenizer)
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"question": "a"}) + "\n")
    with pytest.raises(ValueError, match="cannot tell the data format"):
        build_dataset(load_config(None, [f"data.source={path}"]), tokenizer)
    with pytest.raises(ValueError, match=r"needs field\(s\) \['prompt', 'completion'\]"):
        build_dataset(load_config(None, [f"data.source={path}", "data.format=prompt_completion"]), tokenizer)


def test_sampler_same_samples_per_step_for_any_split():
    n, global_batch = 37, 8
    one = GlobalBatchSampler(n, micro_batch=2, grad_accum=4, world_size=1, rank=0, seed=3)
    two = [GlobalBatchSampler(n, micro_batch=2, grad_accum=2, world_size=2, rank=r, seed=3) for r in range(2)]
    four = [GlobalBatchSampler(n, micro_batch=1, grad_accum=2, world_size=4, rank=r, seed=3) for r in range(4)]
    for step in range(12):  # crosses epoch boundaries (37 samples)
        ref = sorted(i for mb in one.micro_batches(step) for i in mb)
        assert len(ref) == global_batch and ref == sorted(one.global_indices(step))
        assert sorted(i for s in two for mb in s.micro_batches(step) for i in mb) == ref
        assert sorted(i for s in four for mb in s.micro_batches(step) for i in mb) == ref
    # every sample once per epoch
    stream = [i for step in range(37) for i in one.global_indices(step)]
    for epoch in range(8):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    # a different seed gives a different order
    assert GlobalBatchSampler(n, 2, 4, 1, 0, seed=4).global_indices(0) != one.global_indices(0)


def test_sampler_resume_state():
    s = GlobalBatchSampler(100, 4, 2, 2, 1, seed=0)
    s.step = 7
    state = s.state_dict()
    t = GlobalBatchSampler(100, 4, 2, 2, 1, seed=0)
    t.load_state_dict(state)
    assert t.step == 7 and t.micro_batches(7) == s.micro_batches(7)
    # a different global batch can not resume the same position
    with pytest.raises(ValueError, match="global_batch"):
        GlobalBatchSampler(100, 4, 1, 2, 1, seed=0).load_state_dict(state)
    # world 1 × accum 4 has the same global batch: resumable
    GlobalBatchSampler(100, 4, 4, 1, 0, seed=0).load_state_dict(state)
