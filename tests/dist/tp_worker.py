"""Run under `torchrun --nproc-per-node 2` (tp=2) or `4` (dp=2 × tp=2) by tests/dist/test_tensor_parallel.py: one
launch per world size, several cases, so the slow process start is paid once.

- world 2: the magnitude init and forward of a tp=2 model with nonzero lora_B against the unsplit model, dense and
  NF4 (with the health rows of the split 4-bit layers); fsdp2 and ddp training runs with tp=2 (float64, collectives
  counted) and a ddp NF4 run (float32, counted); a ddp tp=2 run stopped at step 2 (checkpoint), then
  resumed to step 4 with tp=1 (ddp over the same 2 processes); an fsdp2 tp=2 run stopped at step 2 that the test
  resumes in one process.
- world 4: fsdp2 and ddp training runs on a dp=2 × tp=2 mesh, and a ddp NF4 one (collectives counted); an fsdp2
  dp=2 × tp=2 run stopped at step 2 and resumed on the same mesh.
Rank 0 writes <workdir>/results_w<world>.json; the test compares with one-process runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.distributed as dist

STEPS = 4


def overrides(cache: str, out: str, engine: str, extra: list[str]) -> list[str]:
    # float64 base and adapters: engines then differ from one process only by reduction order (~1e-16), which AdamW
    # cannot amplify past ~1e-10 in 4 steps (tests/dist/engine_worker.py)
    return [
        f"model.cache_dir={cache}",
        "data.seq_len=32",
        "data.synthetic_samples=120",
        "data.eval_fraction=0.1",  # an eval at the end (tp groups evaluate the same batches)
        f"training.max_steps={STEPS}",
        "training.global_batch_size=8",
        "training.micro_batch_size=2",
        "training.lr=5e-3",
        "training.warmup_steps=1",
        "model.dtype=float64",
        "dora.adapter_dtype=float64",
        "output.progress_bar=false",
        "output.plot=false",
        "checkpoint.resume=none",
        "checkpoint.every_steps=0",
        f"output.dir={out}",
        f"parallel.engine={engine}",
        *extra,
    ]


RUNS = {
    2: {"fsdp2_tp2": ("fsdp2", ["parallel.tp=2"]), "ddp_tp2": ("ddp", ["parallel.tp=2"])},
    4: {"fsdp2_dp2tp2": ("fsdp2", ["parallel.tp=2"]), "ddp_dp2tp2": ("ddp", ["parallel.tp=2"])},
}
#: 4-bit (NF4) bases: float32 (bitsandbytes dequantizes to 16/32-bit floats only), ddp (the engine that splits them),
#: a model whose split widths are whole 64-value quantization blocks per rank (the built-in's o_proj, 192 inputs, is
#: not: 96 per rank)
NF4_ARCH = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256}
NF4 = [
    "model.dtype=float32",
    "dora.adapter_dtype=float32",
    "quantization.mode=nf4",
    "quantization.compute_dtype=float32",
    "model.config={" + ", ".join(f"{k}: {v}" for k, v in {**NF4_ARCH, "num_hidden_layers": 2}.items()) + "}",
]
NF4_RUNS = {
    2: {"ddp_tp2_nf4": ("ddp", ["parallel.tp=2", *NF4])},
    4: {"ddp_dp2tp2_nf4": ("ddp", ["parallel.tp=2", *NF4])},
}
#: the resume case (world 2): tp=2 to step 2 with a checkpoint, then tp=1 to STEPS from it
RESUME_FIRST = ["parallel.tp=2", "training.max_steps=2", "checkpoint.every_steps=2", "output.save_adapter=false"]


def magnitude_check() -> dict:
    """Split a model whose lora_B is nonzero over tp: the gathered magnitudes equal the unsplit layer's norms and
    the forward equals the unsplit model's (both kinds of split, norms with the B·A terms)."""
    from transformers import AutoModelForCausalLM

    from dora_dist.adapters import apply_dora, dora_layers
    from dora_dist.config import load_config
    from dora_dist.models import dora_config_from, hf_config_from_dict
    from dora_dist.parallel.mesh import build_mesh, resolve_dims
    from dora_dist.parallel.tp import apply_tensor_parallel

    cfg = load_config(None, ["parallel.engine=ddp", "parallel.tp=2"])
    arch = {
        "model_type": "llama",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config_from_dict(arch)).double()
    apply_dora(model, dora_config_from(cfg), init_magnitude=False)
    with torch.no_grad():
        for _, layer in dora_layers(model):
            layer.lora_A.data = layer.lora_A.data.double()
            layer.lora_B.data = torch.randn_like(layer.lora_B, dtype=torch.float64) * 0.05
            layer.magnitude.data = layer.magnitude.data.double()
    ref = copy.deepcopy(model)
    for _, layer in dora_layers(ref):
        layer.init_magnitude()
    mesh = build_mesh(resolve_dims(cfg, dist.get_world_size(), None, "ddp"), "cpu")
    plan = apply_tensor_parallel(model, mesh)
    errs = {}
    for name, layer in dora_layers(model):
        full = layer.magnitude.full_tensor()
        want = dict(dora_layers(ref))[name].magnitude
        errs[name] = float((full - want).abs().max() / want.abs().max())
    x = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        fwd = float((model(input_ids=x).logits - ref(input_ids=x).logits).abs().max())
    return {"plan": plan, "magnitude_rel_err": errs, "forward_max_err": fwd}


def _to_nf4(model: torch.nn.Module) -> None:
    """Every decoder linear of `model` as a bitsandbytes NF4 Linear4bit (double quant, fp32 compute), in place."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            q = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
            )
            q.load_state_dict({"weight": module.weight.detach().float()})
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))  # bitsandbytes quantizes here


def nf4_check() -> dict:
    """magnitude_check on an NF4 base (fp32): the split model's magnitudes and forward against the unsplit one, and
    each split layer's health rows (parallel/tp.py tp_row_view over the rank's part of the packed weight) against the
    unsplit layer's rows."""
    from transformers import AutoModelForCausalLM

    from dora_dist.adapters import apply_dora, dora_layers
    from dora_dist.config import load_config
    from dora_dist.health import RowView
    from dora_dist.models import dora_config_from, hf_config_from_dict
    from dora_dist.parallel.mesh import build_mesh, resolve_dims
    from dora_dist.parallel.tp import apply_tensor_parallel, tp_row_view

    cfg = load_config(None, ["parallel.engine=ddp", "parallel.tp=2", "quantization.mode=nf4"])
    arch = {"model_type": "llama", "vocab_size": 96, "num_hidden_layers": 1, **NF4_ARCH}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config_from_dict(arch)).float()
    _to_nf4(model)
    apply_dora(model, dora_config_from(cfg), init_magnitude=False)
    with torch.no_grad():
        for _, layer in dora_layers(model):
            layer.lora_B.data = torch.randn_like(layer.lora_B) * 0.05
    ref = copy.deepcopy(model)
    for _, layer in dora_layers(ref):
        layer.init_magnitude()
    mesh = build_mesh(resolve_dims(cfg, dist.get_world_size(), None, "ddp"), "cpu")
    plan = apply_tensor_parallel(model, mesh)
    refs = dict(dora_layers(ref))
    errs, health = {}, {}
    for name, layer in dora_layers(model):
        want = refs[name].magnitude
        errs[name] = float((layer.magnitude.detach().full_tensor() - want).abs().max() / want.abs().max())
        got = tp_row_view(name, layer, True, torch.device("cpu"))
        whole = RowView.whole_layer(name, refs[name], True)
        rows = got.rows
        w = refs[name].weight_source.dense(torch.float32)
        health[name] = {
            "row_sq_rel": float(((got.row_sq - whole.row_sq[rows]) / whole.row_sq[rows]).abs().max()),
            "w_times_a": float((got.w_times_a - whole.w_times_a[rows]).abs().max()),
            # |Σ w·a computed in two orders| ≤ 2·n·u·Σ|w|·|a| (fp32, n = in_features terms)
            "w_times_a_bound": float(2 * w.shape[1] * 2.0**-24 * (w.abs() @ whole.lora_A.abs().t()).max()),
            "in_features": w.shape[1],
            "out_features": w.shape[0],
            "lora_A": float((got.lora_A - whole.lora_A).abs().max()),
            "rows": rows.tolist(),
        }
    x = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        want_logits = ref(input_ids=x).logits
        fwd = float((model(input_ids=x).logits - want_logits).abs().max() / want_logits.abs().max())
    return {"plan": plan, "magnitude_rel_err": errs, "forward_rel_err": fwd, "health": health}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--cache", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    from dora_dist.config import load_config
    from dora_dist.train import train

    results: dict = {}
    if world == 2:
        results["magnitude"] = magnitude_check()
        results["nf4"] = nf4_check()
    for name, (engine, extra) in {**RUNS[world], **NF4_RUNS[world]}.items():
        out = os.path.join(args.workdir, name)
        os.environ.update(DORA_DIST_COUNT_COMM="1", DORA_DIST_COUNT_COMM_DIR=os.path.join(out, "probe"))
        train(load_config(None, overrides(args.cache, out, engine, extra)))
    os.environ.pop("DORA_DIST_COUNT_COMM", None)
    if world == 4:  # a dp=2 × tp=2 fsdp2 checkpoint resumed on the same mesh
        out = os.path.join(args.workdir, "resume_tp2_to_tp2")
        train(load_config(None, overrides(args.cache, out, "fsdp2", RESUME_FIRST)))
        train(load_config(None, overrides(args.cache, out, "fsdp2", ["parallel.tp=2", "checkpoint.resume=auto"])))
    if world == 2:
        out = os.path.join(args.workdir, "resume_tp2_to_tp1")
        train(load_config(None, overrides(args.cache, out, "ddp", RESUME_FIRST)))
        train(load_config(None, overrides(args.cache, out, "ddp", ["checkpoint.resume=auto"])))
        # a tp=2 checkpoint at step 2 that the test resumes in one process
        train(
            load_config(
                None, overrides(args.cache, os.path.join(args.workdir, "resume_tp2_to_one"), "fsdp2", RESUME_FIRST)
            )
        )
    if dist.get_rank() == 0:
        with open(os.path.join(args.workdir, f"results_w{world}.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
