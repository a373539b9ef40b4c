"""Training step time and memory: dora_dist DoRA vs dora_dist LoRA (same layer, use_dora=False) vs peft DoRA, on the
same small Llama (random init, fixed seed), adapters on every linear layer.

    python benchmarks/train_bench.py                      # CPU defaults; JSON -> benchmarks/results/train_bench.json
    python benchmarks/train_bench.py --hidden 1024 --intermediate 2816 --layers 2 --seq 256 --batch 2 --vocab 8192
    python benchmarks/train_bench.py --dtype bf16 --vocab 128256 --loss-memory   # + peak loss memory, plain vs chunked
    python benchmarks/train_bench.py --compile            # each decoder block torch.compile'd (training.compile)
    python benchmarks/train_bench.py --device cuda --hidden 2048 --layers 8 --seq 1024

Variants: `dora_dist-lora`, `dora_dist-dora` (the fused epilogue, nn/dora_epilogue.py), `dora_dist-dora-unfused`
(the same layer with the plain-op epilogue, i.e. the behaviour before the fusion, which saves z), `peft-dora`.
Every variant uses the trainer's loss (dora_dist/losses.py, `--loss-chunk` tokens per chunk, 0 = whole logits).

Time: the models live in one process and their steps (forward + backward + AdamW) are interleaved round by round,
so a change in background load hits all variants alike; the median step time is reported and the ratios are
computed from that one run. Memory: each variant also runs alone in a subprocess. Saved-for-backward bytes are the
unique storages autograd saves during one forward (saved-tensor hooks), parameters excluded, so a tensor saved by
two ops (a DoRA layer's output y and the SiLU after it) counts once, as it is stored once; the naive per-save sum is
reported too. Peak RSS per variant; CUDA max allocated on a GPU. `--loss-memory`: peak memory allocated by the
loss alone (lm_head + cross-entropy, forward + backward, over `--loss-tokens` tokens of hidden states), whole fp32
logits vs chunked, each in its own subprocess (CPU: from the profiler's allocation events; CUDA: max allocated).
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
from contextlib import nullcontext
from pathlib import Path

VARIANTS = ("dora_dist-lora", "dora_dist-dora", "dora_dist-dora-unfused", "peft-dora")
DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


def torch_dtype(args):
    import torch

    return getattr(torch, DTYPES[args.dtype])


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=False,
        use_cache=False,
    )  # as the trainer runs it (a KV cache would copy k and v)
    return LlamaForCausalLM(cfg).to(device=args.device, dtype=torch_dtype(args))


def apply(model, variant: str, args):
    compiled = args.compile or variant.endswith("+compile")
    variant = variant.split("+")[0]
    if variant == "peft-dora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", use_dora=True, lora_dropout=0.0),
        )
    else:
        from dora_dist.adapters import DoRAConfig, apply_dora

        model = apply_dora(model, DoRAConfig(r=args.r, alpha=2 * args.r, use_dora=variant != "dora_dist-lora"))
    if compiled:
        from dora_dist.compile import compile_decoder_blocks

        compile_decoder_blocks(model)
    return model


def epilogue_mode(variant: str):
    """The unfused variant runs the plain-op epilogue (pre-fusion behaviour) in eager mode."""
    from dora_dist.nn.dora_epilogue import use_fused

    return use_fused(False) if variant.split("+")[0] == "dora_dist-dora-unfused" else nullcontext()


def loss_of(model, batch, args):
    from dora_dist.losses import causal_lm_loss_sum

    return causal_lm_loss_sum(model, batch, None, batch, chunk_tokens=args.loss_chunk) / batch[:, 1:].numel()


def saved_bytes(model, batch, args) -> tuple[int, int]:
    """(unique storages saved for backward, parameters excluded; naive sum over every save) for one forward."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    naive = 0

    def pack(t):
        nonlocal naive
        naive += t.numel() * t.element_size()
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, batch, args)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()), naive


def make_batch(args):
    import torch

    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)


def run_variant(variant: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = apply(build(args), variant, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    batch = make_batch(args)
    cuda = args.device.startswith("cuda")
    times = []
    with epilogue_mode(variant):
        if args.compile or variant.endswith(
            "+compile"
        ):  # compile outside the saved-tensor hooks (they would be traced into the graph)
            loss_of(model, batch, args).backward()
            model.zero_grad(set_to_none=True)
        saved, naive = saved_bytes(model, batch, args)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            loss = loss_of(model, batch, args)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "step_time_s": statistics.median(times),
        "step_times_s": times,
        "trainable_params": sum(p.numel() for p in params),
        "saved_for_backward_bytes": saved,
        "saved_for_backward_bytes_naive": naive,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "loss": float(loss),
    }


def time_interleaved(args, variants) -> dict[str, list[float]]:
    import torch

    torch.set_num_threads(args.threads)
    batch = make_batch(args)
    runs = {}
    for v in variants:
        model = apply(build(args), v, args)
        model.train()
        runs[v] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False))
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    n = len(variants)
    for i in range(args.warmup + args.steps):
        order = variants[i % n :] + variants[: i % n]
        for v in order:
            model, opt = runs[v]
            with epilogue_mode(v):
                t0, c0 = time.perf_counter(), time.process_time()
                loss_of(model, batch, args).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times[v].append(time.perf_counter() - t0)
                    cpu[v].append(time.process_time() - c0)
    return times, cpu


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_allocated(fn, device: str) -> int:
    """Peak bytes allocated while fn runs, above what was resident before. CUDA: the allocator's peak. CPU: the
    process's peak RSS above its RSS before fn; the child runs with MALLOC_MMAP_THRESHOLD_ low, so every large
    tensor is its own mapping, returned to the OS when freed, and RSS follows the live tensors."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    before = _rss_bytes()
    if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > before + (64 << 20):
        print(
            "warning: peak RSS before the loss is above the current RSS; the loss peak may be under-reported",
            file=sys.stderr,
        )
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def run_loss_memory(mode: str, args) -> dict:
    """lm_head + CE forward and backward over loss_tokens hidden states; plain (whole fp32 logits) or chunked."""
    import torch
    import torch.nn.functional as F

    from dora_dist.losses import linear_cross_entropy_sum

    torch.set_num_threads(args.threads)
    dtype = torch_dtype(args)
    gen = torch.Generator(device=args.device).manual_seed(0)
    # built in place in their final dtype: no temporary larger than the tensors raises the RSS high-water mark
    hidden = torch.empty(args.loss_tokens, args.hidden, device=args.device, dtype=dtype).normal_(0, 0.25, generator=gen)
    hidden.requires_grad_(True)
    weight = torch.empty(args.vocab, args.hidden, device=args.device, dtype=dtype).normal_(
        0, args.hidden**-0.5, generator=gen
    )
    labels = torch.randint(0, args.vocab, (args.loss_tokens,), generator=gen, device=args.device)
    # warm-up on a few tokens (kernel libraries, thread pools) so their memory is not counted as the loss's
    linear_cross_entropy_sum(hidden[:8].detach(), weight, labels[:8], chunk_tokens=8)
    F.cross_entropy(F.linear(hidden[:8].detach(), weight).float(), labels[:8])
    out = {}

    def plain():
        out["loss"] = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")
        out["loss"].backward()

    def chunked():
        out["loss"] = linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=args.loss_chunk)
        out["loss"].backward()

    fn = plain if mode == "plain" else chunked
    t0 = time.perf_counter()
    peak = peak_allocated(fn, args.device)
    dt = time.perf_counter() - t0
    grad_bytes = hidden.numel() * hidden.element_size()
    return {
        "mode": mode,
        "peak_bytes": peak,
        "grad_hidden_bytes": grad_bytes,
        "time_s": dt,
        "loss": float(out["loss"]),
        "tokens": args.loss_tokens,
        "vocab": args.vocab,
        "chunk_tokens": args.loss_chunk if mode == "chunked" else None,
        "fp32_logits_bytes": args.loss_tokens * args.vocab * 4,
    }


def child(args_list: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # large tensors: own mappings, freed to the OS
    proc = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.stderr[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
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
    p.add_argument("--loss-chunk", type=int, default=512, help="tokens per loss chunk (0: whole fp32 logits)")
    p.add_argument("--loss-memory", action="store_true", help="also measure the loss's peak memory, plain vs chunked")
    p.add_argument("--loss-tokens", type=int, default=4096, help="tokens for --loss-memory (a 4k sequence)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder block (training.compile)")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of " + ",".join(VARIANTS) + "; a '+compile' suffix compiles that one",
    )
    p.add_argument("--skip-memory", action="store_true", help="no per-variant memory subprocesses")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train_bench.json"))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant
    p.add_argument("--loss-mode", choices=("plain", "chunked"), help=argparse.SUPPRESS)  # internal
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return 0
    if args.loss_mode:
        print(json.dumps(run_loss_memory(args.loss_mode, args)))
        return 0
    variants = tuple(v for v in args.variants.split(",") if v)
    results: dict = {v: {} for v in variants}
    passthrough = [a for a in sys.argv[1:] if a != "--loss-memory"]
    if not args.skip_memory:
        for variant in variants:
            results[variant] = r = child([*passthrough, "--variant", variant, "--steps", "2"])
            if "error" in r:
                continue
            print(
                f"{variant:24s} saved-for-backward {r['saved_for_backward_bytes'] / 2**20:8.1f} MiB "
                f"(naive {r['saved_for_backward_bytes_naive'] / 2**20:8.1f})  peak RSS "
                f"{r['peak_rss_bytes'] / 2**20:8.0f} MiB"
                + (f"  CUDA peak {r['cuda_peak_bytes'] / 2**20:8.0f} MiB" if r["cuda_peak_bytes"] else "")
            )
    loss_memory = {}
    if args.loss_memory:
        for mode in ("plain", "chunked"):
            loss_memory[mode] = r = child([*passthrough, "--loss-mode", mode])
            if "error" not in r:
                print(
                    f"loss {mode:8s} ({r['tokens']} tokens × {r['vocab']} vocab, {args.dtype}): peak "
                    f"{r['peak_bytes'] / 2**20:8.1f} MiB  (fp32 logits alone {r['fp32_logits_bytes'] / 2**20:.1f} MiB,"
                    f" hidden grad {r['grad_hidden_bytes'] / 2**20:.1f} MiB)"
                )
        if all("peak_bytes" in r for r in loss_memory.values()):
            loss_memory["chunked_vs_plain"] = loss_memory["chunked"]["peak_bytes"] / loss_memory["plain"]["peak_bytes"]
            print(f"loss peak memory chunked / plain: ×{loss_memory['chunked_vs_plain']:.3f}")
    # timing after the memory runs: a child inherits its parent's peak RSS at fork, so the parent stays small
    interleaved, cpu = time_interleaved(args, variants) if args.steps else ({}, {})
    for variant, r in results.items():
        if variant in interleaved:
            if "step_time_s" in r:
                r["alone_step_time_s"] = r["step_time_s"]
            r["step_times_s"] = interleaved[variant]
            r["step_time_s"] = statistics.median(interleaved[variant])
            r["cpu_times_s"] = cpu[variant]
            r["cpu_time_s"] = statistics.median(cpu[variant])
            print(
                f"{variant:24s} median step {1000 * r['step_time_s']:8.1f} ms wall, {1000 * r['cpu_time_s']:8.1f} ms "
                f"process CPU (interleaved, {args.steps} steps)"
            )
    ratios = {}
    lora = results.get("dora_dist-lora", {})
    for v in variants:
        r = results.get(v, {})
        if v == "dora_dist-lora" or "step_time_s" not in r or "step_time_s" not in lora:
            continue
        # wall: median over steps; cpu: median of process CPU time (robust to other processes on a shared machine);
        # paired: median over rounds of this variant's step / LoRA's step in the same round
        paired = [a / b for a, b in zip(r["cpu_times_s"], lora["cpu_times_s"], strict=True)]
        ratios[v] = {
            "time_vs_lora": r["step_time_s"] / lora["step_time_s"],
            "cpu_time_vs_lora": r["cpu_time_s"] / lora["cpu_time_s"],
            "cpu_time_vs_lora_paired_median": statistics.median(paired),
        }
        if "saved_for_backward_bytes" in r and "saved_for_backward_bytes" in lora:
            ratios[v]["saved_for_backward_vs_lora"] = r["saved_for_backward_bytes"] / lora["saved_for_backward_bytes"]
            ratios[v]["extra_saved_bytes_over_lora"] = r["saved_for_backward_bytes"] - lora["saved_for_backward_bytes"]
        line = (
            f"{v:24s} vs LoRA: time ×{ratios[v]['time_vs_lora']:.3f} wall, ×{ratios[v]['cpu_time_vs_lora']:.3f} CPU "
            f"(paired ×{ratios[v]['cpu_time_vs_lora_paired_median']:.3f})"
        )
        if "saved_for_backward_vs_lora" in ratios[v]:
            line += (
                f", saved-for-backward ×{ratios[v]['saved_for_backward_vs_lora']:.3f} "
                f"(+{ratios[v]['extra_saved_bytes_over_lora'] / 2**20:.1f} MiB)"
            )
        print(line)
    for v in variants:
        eager = v.split("+")[0]
        if v.endswith("+compile") and "step_time_s" in results.get(v, {}) and "step_time_s" in results.get(eager, {}):
            ratios[f"{v}_vs_eager"] = {
                "time": results[v]["step_time_s"] / results[eager]["step_time_s"],
                "cpu_time": results[v]["cpu_time_s"] / results[eager]["cpu_time_s"],
            }
            print(
                f"{v:24s} vs eager {eager}: time ×{ratios[f'{v}_vs_eager']['time']:.3f} wall, "
                f"×{ratios[f'{v}_vs_eager']['cpu_time']:.3f} CPU"
            )
    if "dora_dist-dora+compile" in results and "dora_dist-lora+compile" in results:
        dc, lc = results["dora_dist-dora+compile"], results["dora_dist-lora+compile"]
        if "step_time_s" in dc and "step_time_s" in lc:
            ratios["compiled_dora_vs_compiled_lora"] = {
                "time": dc["step_time_s"] / lc["step_time_s"],
                "cpu_time": dc["cpu_time_s"] / lc["cpu_time_s"],
            }
            print(
                f"compiled DoRA vs compiled LoRA: time ×{ratios['compiled_dora_vs_compiled_lora']['time']:.3f} wall, "
                f"×{ratios['compiled_dora_vs_compiled_lora']['cpu_time']:.3f} CPU"
            )
    fused, unfused = ratios.get("dora_dist-dora", {}), ratios.get("dora_dist-dora-unfused", {})
    if "extra_saved_bytes_over_lora" in fused and unfused.get("extra_saved_bytes_over_lora"):
        ratios["extra_saved_reduction_vs_unfused"] = 1 - (
            fused["extra_saved_bytes_over_lora"] / unfused["extra_saved_bytes_over_lora"]
        )
        print(
            f"DoRA's extra saved-for-backward over LoRA: {100 * ratios['extra_saved_reduction_vs_unfused']:.1f}% "
            "below the unfused epilogue"
        )
    if "time_vs_lora" in fused and "time_vs_lora" in unfused:
        ratios["fused_vs_unfused_time"] = fused["time_vs_lora"] / unfused["time_vs_lora"]
    setup = {k: v for k, v in vars(args).items() if k not in ("variant", "out", "loss_mode")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"setup": setup, "results": results, "ratios": ratios, "loss_memory": loss_memory}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
