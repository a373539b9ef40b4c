"""The tensor-parallel plan and the checks on it: which linears split how (the model's `base_model_tp_plan`, else the
Llama family's layout), and why a job's parallel.tp cannot run (heads, KV heads, MLP width; 4-bit bases in whole
quantization blocks, ddp only). Pure: no process group, no torch.distributed; preflight and the planner read it
before any process exists, parallel/tp.py applies it.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from torch import nn

from dora_dist.errors import ConfigError

if TYPE_CHECKING:
    from dora_dist.config import Config

#: the Llama family's layout, module paths relative to the base model (transformers' base_model_tp_plan keys)
LLAMA_TP_PLAN: dict[str, str] = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
#: transformers' plan styles this module applies, and the split each one is
STYLE_KINDS: dict[str, str] = {
    "colwise": "colwise",
    "local_colwise": "colwise",
    "rowwise": "rowwise",
    "local_rowwise": "rowwise",
}
#: head-count attributes of (older) attention modules that hold per-rank values once q/k/v are split
HEAD_ATTRS = ("num_heads", "num_key_value_heads", "hidden_size")


# ------------------------------------------------------------------------------------------------------------
# the plan (pure: unit-tested without a process group)
# ------------------------------------------------------------------------------------------------------------
def resolve_tp_plan(names: list[str], plan: dict[str, str], prefix: str = "") -> dict[str, str]:
    """{module name: "colwise" | "rowwise"} for the `names` (model.named_modules() order) that a transformers-style
    `plan` ({pattern relative to the base model: style}) selects; `prefix` is the base model's path ("model.")."""
    out: dict[str, str] = {}
    for name in names:
        if not name.startswith(prefix):
            continue
        rel = name[len(prefix) :]
        for pattern, style in plan.items():
            if fnmatchcase(rel, pattern):
                if style not in STYLE_KINDS:
                    raise ConfigError(
                        f"the model's tensor-parallel plan splits {pattern} as {style!r}, which dora_dist does not "
                        f"apply (it applies {', '.join(STYLE_KINDS)}); use parallel.tp=1 for this model"
                    )
                out[name] = STYLE_KINDS[style]
    return out


def model_tp_plan(model: nn.Module) -> dict[str, str]:
    """The split of each of `model`'s linears: its config's base_model_tp_plan, else LLAMA_TP_PLAN."""
    plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None) or LLAMA_TP_PLAN
    base_name = getattr(model, "base_model_prefix", "") or ""
    prefix = f"{base_name}." if base_name and isinstance(getattr(model, base_name, None), nn.Module) else ""
    out = resolve_tp_plan([n for n, _ in model.named_modules()], plan, prefix)
    if not out:
        raise ConfigError(
            f"parallel.tp > 1 but no linear of {type(model).__name__} matches its tensor-parallel plan "
            f"({', '.join(plan)}); use parallel.tp=1 for this model"
        )
    return out


def head_problem(config: Any, tp: int) -> str | None:
    """Why `tp` cannot split a model with this transformers config (heads, KV heads, MLP width), or None."""
    sizes = {
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
        "intermediate_size": getattr(config, "intermediate_size", None),
    }
    for key, value in sizes.items():
        if isinstance(value, int) and value % tp:
            return f"parallel.tp={tp} does not divide the model's {key}={value}; use a divisor of {value}"
    return None


#: bitsandbytes' 4-bit block size (transformers' BitsAndBytesConfig does not change it)
BNB_4BIT_BLOCKSIZE = 64
#: the Llama family's linears as (out, in) in units of (hidden, q width = heads·head_dim, kv width, intermediate)
_LLAMA_SHAPES = {
    "q_proj": ("q", "hidden"),
    "k_proj": ("kv", "hidden"),
    "v_proj": ("kv", "hidden"),
    "o_proj": ("hidden", "q"),
    "gate_proj": ("inter", "hidden"),
    "up_proj": ("inter", "hidden"),
    "down_proj": ("hidden", "inter"),
}


def quantized_split_problem(config: Any, tp: int, blocksize: int = BNB_4BIT_BLOCKSIZE) -> str | None:
    """Why a 4-bit Llama-family model with this transformers config does not split `tp` ways in whole quantization
    blocks (quant/split4bit.py), or None (also when the config is not Llama-shaped: then checked at split time)."""
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    inter = getattr(config, "intermediate_size", None)
    if not (isinstance(hidden, int) and isinstance(heads, int) and isinstance(inter, int)):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    dims = {"hidden": hidden, "q": heads * head_dim, "kv": kv_heads * head_dim, "inter": inter}
    from dora_dist.quant.split4bit import split_width_problem

    for pattern, kind in LLAMA_TP_PLAN.items():
        out_dim, in_dim = _LLAMA_SHAPES[pattern.rpartition(".")[2]]
        problem = split_width_problem(pattern, kind, dims[out_dim], dims[in_dim], tp, blocksize)
        if problem:
            return problem
    return None


def quantized_tp_problem(cfg: Config) -> str | None:
    """Why parallel.tp > 1 cannot run over this job's quantized base whatever the model, or None."""
    tp, mode = cfg.parallel.tp, cfg.quantization.mode
    if mode == "int8":
        return (
            f"parallel.tp={tp} with quantization.mode=int8: tensor parallelism over 8-bit bases is not implemented; "
            "use quantization.mode=nf4 or fp4, or parallel.tp=1"
        )
    from dora_dist.parallel import resolve_engine

    engine = resolve_engine(cfg.parallel.engine, max(2, tp), mode)
    if engine != "ddp":
        return (
            f"parallel.tp={tp} with quantization.mode={mode} runs on parallel.engine=ddp only (each rank keeps its "
            f"part of the 4-bit base whole), not {engine}; use parallel.engine=ddp (or auto)"
        )
    return None


def tp_config_problem(cfg: Config, model_config: Any | None) -> str | None:
    """Why parallel.tp cannot run this job (checked before any process group exists), or None."""
    tp = cfg.parallel.tp
    if tp <= 1:
        return None
    if cfg.quantization.mode != "none":
        problem = quantized_tp_problem(cfg)
        if problem is None and model_config is not None:
            problem = quantized_split_problem(model_config, tp)
        if problem:
            return problem
    if cfg.training.compile:
        return (
            f"training.compile=true with parallel.tp={tp} is not supported (the tensor-parallel layers swap in their "
            "local shards on each call); use one or the other"
        )
    return head_problem(model_config, tp) if model_config is not None else None


#: parent modules (by their attribute name) whose input feeds only their projections (attention, MLP): the input's
#: gradient is summed over tp once there, not once per column-wise projection (as Megatron-LM and torchtitan do)
SHARED_INPUT_PARENTS = ("self_attn", "attn", "attention", "cross_attn", "mlp", "feed_forward")


def shared_input_parents(plan: dict[str, str]) -> dict[str, list[str]]:
    """{parent module: its column-wise children} for the parents in SHARED_INPUT_PARENTS with ≥ 2 column-wise
    children in `plan` (the same rule plan/comm_tp.py predicts with)."""
    out: dict[str, list[str]] = {}
    for name, kind in plan.items():
        parent = name.rpartition(".")[0]
        if kind == "colwise" and parent.rpartition(".")[2] in SHARED_INPUT_PARENTS:
            out.setdefault(parent, []).append(name)
    return {p: children for p, children in out.items() if len(children) >= 2}


__all__ = [
    "LLAMA_TP_PLAN",
    "STYLE_KINDS",
    "HEAD_ATTRS",
    "BNB_4BIT_BLOCKSIZE",
    "resolve_tp_plan",
    "model_tp_plan",
    "head_problem",
    "quantized_split_problem",
    "quantized_tp_problem",
    "tp_config_problem",
    "SHARED_INPUT_PARENTS",
    "shared_input_parents",
]
