"""Training step time and memory: dora_dist DoRA vs dora_dist LoRA (same layer, use_dora=False) vs peft DoRA, on the
same small Llama (random init, fixed seed), adapters on every linear layer.

    python benchmarks/train_bench.py                      # CPU defaults; JSON -> benchmarks/results/train_bench.json
    python benchmarks/train_bench.py --device cuda --hidden 2048 --layers 8 --seq 1024

Time: the three models live in one process and their steps (forward + backward + AdamW) are interleaved round by
round, so a change in background load hits all variants alike; the median step time is reported. Memory: each
variant also runs alone in a subprocess (so peak RSS is per variant). Memory: CUDA max allocated on a GPU; on the CPU the peak
RSS of the process and the bytes autograd saves for backward during one forward (saved-tensor hooks), which is
where DoRA implementations differ.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("dora_dist-lora", "dora_dist-dora", "peft-dora")


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False)
    dtype = getattr(torch, args.dtype)
    return LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype)


def apply(model, variant: str, args):
    if variant == "peft-dora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear",
                                                use_dora=True, lora_dropout=0.0))
    from dora_dist.adapters import DoRAConfig, apply_dora

    return apply_dora(model, DoRAConfig(r=args.r, alpha=2 * args.r, use_dora=variant == "dora_dist-dora"))


def saved_bytes(model, batch) -> int:
    import torch

    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def run_variant(variant: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = apply(build(args), variant, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    cuda = args.device.startswith("cuda")
    saved = saved_bytes(model, batch)
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"variant": variant, "step_time_s": statistics.median(times), "step_times_s": times,
            "trainable_params": sum(p.numel() for p in params), "saved_for_backward_bytes": saved,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None, "loss": float(loss)}


def time_interleaved(args) -> dict[str, list[float]]:
    import torch

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    runs = {}
    for v in VARIANTS:
        model = apply(build(args), v, args)
        model.train()
        runs[v] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                            foreach=False))
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(args.warmup + args.steps):
        order = VARIANTS[i % 3:] + VARIANTS[: i % 3]
        for v in order:
            model, opt = runs[v]
            t0 = time.perf_counter()
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[v].append(time.perf_counter() - t0)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train_bench.json"))
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return 0
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--steps", "2"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            results[variant] = {"error": proc.stderr[-500:]}
            continue
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:16s} saved-for-backward "
              f"{r['saved_for_backward_bytes'] / 2**20:8.1f} MiB  peak RSS {r['peak_rss_bytes'] / 2**20:8.0f} MiB"
              + (f"  CUDA peak {r['cuda_peak_bytes'] / 2**20:8.0f} MiB" if r["cuda_peak_bytes"] else ""))
    # timing after the memory runs: a child inherits its parent's peak RSS at fork, so the parent stays small
    interleaved = time_interleaved(args)
    for variant, r in results.items():
        if "step_time_s" in r:
            r["alone_step_time_s"] = r["step_time_s"]
            r["step_times_s"] = interleaved[variant]
            r["step_time_s"] = statistics.median(interleaved[variant])
            print(f"{variant:16s} median step {1000 * r['step_time_s']:8.1f} ms (interleaved, {args.steps} steps)")
    ratios = {}
    lora = results.get("dora_dist-lora", {})
    if "step_time_s" in lora:
        mem_key = "cuda_peak_bytes" if lora.get("cuda_peak_bytes") else "peak_rss_bytes"
        for v in ("dora_dist-dora", "peft-dora"):
            r = results.get(v, {})
            if "step_time_s" in r:
                ratios[v] = {"time_vs_lora": r["step_time_s"] / lora["step_time_s"],
                             "saved_for_backward_vs_lora": r["saved_for_backward_bytes"] / lora["saved_for_backward_bytes"],
                             f"{mem_key}_vs_lora": r[mem_key] / lora[mem_key]}
                print(f"{v:16s} vs LoRA: time ×{ratios[v]['time_vs_lora']:.2f}, saved-for-backward "
                      f"×{ratios[v]['saved_for_backward_vs_lora']:.2f}, {mem_key} ×{ratios[v][f'{mem_key}_vs_lora']:.2f}")
        if "dora_dist-dora" in ratios and "peft-dora" in ratios:
            d, q = results["dora_dist-dora"], results["peft-dora"]
            ratios["dora_dist-dora_vs_peft-dora"] = {"time": d["step_time_s"] / q["step_time_s"],
                                                     "saved_for_backward": d["saved_for_backward_bytes"]
                                                     / q["saved_for_backward_bytes"]}
            print(f"dora_dist DoRA vs peft DoRA: time ×{ratios['dora_dist-dora_vs_peft-dora']['time']:.2f}, "
                  f"saved-for-backward ×{ratios['dora_dist-dora_vs_peft-dora']['saved_for_backward']:.2f}")
    setup = {k: v for k, v in vars(args).items() if k not in ("variant", "out")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": setup, "results": results, "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
