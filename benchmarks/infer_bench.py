"""Generation speed of one adapted model, four ways: LoRA, DoRA without the scale cache, DoRA with it (the default
in eval mode), and DoRA merged into the weights. transformers' `generate` (greedy, KV cache) on the built-in tiny
Llama; the variants run round-robin in one process so drift in machine load hits all of them alike.

Per variant: the median time of `generate` with 1 new token (prefill) and with N new tokens; the decode time per
token is (t_N - t_1) / (N - 1). Ratios are decode times relative to LoRA.

    python benchmarks/infer_bench.py                        # writes benchmarks/results/infer_bench_cpu.json
    python benchmarks/infer_bench.py --new-tokens 64 --reps 9 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dora_dist.adapters import DoRAConfig, apply_dora, dora_layers, merge_and_unload
from dora_dist.nn.dora_linear import DoRALinear

VARIANTS = ("lora", "dora_uncached", "dora_cached", "merged")


def base_model(cache_dir: str | None):
    from transformers import AutoModelForCausalLM

    from dora_dist.config import load_config
    from dora_dist.models import resolve_model_path

    cfg = load_config(None, [f"model.cache_dir={cache_dir}"] if cache_dir else [])
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg), dtype=torch.float32)
    model.config.use_cache = True
    return model.eval()


def adapted(model, use_dora: bool, r: int):
    model = apply_dora(copy.deepcopy(model), DoRAConfig(r=r, alpha=2 * r, use_dora=use_dora))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in dora_layers(model):  # a trained-looking adapter: B != 0, m != ‖W‖
            layer.lora_B.normal_(0, 0.02)
            if layer.magnitude is not None:
                layer.magnitude.mul_(1.01)
    return model.eval().requires_grad_(False)


def timed_generate(model, ids, new_tokens: int, cached: bool) -> float:
    DoRALinear.cache_inference_scale = cached
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=0,
            )
        return time.perf_counter() - t0
    finally:
        DoRALinear.cache_inference_scale = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "infer_bench_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = base_model(args.cache_dir)
    dora = adapted(base, True, args.r)
    models = {
        "lora": adapted(base, False, args.r),
        "dora_uncached": dora,
        "dora_cached": dora,
        "merged": merge_and_unload(copy.deepcopy(dora)),
    }
    cached = {"lora": True, "dora_uncached": False, "dora_cached": True, "merged": True}
    ids = torch.randint(5, base.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    for name in VARIANTS:  # warm-up
        timed_generate(models[name], ids, 4, cached[name])
    t1: dict[str, list[float]] = {v: [] for v in VARIANTS}
    tn: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.reps):  # round-robin
        for name in VARIANTS:
            t1[name].append(timed_generate(models[name], ids, 1, cached[name]))
            tn[name].append(timed_generate(models[name], ids, args.new_tokens, cached[name]))
    results = {}
    for name in VARIANTS:
        prefill, total = statistics.median(t1[name]), statistics.median(tn[name])
        decode = (total - prefill) / (args.new_tokens - 1)
        results[name] = {
            "prefill_s": prefill,
            "generate_s": total,
            "decode_ms_per_token": 1e3 * decode,
            "tokens_per_s": args.new_tokens / total,
        }
    lora = results["lora"]["decode_ms_per_token"]
    ratios = {f"{name}/lora": results[name]["decode_ms_per_token"] / lora for name in VARIANTS if name != "lora"}
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "cache_dir")}
    out = {
        "config": {**settings, "model": "builtin:tiny-llama", "layers": len(list(dora_layers(dora)))},
        "results": results,
        "decode_time_ratios": ratios,
        "torch": torch.__version__,
        "goal": "dora_cached/lora <= 1.05",
    }
    for name in VARIANTS:
        r = results[name]
        print(
            f"{name:>14}: {r['tokens_per_s']:8.1f} tok/s  decode {r['decode_ms_per_token']:.3f} ms/token"
            + (f"  ({ratios[name + '/lora']:.3f}x LoRA)" if name != "lora" else "")
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
