"""FSDP2 bf16 vs FSDP2 4-bit (Sharded4bitTensor): bytes all-gathered per step and peak memory per rank.

    python benchmarks/fsdp_allgather_bench.py                 # 1, 2 and 4 gloo CPU processes
    python benchmarks/fsdp_allgather_bench.py --ranks 2 --hidden 2048 --layers 4 --steps 3
    (on GPUs: --backend nccl, one process per GPU; peak memory is then torch.cuda.max_memory_allocated)

The model is a stack of DoRA layers (r=16) over (out=hidden, in=hidden) bases, one fully_shard unit per layer and
the root; the two variants differ only in the base: nn.Linear in bf16, or ShardedLinear4bit (nf4, double quant,
bf16 compute). Both are built on the meta device and materialized shard by shard, so no rank ever holds the full
model, as in a real job. Counted per rank and per step (forward + backward, FSDP re-gathers in backward):
- all-gather bytes: what FSDP2's all-gather writes into this rank's unsharded buffers (output size), and what this
  rank contributes (input size), by wrapping FSDP2's DefaultAllGather;
- peak memory: on CPU, the peak resident set size (sampled every 0.5 ms) minus the resident size just before the
  model was built (includes weights, gathered buffers, activations, adapter grads and AdamW state).
Not a test: prints a table and the 4-bit / bf16 ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time

import torch
import torch.multiprocessing as mp
from torch import nn


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __init__(self, interval=0.0005):
        self.interval, self.peak, self._stop = interval, _rss_bytes(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


class Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return x + torch.tanh(self.layer(x))


def build(kind: str, hidden: int, layers: int):
    from dora_dist.nn.dora_linear import DoRALinear
    from dora_dist.quant.sharded4bit_linear import ShardedLinear4bit

    blocks = []
    with torch.device("meta"):
        for _ in range(layers):
            if kind == "bf16":
                base = nn.Linear(hidden, hidden, bias=False, dtype=torch.bfloat16)
                base.weight.requires_grad_(False)
            else:
                base = ShardedLinear4bit.empty(hidden, hidden, False, "nf4", 64, True, torch.bfloat16, device="meta")
            blocks.append(Block(DoRALinear(base, r=16, alpha=32, init_magnitude=False)))
    return nn.Sequential(*blocks)


@torch.no_grad()
def fill(model, hidden: int, seed: int):
    """Random real weights for this rank's rows only (quantized per shard for the 4-bit base)."""
    from dora_dist.nn.dora_linear import DoRALinear
    from dora_dist.quant.sharded4bit import Sharded4bitTensor

    g = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if not isinstance(layer, DoRALinear):
            continue
        w = layer.base_layer.weight
        local = w._local_tensor if hasattr(w, "_local_tensor") else w
        rows = local.shape[0]
        dense = torch.randn(rows, hidden, generator=g) * 0.02
        if isinstance(local, Sharded4bitTensor):
            local.copy_(
                Sharded4bitTensor.from_dense(dense.to(torch.bfloat16), "nf4", 64, True, torch.bfloat16).to(local.device)
            )
        else:
            local.copy_(dense.to(local.dtype))
        for name in ("lora_A", "lora_B", "magnitude"):
            p = getattr(layer, name)
            loc = p._local_tensor if hasattr(p, "_local_tensor") else p
            if name == "lora_A":
                loc.copy_(torch.randn(loc.shape, generator=g) * 0.01)
            elif name == "lora_B":
                loc.zero_()
            else:
                loc.fill_(1.0)
        layer.invalidate_cache()


def _worker(rank, world, port, args, kind, out_file):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as coll

    from dora_dist.parallel.fsdp2 import init_sharded_norms

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    counts = {"out": 0, "in": 0, "calls": 0}
    orig = coll.DefaultAllGather.__call__

    def counting(self, output_tensor, input_tensor, group, async_op=False):
        counts["out"] += output_tensor.numel() * output_tensor.element_size()
        counts["in"] += input_tensor.numel() * input_tensor.element_size()
        counts["calls"] += 1
        return orig(self, output_tensor, input_tensor, group, async_op)

    coll.DefaultAllGather.__call__ = counting
    try:
        import bitsandbytes  # noqa: F401  (loaded before the baseline for both variants)

        base_rss = _rss_bytes()
        model = build(kind, args.hidden, args.layers)
        # No param-dtype cast: the bf16 base is gathered as bf16, the 4-bit one as packed bytes dequantized to
        # bf16; the fp32 adapters are gathered as fp32 in both variants (activations stay fp32: fast on CPUs).
        for block in model:
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device=device)
        fill(model, args.hidden, seed=rank)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        init_sharded_norms(model, device) if kind == "nf4" else None
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(device)
        per_step = []
        with PeakRSS() as peak:
            for _ in range(args.steps):
                counts.update(out=0, **{"in": 0}, calls=0)
                t0 = time.perf_counter()
                model(x).float().pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                if cuda:
                    torch.cuda.synchronize()
                per_step.append(
                    {
                        "out": counts["out"],
                        "in": counts["in"],
                        "calls": counts["calls"],
                        "time_s": time.perf_counter() - t0,
                    }
                )
        last = per_step[-1]
        result = {
            "kind": kind,
            "world": world,
            "rank": rank,
            "ag_out_bytes": last["out"],
            "ag_in_bytes": last["in"],
            "ag_calls": last["calls"],
            "step_time_s": min(s["time_s"] for s in per_step),
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else peak.peak - base_rss,
        }
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(result, f)
    finally:
        coll.DefaultAllGather.__call__ = orig
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(world, kind, args):
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fsdp_ag_bench_") as d:
        out = os.path.join(d, "r.json")
        mp.spawn(_worker, args=(world, _free_port(), args, kind, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mib = 1 / 2**20
    print(
        f"# FSDP2 all-gather benchmark: {args.layers} DoRA layers {args.hidden}x{args.hidden}, r=16, "
        f"batch {args.batch}x{args.seq}, backend {args.backend}; per rank, per step (fwd+bwd)"
    )
    print(
        f"{'ranks':>5} {'base':>5} {'AG recv MiB':>12} {'AG sent MiB':>12} {'AG calls':>9} {'peak MiB':>9} "
        f"{'step s':>7}"
    )
    rows = []
    for world in args.ranks:
        res = {kind: run_one(world, kind, args) for kind in ("bf16", "nf4")}
        for kind, r in res.items():
            print(
                f"{world:>5} {kind:>5} {r['ag_out_bytes'] * mib:>12.3f} {r['ag_in_bytes'] * mib:>12.3f} "
                f"{r['ag_calls']:>9} {r['peak_bytes'] * mib:>9.1f} {r['step_time_s']:>7.3f}"
            )
        ratio_ag = res["nf4"]["ag_out_bytes"] / max(1, res["bf16"]["ag_out_bytes"])
        ratio_peak = res["nf4"]["peak_bytes"] / max(1, res["bf16"]["peak_bytes"])
        ag = f"{ratio_ag:.3f}" if res["bf16"]["ag_out_bytes"] else "n/a (one rank: no all-gather)"
        print(f"{world:>5} ratio 4-bit/bf16: all-gather bytes {ag}, peak memory {ratio_peak:.3f}")
        rows.append(
            {
                "world": world,
                **{f"{k}_{m}": v[m] for k, v in res.items() for m in v if m != "kind"},
                "ratio_allgather": ratio_ag,
                "ratio_peak": ratio_peak,
            }
        )
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
