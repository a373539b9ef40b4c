"""One layer, forward + backward: LoRA vs our DoRA vs peft's DoRA, all in one run.

Reports the median step time and memory of each, and the ratios DoRA/LoRA and peft/ours. Memory is the
activation memory saved for backward (unique storages, parameters excluded), measured with autograd's
saved-tensor hooks, on every device; on CUDA the peak allocated memory above the resident weights is reported
too. Variants run round-robin so drift in machine load hits all of them alike.

    python benchmarks/layer_bench.py                       # CPU default: 4096x4096, 2048 tokens, r=16, dense
    python benchmarks/layer_bench.py --base nf4 --json out.json
    python benchmarks/layer_bench.py --device cuda --dtype bfloat16 --tokens 8192
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from contextlib import contextmanager

import torch
from torch import nn

from dora_dist.nn.dora_linear import DoRALinear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Holder(nn.Module):
    """A one-layer model so peft can target the layer by name."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def make_base(kind: str, n_in: int, n_out: int, dtype: torch.dtype, device: str) -> nn.Module:
    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out, bias=False)
    if kind == "dense":
        return dense.to(device=device, dtype=dtype)
    import bitsandbytes as bnb

    if kind in ("nf4", "fp4"):
        layer = bnb.nn.Linear4bit(
            n_in, n_out, bias=False, compute_dtype=dtype, quant_type=kind, compress_statistics=True
        )
    elif kind == "int8":
        layer = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False, threshold=0.0)
    else:
        raise SystemExit(f"unknown --base {kind!r}; choose dense, nf4, fp4 or int8")
    layer.load_state_dict(dense.state_dict())
    return layer.to(device)


def make_variants(args, device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    base = make_base(args.base, args.in_features, args.out_features, dtype, device)
    # LoRA/DoRA share one code path; adapters kept in fp32 as peft does by default.
    variants = {
        "lora": DoRALinear(copy.deepcopy(base), r=args.rank, alpha=2 * args.rank, use_dora=False),
        "dora": DoRALinear(copy.deepcopy(base), r=args.rank, alpha=2 * args.rank),
    }
    if not args.no_peft:
        import peft

        cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["proj"], use_dora=True)
        variants["peft_dora"] = peft.get_peft_model(Holder(copy.deepcopy(base)), cfg)
    for module in variants.values():
        module.to(device)
        module.train()
        for name, p in module.named_parameters():
            if "lora" in name or "magnitude" in name:
                p.requires_grad_(True)
                if "lora_B" in name:
                    nn.init.normal_(p, std=0.01)  # a trained adapter, not the B = 0 start
    return variants


@contextmanager
def saved_activation_bytes(params: set[int], out: list[int]):
    """Sum the unique storages autograd saves for backward, excluding the storages of parameters and the input."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:  # weights are resident, not activations
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    out.append(sum(seen.values()))


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    y = module(x)
    y.backward(grad)


def run(args) -> dict:
    device = args.device
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads) if args.threads else None
    variants = make_variants(args, device, dtype)
    x = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, args.out_features, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    results = {name: {"times": []} for name in variants}
    failed: dict[str, str] = {}
    for name, module in list(variants.items()):  # warm-up + memory
        params = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
        saved: list[int] = []
        try:
            for _ in range(max(2, args.warmup)):  # at least 2: some implementations fail only on a second step
                step(module, x, grad)
            with saved_activation_bytes(params, saved):
                y = module(x)
            y.backward(grad)
        except Exception as exc:  # report a broken competitor instead of hiding the rest of the table
            failed[name] = f"{type(exc).__name__}: {exc}"
            del variants[name], results[name]
            continue
        results[name]["saved_activation_bytes"] = saved[0]
        if device.startswith("cuda"):
            del y
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            step(module, x, grad)
            torch.cuda.synchronize()
            results[name]["peak_bytes_above_resident"] = torch.cuda.max_memory_allocated() - base_mem
    for _ in range(args.repeat):  # round-robin timing
        for name, module in variants.items():
            x.grad = None
            module.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            step(module, x, grad)
            sync()
            results[name]["times"].append(time.perf_counter() - t0)
    for r in results.values():
        r["median_s"] = statistics.median(r["times"])

    act = args.tokens * args.out_features * torch.tensor([], dtype=dtype).element_size()
    lora, dora = results["lora"], results["dora"]
    ratios = {
        "dora_over_lora_time": dora["median_s"] / lora["median_s"],
        "dora_extra_activation_bytes": dora["saved_activation_bytes"] - lora["saved_activation_bytes"],
        "dora_extra_in_activations": (dora["saved_activation_bytes"] - lora["saved_activation_bytes"]) / act,
    }
    if "peft_dora" in results:
        peft_r = results["peft_dora"]
        ratios.update(
            {
                "peft_over_ours_time": peft_r["median_s"] / dora["median_s"],
                "peft_over_lora_time": peft_r["median_s"] / lora["median_s"],
                "peft_extra_in_activations": (peft_r["saved_activation_bytes"] - lora["saved_activation_bytes"]) / act,
            }
        )
    return {
        "config": vars(args),
        "one_activation_bytes": act,
        "results": results,
        "ratios": ratios,
        "failed": failed,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    }


def print_table(report: dict) -> None:
    cfg = report["config"]
    print(
        f"layer {cfg['in_features']}x{cfg['out_features']} base={cfg['base']} tokens={cfg['tokens']} "
        f"r={cfg['rank']} dtype={cfg['dtype']} device={report['device_name']} repeat={cfg['repeat']}"
    )
    print(f"{'variant':<10} {'median ms':>10} {'saved act MiB':>14} {'peak MiB':>9}")
    for name, r in report["results"].items():
        peak = r.get("peak_bytes_above_resident")
        peak_s = f"{peak / 2**20:9.1f}" if peak is not None else f"{'n/a':>9}"
        print(f"{name:<10} {r['median_s'] * 1e3:10.1f} {r['saved_activation_bytes'] / 2**20:14.1f} {peak_s}")
    for name, error in report["failed"].items():
        print(f"{name:<10} FAILED: {error[:160]}")
    for key, value in report["ratios"].items():
        print(f"{key:<30} {value:.3f}" if isinstance(value, float) else f"{key:<30} {value}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--base", default="dense", choices=["dense", "nf4", "fp4", "int8"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-peft", action="store_true", help="skip the peft DoRA variant")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    report = run(args)
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
