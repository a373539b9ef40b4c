"""Run under `torchrun --nproc-per-node 2` by tests/dist/test_engines.py (one launch, several checks, so the slow
process start is paid once):

1. DDP and FSDP2 training runs of the tiny quickstart job (4 steps, global batch 8 = 2 ranks × micro 2 × accum 2);
2. a QDoRA (NF4 base) run with DDP (3 steps);
3. an FSDP2 run stopped after step 2 (checkpoint) and resumed to step 4;
4. the FSDP2 magnitude init (from local rows, uneven shards, nonzero lora_B) vs the single-process init;
(--part compile: compiled blocks; --part packing: packed documents isolated under FSDP2.)

Writes a JSON of results (rank 0); the test compares them with a single-process run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def common_overrides(cache: str) -> list[str]:
    # float64 base and adapters: engines then differ from one process only by reduction order at 1e-16, which
    # AdamW's normalisation of near-zero gradients cannot amplify past ~1e-10 (in fp32 it reaches 1e-5 and more,
    # differently on every CPU's GEMM kernels).
    return [
        f"model.cache_dir={cache}",
        "data.seq_len=64",
        "data.synthetic_samples=300",
        "training.max_steps=4",
        "training.global_batch_size=8",
        "training.micro_batch_size=2",
        "training.lr=5e-3",
        "training.warmup_steps=1",
        "output.progress_bar=false",
        "output.plot=false",
        "checkpoint.resume=none",
        "model.dtype=float64",
        "dora.adapter_dtype=float64",
        "training.loss_chunk_tokens=37",
    ]  # 2 × 63 next-token targets per micro-batch: 4 chunks, the last short


#: training.compile runs (issue 14): fewer steps, compared with the eager single-process losses
COMPILE = ["training.compile=true", "training.max_steps=2"]


# bitsandbytes has no float64 kernels: the 4-bit run is fp32 (compared with the AdamW bound, see test_engines.py)
QDORA = [
    "quantization.mode=nf4",
    "quantization.compute_dtype=float32",
    "training.max_steps=3",
    "model.dtype=float32",
    "dora.adapter_dtype=float32",
]


LLAMA_ARCH = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 99,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# GPT-2's Conv1D stores W as (in, out): fully_shard's dim-0 shards are input rows, not output rows.
GPT2_ARCH = {
    "model_type": "gpt2",
    "vocab_size": 128,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 32,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}  # no dropout: forwards are compared


def magnitude_check(
    env, arch: dict = LLAMA_ARCH, probe: str | None = "model.layers.0.mlp.down_proj", extra: tuple[str, ...] = ()
) -> dict:
    from transformers import AutoModelForCausalLM

    from dora_dist.adapters import apply_dora, dora_layers
    from dora_dist.config import load_config
    from dora_dist.models import dora_config_from, hf_config_from_dict
    from dora_dist.parallel.fsdp2 import FSDP2Engine

    cfg = load_config(None, ["parallel.engine=fsdp2", "parallel.load_on_rank0=false", *extra])  # (training: true)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config_from_dict(arch))
    apply_dora(model, dora_config_from(cfg), init_magnitude=False)
    with torch.no_grad():
        for _, layer in dora_layers(model):
            layer.lora_B.normal_(0, 0.05)  # exercise the B != 0 terms of the norm
    ref = copy.deepcopy(model)
    for _, layer in dora_layers(ref):
        layer.init_magnitude()
    ref_state = {n: lyr.magnitude.detach().clone() for n, lyr in dora_layers(ref)}
    ref_rowsq = {n: lyr.base_row_sq_norms().clone() for n, lyr in dora_layers(ref)}
    engine = FSDP2Engine(cfg, env)
    engine.model = engine.wrap(model)
    engine.init_magnitudes(engine.model)
    gathered = engine.adapter_state_dict()
    rowsq_err = max(float((lyr.base_row_sq - ref_rowsq[n]).abs().max()) for n, lyr in dora_layers(model))
    out = {"rowsq_max_err": rowsq_err}
    if env.is_main:
        errs = []
        for name, m in ref_state.items():
            key = f"base_model.model.{name}.lora_magnitude_vector"
            errs.append(float((gathered[key] - m).abs().max() / m.abs().max()))
        out["magnitude_max_rel_err"] = max(errs)
        out["n_layers"] = len(errs)
        if probe is not None:
            local = dict(dora_layers(model))[probe].base_layer.weight.to_local()
            out["probe_local_rows"] = int(local.shape[0])
    # forward of the wrapped model equals the reference forward
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        diff = float((engine.model(input_ids=x).logits - ref(input_ids=x).logits).abs().max())
    out["forward_max_err"] = diff
    return out


def chunked_loss_check(env) -> dict:
    """Under FSDP2, a tied-embedding Llama (the head's weight is the embedding, a root parameter that is a DTensor
    outside forward): the chunked loss and its adapter gradients equal the whole-logits loss's, on every rank."""
    from transformers import AutoModelForCausalLM

    from dora_dist.adapters import apply_dora, dora_layers
    from dora_dist.config import load_config
    from dora_dist.losses import causal_lm_loss_sum, plain_causal_lm_loss_sum
    from dora_dist.models import dora_config_from, hf_config_from_dict
    from dora_dist.parallel.fsdp2 import FSDP2Engine

    cfg = load_config(None, ["parallel.engine=fsdp2", "parallel.load_on_rank0=false"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config_from_dict(dict(LLAMA_ARCH, tie_word_embeddings=True)))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_dora(model, dora_config_from(cfg))
    with torch.no_grad():
        for _, layer in dora_layers(model):
            layer.lora_B.normal_(0, 0.05)
    engine = FSDP2Engine(cfg, env)
    model = engine.wrap(model)
    engine.init_magnitudes(model)
    g = torch.Generator().manual_seed(1 + env.rank)
    ids = torch.randint(0, LLAMA_ARCH["vocab_size"], (2, 21), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    params = [p for p in model.parameters() if p.requires_grad]

    def run(fn):
        loss = fn()
        loss.backward()
        grads = [p.grad.to_local().clone() for p in params]
        for p in params:
            p.grad = None
        return float(loss), grads

    plain_loss, plain_grads = run(lambda: plain_causal_lm_loss_sum(model, ids, None, labels))
    chunk_loss, chunk_grads = run(lambda: causal_lm_loss_sum(model, ids, None, labels, chunk_tokens=6))
    rel = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        for a, b in zip(chunk_grads, plain_grads, strict=True)
    )
    return {
        "loss_rel_err": env.all_reduce_max(abs(chunk_loss - plain_loss) / abs(plain_loss)),
        "grad_max_rel_err": env.all_reduce_max(rel),
    }


def packing_isolation_check(env, cache: str) -> dict:
    """Under FSDP2 (2 ranks, each its own documents): a document's logits and loss packed with any neighbour equal
    the document alone, for text, prompt/completion and chat data (tests/unit/_packing_helpers.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from _packing_helpers import encoded_examples, isolation_errors, tiny_dora_model

    from dora_dist.config import load_config
    from dora_dist.parallel.fsdp2 import FSDP2Engine

    cfg = load_config(None, ["parallel.engine=fsdp2", "parallel.load_on_rank0=false"])
    out = {}
    for fmt in ("text", "prompt_completion", "chat"):
        model, tokenizer = tiny_dora_model(cache)
        engine = FSDP2Engine(cfg, env)
        model = engine.wrap(model)
        engine.init_magnitudes(model)
        examples = encoded_examples(tokenizer, fmt, 10, seed=11)
        errors = isolation_errors(
            model.eval(), examples, targets=[2 * env.rank, 2 * env.rank + 1], neighbours=[4, 5, 6]
        )
        out[fmt] = {key: env.all_reduce_max(value) for key, value in errors.items()}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--part", choices=("main", "compile", "packing"), default="main")
    args = p.parse_args()
    dist.init_process_group("gloo")
    from dora_dist.config import load_config
    from dora_dist.metrics import read_metrics
    from dora_dist.parallel.dist_env import DistEnv
    from dora_dist.train import train

    env = DistEnv.from_environ(device="cpu")
    work = Path(args.workdir)
    results: dict = {"world_size": env.world_size}
    base = common_overrides(args.cache)
    if args.part == "packing":  # a short launch of its own (tests/dist/test_packing_fsdp2.py)
        results["packing"] = packing_isolation_check(env, args.cache)
        if env.is_main:
            Path(args.out).write_text(json.dumps(results, indent=2))
        dist.barrier()
        dist.destroy_process_group()
        return 0
    if args.part == "compile":  # a launch of its own: inductor compiles in every process (minutes on 2 cores)
        for engine in ("ddp", "fsdp2"):
            out = work / f"{engine}_compile"
            train(load_config(None, base + COMPILE + [f"parallel.engine={engine}", f"output.dir={out}"]))
            if env.is_main:
                recs = read_metrics(out)
                results[f"{engine}_compile"] = {
                    "losses": [r["loss"] for r in recs],
                    "grad_norms": [r["grad_norm"] for r in recs],
                }
        if env.is_main:
            Path(args.out).write_text(json.dumps(results, indent=2))
        dist.barrier()
        dist.destroy_process_group()
        return 0
    for engine in ("ddp", "fsdp2"):
        out = work / engine
        train(load_config(None, base + [f"parallel.engine={engine}", f"output.dir={out}"]))
        if env.is_main:
            recs = read_metrics(out)
            results[engine] = {
                "losses": [r["loss"] for r in recs],
                "grad_norms": [r["grad_norm"] for r in recs],
                "adapter": str(out / "adapter"),
            }
    # QDoRA (bitsandbytes NF4 base) with DDP
    out = work / "ddp_nf4"
    train(load_config(None, base + QDORA + ["parallel.engine=ddp", f"output.dir={out}"]))
    if env.is_main:
        recs = read_metrics(out)
        results["ddp_nf4"] = {
            "losses": [r["loss"] for r in recs],
            "grad_norms": [r["grad_norm"] for r in recs],
            "adapter": str(out / "adapter"),
        }
    out = work / "fsdp2_resume"
    resume = base + ["parallel.engine=fsdp2", f"output.dir={out}", "checkpoint.every_steps=2"]
    train(load_config(None, resume + ["training.stop_after_steps=2"]))
    stopped_ckpts = sorted(p.name for p in (out / "checkpoints").iterdir()) if env.is_main else []
    train(load_config(None, [o for o in resume if o != "checkpoint.resume=none"] + ["checkpoint.resume=auto"]))
    if env.is_main:
        recs = read_metrics(out)
        results["fsdp2_resume"] = {
            "losses": [r["loss"] for r in recs],
            "adapter": str(out / "adapter"),
            "checkpoints_after_stop": stopped_ckpts,
        }
    results["chunked_loss_fsdp2_tied"] = chunked_loss_check(env)
    results["magnitude"] = magnitude_check(env)
    results["magnitude_gpt2"] = magnitude_check(env, GPT2_ARCH, probe=None)
    for key in ("magnitude", "magnitude_gpt2"):
        results[key]["rowsq_max_err"] = env.all_reduce_max(results[key]["rowsq_max_err"])
    if env.is_main:
        Path(args.out).write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
