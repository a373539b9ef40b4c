"""The collectives of a tensor-parallel job (parallel.tp > 1), per optimizer step on one rank, with exact sizes.

Sizes as in plan/comm.py (whole logical buffers on one rank). Notation: N = micro_batch_size · seq_len tokens per
micro-step (packing fills the blocks; a micro-batch of shorter rows moves fewer bytes), gas = micro-steps per step,
e = activation bytes (2 under bf16, else the model dtype's), a = adapter bytes, g = max(a, 4) (DoRA's norm terms are
≥ fp32), r = dora.r. Per DoRA layer and micro-step, over the tp group (parallel/tp.py):

    column-wise (in → out/tp):   backward  N·in·e (input gradient: once per attention / MLP input, which its
                                           projections share; none where the input needs no gradient: the first
                                           block's attention reads the frozen embeddings) + r·in·a (lora_A)
    row-wise (in/tp → out):      forward   N·out·e (the output) + (out·r + r²)·g (W·Aᵀ and A·Aᵀ partials)
                                 backward  out·r·a (lora_B) + out·a (magnitude)

Forward terms count twice under training.gradient_checkpointing (recomputed). Per step: the gradient norm, one
value of a bytes per trainable tensor (DTensor norms, stacked) on tp — and on dp too under fsdp2, whose gradients
are dp × tp DTensors; the step loss (8 bytes) runs on the world group, which is the tp group when dp = 1.

The data-parallel part is the engine's own on the tp-local shapes (column-wise: dim 0 / tp; row-wise base weight and
lora_A: dim 1 / tp) over dp ranks: fsdp2 gathers and reduce-scatters those shards (under HSDP inside each shard
group, with the shards all-reduced across groups: plan/comm.py fsdp2_collectives); ddp all-reduces the tp-split
adapter gradients in one buffer (a · their local elements) on the last micro-step.
"""

from __future__ import annotations

from dataclasses import replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from dora_dist.parallel.tp_plan import shared_input_parents
from dora_dist.plan.model_spec import ModelSpec, ParamSpec, base_dtype_bytes, dtype_bytes

if TYPE_CHECKING:
    from dora_dist.config import Config
    from dora_dist.parallel.mesh import MeshDims
    from dora_dist.plan.comm import Collective

LEAVES = {"linear": ".base_layer.weight", "lora_A": ".lora_A", "lora_B": ".lora_B", "magnitude": ".magnitude"}


def tp_plan_for(cfg: Config) -> dict[str, str]:
    """{pattern: "colwise" | "rowwise"}: the model's base_model_tp_plan (transformers), else the Llama layout."""
    from dora_dist.parallel.tp_plan import LLAMA_TP_PLAN, STYLE_KINDS

    plan = None
    try:
        from dora_dist import models

        plan = getattr(models.model_config(cfg), "base_model_tp_plan", None)
    except Exception:  # noqa: BLE001 - the planner falls back to the Llama layout when the config cannot be read
        plan = None
    return {k: STYLE_KINDS.get(v, v) for k, v in (plan or LLAMA_TP_PLAN).items()}


def layer_kind(module: str, plan: dict[str, str]) -> str | None:
    """The split of the linear at `module` (its path in the model), or None."""
    for pattern, kind in plan.items():
        if fnmatchcase(module, pattern) or fnmatchcase(module, "*." + pattern):
            return kind
    return None


def _module_of(p: ParamSpec) -> str | None:
    leaf = LEAVES.get(p.role)
    return p.name[: -len(leaf)] if leaf and p.name.endswith(leaf) else None


def tp_local_spec(spec: ModelSpec, plan: dict[str, str], tp: int) -> tuple[ModelSpec, dict[str, str]]:
    """The parameter table one tp rank holds (split dims divided by tp) and {module: kind} of the split layers."""
    kinds: dict[str, str] = {}
    params = []
    for p in spec.params:
        module = _module_of(p)
        kind = layer_kind(module, plan) if module else None
        shape = p.shape
        if kind == "colwise" and p.role in ("linear", "lora_B", "magnitude"):
            shape = (shape[0] // tp, *shape[1:])
        elif kind == "rowwise" and p.role in ("linear", "lora_A"):
            shape = (shape[0], shape[1] // tp)
        if kind and module:
            kinds[module] = kind
        params.append(replace(p, shape=shape))
    return replace(spec, params=params), kinds


def tp_layer_bytes(cfg: Config, spec: ModelSpec, kinds: dict[str, str], tokens: int) -> tuple[int, int, int, int]:
    """(forward bytes, forward calls, backward bytes, backward calls) of one micro-step over tp (module docstring)."""
    e = 2 if cfg.training.precision == "bf16" else base_dtype_bytes(cfg)
    a = dtype_bytes(cfg.dora.adapter_dtype)
    g = max(a, 4)
    r = cfg.dora.r
    shapes = {p.name: p.shape for p in spec.params}
    blocks = {p.name: p.block for p in spec.params}
    fwd = fwd_calls = bwd = bwd_calls = 0
    first = min((p.block for p in spec.params if p.block >= 0), default=0)
    shared = shared_input_parents(kinds)
    counted: set[str] = set()
    for module, kind in kinds.items():
        out_f, in_f = shapes[module + LEAVES["linear"]]
        has_dora = module + LEAVES["magnitude"] in shapes
        if kind == "colwise":
            parent = module.rpartition(".")[0]
            # the first block's attention reads the embeddings, whose gradient nothing needs
            needs_grad = not (blocks[module + LEAVES["linear"]] == first and ".self_attn." in module)
            if needs_grad and (parent not in shared or parent not in counted):  # once per shared input
                bwd, bwd_calls = bwd + tokens * in_f * e, bwd_calls + 1
                counted.add(parent)
            bwd, bwd_calls = bwd + r * in_f * a, bwd_calls + 1
        else:
            fwd, fwd_calls = fwd + tokens * out_f * e, fwd_calls + 1
            if has_dora:
                fwd, fwd_calls = fwd + (out_f * r + r * r) * g, fwd_calls + 1
                bwd, bwd_calls = bwd + out_f * a, bwd_calls + 1
            bwd, bwd_calls = bwd + out_f * r * a, bwd_calls + 1
    return fwd, fwd_calls, bwd, bwd_calls


def predict_tp_collectives(
    cfg: Config, spec: ModelSpec, engine: str, dims: MeshDims, padded_tokens: int | None = None
) -> list[Collective]:
    """Every collective of one steady-state optimizer step of a dp × tp job on one rank (see the docstring).
    `padded_tokens`: the step's micro-batches as computed on this rank (batch × padded length, summed; the step
    probe's `padded_tokens`), for a step whose blocks are not all full; default gas · micro_batch · seq_len."""
    from dora_dist.parallel import capabilities
    from dora_dist.parallel.mesh import MeshDims
    from dora_dist.plan.comm import Collective, grad_accum, predict_collectives

    tp, dp = dims.tp, dims.dp
    gas = grad_accum(cfg, dp)
    local, kinds = tp_local_spec(spec, tp_plan_for(cfg), tp)
    tokens = cfg.training.micro_batch_size * cfg.data.seq_len
    # bytes are affine in the tokens: a per-micro-step part (DoRA's norm partials, adapter gradients) + per token
    fwd0, fwd_calls, bwd0, bwd_calls = tp_layer_bytes(cfg, local, kinds, 0)
    fwd1, _, bwd1, _ = tp_layer_bytes(cfg, local, kinds, 1)
    total_tokens = gas * tokens if padded_tokens is None else padded_tokens
    recompute = 2 if cfg.training.gradient_checkpointing else 1
    a = dtype_bytes(cfg.dora.adapter_dtype)
    trainable = spec.select(trainable=True)
    out = [
        Collective(
            "all_reduce",
            recompute * (gas * fwd0 + (fwd1 - fwd0) * total_tokens),
            gas * recompute * fwd_calls,
            False,
            "row-wise outputs and DoRA norm partials",
            "tp",
        ),
        Collective(
            "all_reduce",
            gas * bwd0 + (bwd1 - bwd0) * total_tokens,
            gas * bwd_calls,
            False,
            "input and replicated-adapter gradients",
            "tp",
        ),
        Collective("all_reduce", a * len(trainable), 1, False, "gradient norm (one value per tensor)", "tp"),
    ]
    if dp == 1:
        return [*out, Collective("all_reduce", 8, 1, False, "step loss (float64)", "tp")]
    caps = capabilities(engine)
    # the data-parallel part: the engine's own model on the tp-local shapes (flat, or HSDP's two dimensions)
    dp_part = predict_collectives(
        cfg, local, engine, dp, MeshDims(dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard)
    )
    if not caps.shards_params:  # ddp: the tp-split adapter gradients in one buffer (tp.py average_dp_gradients)
        split = local.select(trainable=True)  # all tensor-parallel (parallel/tp.py refuses any other adapter)
        dp_part = [c for c in dp_part if not c.what.startswith("adapter gradients")]
        dp_part.append(Collective("all_reduce", a * sum(p.numel for p in split), 1, True, "tp-split adapter gradients"))
    return out + dp_part
