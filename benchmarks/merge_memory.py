"""Peak memory of `dora-dist merge` (streamed) against the model size and the in-memory merge it replaced.

    python benchmarks/merge_memory.py --layers 16 --hidden 1024 --out benchmarks/results/merge_memory_cpu.json

Builds the built-in tiny Llama's architecture scaled up through its config (random weights, bf16, saved in
shards of --shard-mb), a DoRA adapter on every linear layer, then merges it in a fresh process for each method:
`stream` (dora_dist.merge) and `in_memory` (from_pretrained + load_adapter + merge_and_unload + save_pretrained,
the command before). Each child first merges a small model of the same architecture (imports, lazy modules),
then resets the kernel's peak-RSS counter (/proc/self/clear_refs) and reports VmHWM − VmRSS for the real merge.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(directory: Path, hidden: int, inter: int, layers: int, vocab: int, dtype: str, shard: str, r: int):
    """A scaled Llama base in `directory`/base (sharded) and an adapter for it in `directory`/adapter."""
    import torch
    import transformers

    from dora_dist import DoRAConfig, apply_dora, dora_layers, save_adapter

    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(directory / "base", max_shard_size=shard)
    model = apply_dora(model, DoRAConfig(r=r, alpha=2 * r, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in dora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    save_adapter(model, directory / "adapter", base_model_name_or_path=str(directory / "base"))
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


CHILD = r"""
import json, sys
from pathlib import Path
method, small, big, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def run(d, target):
    if method == "stream":
        from dora_dist.merge import merge
        merge(str(d / "adapter"), str(target))
    else:
        from transformers import AutoModelForCausalLM
        from dora_dist.adapters import load_adapter, merge_and_unload
        model = AutoModelForCausalLM.from_pretrained(d / "base")
        merge_and_unload(load_adapter(model, d / "adapter")).save_pretrained(target)
        del model

run(small, out / "warm")
import gc; gc.collect()
open("/proc/self/clear_refs", "w").write("5")
rss0 = status("VmRSS:")
run(big, out / "merged")
print(json.dumps({"peak_rss_delta": status("VmHWM:") - rss0}))
"""


def measure(method: str, small: Path, big: Path, work: Path) -> int:
    """Peak RSS above the warmed-up process's RSS while merging `big` with `method`, in bytes."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    import os

    env.update(
        {k: v for k, v in os.environ.items() if k.startswith(("HF_", "TRANSFORMERS", "OMP", "DORA_DIST", "MALLOC_"))}
    )
    out = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(small), str(big), str(work)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_delta"]


def largest_tensor_bytes(base: Path) -> int:
    from dora_dist.merge.safetensors_io import Checkpoint

    return max(t.nbytes for t in Checkpoint(base).tensors.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=2816)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shard-mb", type=int, default=50)
    p.add_argument("--methods", default="stream,in_memory")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        build(t / "small", 128, 256, 1, 256, a.dtype, "1MB", 8)
        size = build(t / "big", a.hidden, a.inter, a.layers, a.vocab, a.dtype, f"{a.shard_mb}MB", 8)
        result = {
            "config": vars(a),
            "model_bytes": size,
            "shards": len(list((t / "big" / "base").glob("*.safetensors"))),
            "largest_tensor_bytes": largest_tensor_bytes(t / "big" / "base"),
        }
        for method in a.methods.split(","):
            work = t / f"work_{method}"
            work.mkdir()
            result[f"peak_rss_delta_{method}"] = measure(method, t / "small", t / "big", work)
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
