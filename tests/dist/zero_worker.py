"""One rank of the ZeRO engine checks (launched by tests/dist/test_zero.py; not a test module itself).

One launch checks several things, because a DeepSpeed start on the CPU is slow:
  1. magnitude init under the engine (ZeRO-3: from the local partitions, and the per-layer gather path) equals the
     single-process init;
  2. 4 optimizer steps (micro-batch 1 x accumulation 2 x 2 ranks = the same global batch of 4 sequences) give the
     same losses and gradient norms as one process, and the saved adapter (PEFT state dict on rank 0) matches;
  3. a checkpoint after step 2 loaded into a fresh model + engine continues with the same losses and adapter as
     the uninterrupted run;
  4. (zero2) a 4-bit QDoRA model trains; (zero3) a 4-bit model is refused with a clear message.
Rank 0 writes the figures to --out as JSON; the test asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

from dora_dist.adapters import DoRAConfig, adapter_state_dict, apply_dora
from dora_dist.config import config_from_dict
from dora_dist.parallel.base import dora_layers
from dora_dist.parallel.dist_env import DistEnv
from dora_dist.parallel.none import SingleProcessEngine
from dora_dist.parallel.zero import Zero2Engine, Zero3Engine

GLOBAL_BATCH, SEQ, VOCAB, STEPS, SAVE_AT = 4, 12, 64, 4, 2


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # head_dim 10, one KV head: k/v_proj are (10, 30); MLP 75 wide: gate/up (75, 30) are split mid-row over 2 ranks
    cfg = LlamaConfig(
        hidden_size=30,
        intermediate_size=75,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).float()
    model.config.use_cache = False
    return model


def with_dora(model, init_magnitude: bool):
    apply_dora(model, DoRAConfig(r=4, alpha=8.0, target_modules="all-linear"), init_magnitude=init_magnitude)
    return model


def job_config(deepspeed_json: str | None):
    return config_from_dict(
        {
            "training": {
                "micro_batch_size": 1,
                "grad_accum": 2,
                "lr": 2e-2,
                "warmup_steps": 1,
                "max_steps": STEPS,
                "weight_decay": 0.01,
                "max_grad_norm": 0.5,
                "device": "cpu",
            },
            "parallel": {"deepspeed_config": deepspeed_json},
        }
    )


def batches():
    """STEPS global batches of GLOBAL_BATCH sequences; labels partly masked so token counts differ."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
        labels = ids.clone()
        for i in range(GLOBAL_BATCH):
            labels[i, : int(torch.randint(1, SEQ // 2, (1,), generator=g))] = -100
        out.append((ids, labels))
    return out


def n_targets(labels):
    return int((labels[:, 1:] != -100).sum())


def loss_sum(model, ids, labels):
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def run_reference(cfg, data):
    """One process, whole global batch per micro-step."""
    model = with_dora(tiny_model(), init_magnitude=False)
    engine = SingleProcessEngine(cfg, DistEnv())
    model = engine.prepare(model)
    init = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    losses, norms = [], []
    for ids, labels in data:
        total = n_targets(labels)
        loss = loss_sum(model, ids, labels) / total
        engine.backward(loss)
        norms.append(engine.guarded_step().grad_norm)
        losses.append(loss.item())
    final = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    return init, losses, norms, final


def rank_micro_batches(env, ids, labels, accum):
    """Rank r, micro-step i gets sample i*world + r (the union over ranks and micro-steps is the global batch)."""
    return [
        (
            ids[i * env.world_size + env.rank : i * env.world_size + env.rank + 1],
            labels[i * env.world_size + env.rank : i * env.world_size + env.rank + 1],
        )
        for i in range(accum)
    ]


def train_steps(engine, model, env, data, steps):
    losses, norms = [], []
    accum = 2
    for s in steps:
        ids, labels = data[s]
        total = n_targets(labels)
        local = 0.0
        micro = rank_micro_batches(env, ids, labels, accum)
        for i, (mi, ml) in enumerate(micro):
            with engine.accumulate(last=(i == accum - 1)):
                loss = loss_sum(model, mi, ml) / total
                engine.backward(loss)
                local += loss.item()
        norms.append(engine.guarded_step().grad_norm)
        losses.append(env.all_reduce_sum(local))
    return losses, norms


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a)[:4], sorted(b)[:4])
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def make_engine(stage, cfg, env):
    return (Zero2Engine if stage == 2 else Zero3Engine)(cfg, env)


def quantized_tiny_model():
    """tiny_model with every decoder linear replaced by a bitsandbytes NF4 Linear4bit (quantized on the CPU)."""
    import bitsandbytes as bnb
    from torch import nn

    model = tiny_model(seed=1)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and "layers." in name:
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
            )
            q.load_state_dict(module.state_dict())
            q = q.to("cpu")
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, q)
    return model


def check_zero_init_loading(cfg, env, data, workdir):
    """Load a saved model inside Zero3Engine.model_init_context() and train 2 steps vs one process."""
    from transformers import AutoModelForCausalLM

    path = os.path.join(workdir, "tiny_saved")
    if env.is_main:
        tiny_model().save_pretrained(path)
    env.barrier()
    engine = Zero3Engine(cfg, env)
    with engine.model_init_context():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = {"partitioned_at_load": tuple(model.model.layers[0].mlp.gate_proj.weight.shape) == (0,)}
    torch.manual_seed(5)
    model = engine.prepare(with_dora(model, init_magnitude=False))
    out["losses"], _ = train_steps(engine, model, env, data, range(2))
    state = engine.adapter_state_dict()
    engine.close()
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # outside zero.Init again
    torch.manual_seed(5)
    ref_engine = SingleProcessEngine(cfg, DistEnv())
    ref_model = ref_engine.prepare(with_dora(ref_model, init_magnitude=False))
    out["ref_losses"] = []
    for ids, labels in data[:2]:
        loss = loss_sum(ref_model, ids, labels) / n_targets(labels)
        ref_engine.backward(loss)
        ref_engine.guarded_step()
        out["ref_losses"].append(loss.item())
    if env.is_main:
        out["adapter_vs_ref"] = max_diff(state, adapter_state_dict(ref_model))
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = p.parse_args()
    torch.set_num_threads(1)
    env = DistEnv.from_environ(device="cpu")
    ds_json = os.path.join(args.workdir, "ds_user.json")
    if env.is_main:
        # the user JSON: keep even tiny parameters partitioned (ZeRO-3), and a harmless extra key
        with open(ds_json, "w") as f:
            json.dump(
                {
                    "zero_optimization": {"stage3_param_persistence_threshold": 0, "overlap_comm": False},
                    "train_micro_batch_size_per_gpu": "auto",
                },
                f,
            )
    env.barrier()
    cfg = job_config(ds_json)
    data = batches()
    res: dict = {"stage": args.stage, "world_size": env.world_size}

    ref_init, ref_losses, ref_norms, ref_final = run_reference(cfg, data)
    res.update(ref_losses=ref_losses, ref_norms=ref_norms)

    # --- 1. magnitude init ------------------------------------------------------------------------------
    engine = make_engine(args.stage, cfg, env)
    model = engine.prepare(with_dora(tiny_model(), init_magnitude=False))
    res["partitioned"] = bool(
        getattr(engine.unwrap().model.layers[0].mlp.gate_proj.base_layer.weight, "ds_tensor", None) is not None
    )
    init_state = engine.adapter_state_dict()
    res["norm_init_stats"] = dict(engine.norm_init_stats)
    if args.stage == 3:
        row_sq_partition = [lyr.base_row_sq.clone() for _, lyr in dora_layers(engine.unwrap())]
        engine.init_magnitudes(model, method="gather")
        res["gather_stats"] = dict(engine.norm_init_stats)
        gathered_state = engine.adapter_state_dict()
        row_sq_gather = [lyr.base_row_sq.clone() for _, lyr in dora_layers(engine.unwrap())]
        res["row_sq_paths_diff"] = max(
            float((a - b).abs().max()) for a, b in zip(row_sq_partition, row_sq_gather, strict=True)
        )
        engine.init_magnitudes(model)  # back to the default path
        engine.optimizer.refresh_fp32_params()
        res["no_gathered_left"] = all(
            p.ds_status.name == "NOT_AVAILABLE" for p in engine.unwrap().parameters() if hasattr(p, "ds_status")
        )
        if env.is_main:
            res["magnitude_gather_vs_ref"] = max_diff(
                {k: v for k, v in gathered_state.items() if "magnitude" in k},
                {k: v for k, v in ref_init.items() if "magnitude" in k},
            )
    if env.is_main:
        res["magnitude_init_vs_ref"] = max_diff(
            {k: v for k, v in init_state.items() if "magnitude" in k},
            {k: v for k, v in ref_init.items() if "magnitude" in k},
        )
        res["init_adapter_vs_ref"] = max_diff(init_state, ref_init)

    # --- 2. training parity + 3. checkpoint ----------------------------------------------------------------
    losses, norms = train_steps(engine, model, env, data, range(SAVE_AT))
    ckpt = os.path.join(args.workdir, "ckpt")
    engine.save_checkpoint(ckpt, {"step": SAVE_AT, "rng": torch.get_rng_state(), "sampler": {"pos": 8}})
    env.barrier()
    more, more_norms = train_steps(engine, model, env, data, range(SAVE_AT, STEPS))
    losses += more
    norms += more_norms
    final = engine.adapter_state_dict()
    res.update(losses=losses, norms=norms, lr=engine.current_lr())
    if env.is_main:
        res["final_adapter_vs_ref"] = max_diff(final, ref_final)
        res["final_adapter_moved"] = max_diff(final, ref_init)
        torch.save(final, os.path.join(args.workdir, "final_adapter.pt"))
        from dora_dist.adapters import save_adapter

        save_adapter(engine.unwrap(), os.path.join(args.workdir, "adapter"), state_dict=final)
    engine.close()

    engine2 = make_engine(args.stage, cfg, env)
    model2 = engine2.prepare(with_dora(tiny_model(), init_magnitude=False))
    extra = engine2.load_checkpoint(ckpt)
    res["extra_state_ok"] = bool(
        extra.get("step") == SAVE_AT
        and extra.get("sampler") == {"pos": 8}
        and isinstance(extra.get("rng"), torch.Tensor)
        and extra["rng"].dtype == torch.uint8
    )
    resumed, resumed_norms = train_steps(engine2, model2, env, data, range(SAVE_AT, STEPS))
    res.update(resumed_losses=resumed, resumed_norms=resumed_norms)
    final2 = engine2.adapter_state_dict()
    if env.is_main:
        res["resumed_adapter_vs_uninterrupted"] = max_diff(final2, final)
    engine2.close()

    # --- 5. (zero3) loading straight into the partitions: zero.Init through engine.model_init_context() ----------
    if args.stage == 3:
        res["zero_init"] = check_zero_init_loading(cfg, env, data, args.workdir)

    # --- 4. quantized bases --------------------------------------------------------------------------------
    try:
        qengine = make_engine(args.stage, cfg, env)
        qmodel = qengine.prepare(with_dora(quantized_tiny_model(), init_magnitude=False))
    except ValueError as exc:
        res["qdora_error"] = str(exc)
    else:
        qlosses, _ = train_steps(qengine, qmodel, env, data, range(STEPS))
        qfinal = qengine.adapter_state_dict()
        qengine.close()
        ref_engine = SingleProcessEngine(cfg, DistEnv())
        ref_model = ref_engine.prepare(with_dora(quantized_tiny_model(), init_magnitude=False))
        qref = []
        for ids, labels in data:
            loss = loss_sum(ref_model, ids, labels) / n_targets(labels)
            ref_engine.backward(loss)
            ref_engine.guarded_step()
            qref.append(loss.item())
        res.update(qdora_losses=qlosses, qdora_ref_losses=qref)
        if env.is_main:
            res["qdora_adapter_vs_ref"] = max_diff(qfinal, adapter_state_dict(ref_model))

    if env.is_main:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    env.barrier()
    env.destroy()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
