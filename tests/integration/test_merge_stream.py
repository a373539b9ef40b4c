"""`dora-dist merge` end to end: peak memory bounded by the largest tensor (not the model), bad input as one line
with nothing written, a hub id resolved through the hub helpers, an interrupted merge leaving nothing behind."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dora_dist.cli import main

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "dora_dist: error: "


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A sharded tiny Llama (bf16) and a DoRA adapter for it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import merge_memory

    d = tmp_path_factory.mktemp("small")
    merge_memory.build(d, 128, 256, 2, 256, "bfloat16", "100KB", 4)
    return d


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """A bf16 base of 24 layers in many shards: the merge's peak RSS (above the warmed-up process) stays under a
    bound made of the largest tensors' bytes, which is a fraction of the model's size.

    Bound, per tensor (the largest over the model): the tensor read (its bytes, plus the same again while its
    pages are mapped) and its output, and for an adapted weight four fp32 temporaries of one row chunk (the
    fp32 chunk, B·A rows, W + sBA, the scaled rows: DoRALinear.merged_rows); plus the adapter (all its tensors are
    read at the start) and 16 MiB for the interpreter and allocator."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import merge_memory

    from dora_dist.merge.safetensors_io import Checkpoint
    from dora_dist.nn.weight_source import CHUNK_ELEMENTS

    merge_memory.build(tmp_path / "small", 128, 256, 1, 256, "bfloat16", "1MB", 4)
    model_bytes = merge_memory.build(tmp_path / "big", 512, 1408, 24, 4096, "bfloat16", "8MB", 4)
    ckpt = Checkpoint(tmp_path / "big" / "base")
    assert len(ckpt.files) > 10
    adapted = ("proj.weight",)

    def need(key, info):
        n = info.nbytes // 2
        temporaries = 4 * 4 * min(n, CHUNK_ELEMENTS) if key.endswith(adapted) else 0
        return 3 * info.nbytes + temporaries

    adapter = (tmp_path / "big" / "adapter" / "adapter_model.safetensors").stat().st_size
    bound = max(need(k, i) for k, i in ckpt.tensors.items()) + adapter + (16 << 20)
    assert bound < model_bytes / 3  # the test can tell O(tensor) from O(model)
    (tmp_path / "work").mkdir()
    peak = merge_memory.measure("stream", tmp_path / "small", tmp_path / "big", tmp_path / "work")
    print(f"model {model_bytes / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB")
    assert peak < bound, (peak, bound, model_bytes)
    index = json.loads((tmp_path / "work" / "merged" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(ckpt.files)


def run(argv, capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = main(argv)
    out, err = capfd.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(PREFIX), (rc, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def no_output(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")], "a temporary was left"


def test_out_inside_the_base_directory(small, capfd):
    argv = ["merge", "--adapter", str(small / "adapter"), "--out", str(small / "base" / "merged")]
    one_line_error(*run(argv, capfd)[::2], "is inside the base model directory")
    no_output(small / "base", "merged")


def test_missing_shard(small, tmp_path, capfd):
    base = tmp_path / "base"
    shutil.copytree(small / "base", base)
    shard = sorted(base.glob("model-*.safetensors"))[1]
    shard.unlink()
    argv = ["merge", "--adapter", str(small / "adapter"), "--base", str(base), "--out", str(tmp_path / "merged")]
    one_line_error(*run(argv, capfd)[::2], "missing shard(s)", shard.name)
    no_output(tmp_path, "merged")


def test_not_enough_disk_is_checked_before_writing(small, tmp_path, capfd, monkeypatch):
    from dora_dist.merge import run as merge_run

    real = shutil.disk_usage

    def tiny_disk(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1000, 1000)

    monkeypatch.setattr(merge_run.shutil, "disk_usage", tiny_disk)
    argv = ["merge", "--adapter", str(small / "adapter"), "--out", str(tmp_path / "merged")]
    one_line_error(*run(argv, capfd)[::2], "not enough disk space", "GiB are free")
    no_output(tmp_path, "merged")


def test_adapter_of_another_base(small, tmp_path, capfd):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    argv = ["merge", "--adapter", str(small / "adapter"), "--base", str(tmp_path / "gpt2"), "--out"]
    one_line_error(*run([*argv, str(tmp_path / "merged")], capfd)[::2], "(GPT2LMHeadModel) lacks", "another base")
    no_output(tmp_path, "merged")


def test_interrupted_merge_leaves_nothing_and_keeps_the_previous_output(small, tmp_path, monkeypatch, capfd):
    """Ctrl-C in the middle of writing: no --out, no temporary; a previous merge in --out is left as it was."""
    from dora_dist.merge import tensors

    out = tmp_path / "merged"
    argv = ["merge", "--adapter", str(small / "adapter"), "--out", str(out)]
    assert run(argv, capfd)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = tensors.produce

    def interrupted(plan, key, dtype):
        calls.append(key)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(plan, key, dtype)

    monkeypatch.setattr(tensors, "produce", interrupted)
    assert run(argv, capfd)[0] == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    monkeypatch.undo()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine\n")
    rc, _, err = run(["merge", "--adapter", str(small / "adapter"), "--out", str(tmp_path / "other")], capfd)
    one_line_error(rc, err, "non-empty directory that holds no model")


def test_hub_id_is_resolved_through_the_hub_helpers(small, tmp_path, monkeypatch, capfd):
    """A hub id is checked with dora_dist.hub (offline and not cached: the one-line message) and fetched with
    snapshot_download (here: a stand-in returning the local copy, no network)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["merge", "--adapter", str(small / "adapter"), "--base", "nobody/no-model", "--out", str(tmp_path / "m")]
    one_line_error(*run(argv, capfd)[::2], "--base='nobody/no-model'", "offline mode is on")
    no_output(tmp_path, "m")
    from dora_dist import hub

    asked = []
    monkeypatch.setattr(hub, "in_cache", lambda repo_id, repo_type="dataset": True)

    def snapshot(repo_id, allow_patterns, local_files_only):
        asked.append((repo_id, local_files_only))
        return str(small / "base")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert run(argv, capfd)[0] == 0 and asked == [("nobody/no-model", True)]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.dtype == torch.bfloat16
