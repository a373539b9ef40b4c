"""One output tensor at a time: the base weight read from its shard, wrapped in the same DoRALinear (over the same
weight source: dense, Conv1D or bitsandbytes 4-bit) that `merge_and_unload` uses, and merged by it in fp32 row
chunks with one rounding to the output dtype. Reusing the layer is what makes the streamed result equal the
in-memory merge bit for bit.

A 4-bit base is rebuilt tensor by tensor as training built it: the dense tensor cast to the training model's
dtype and quantized by bitsandbytes' Params4bit (transformers' loader does exactly that), or the stored packed
bytes and quantization state of a pre-quantized checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from dora_dist.merge.plan import Action, MergePlan
from dora_dist.merge.safetensors_io import Checkpoint
from dora_dist.models.prequantized import QUANT_STATE_SUFFIXES, load_quant_state
from dora_dist.nn.dora_linear import DoRALinear


def prequantized_state(ckpt: Checkpoint, key: str):
    """bitsandbytes' QuantState of a stored packed 4-bit weight (small tensors only)."""
    aux = [f"{key}.{s}" for s in QUANT_STATE_SUFFIXES if f"{key}.{s}" in ckpt.tensors]
    return load_quant_state(key, ckpt.read_many(aux))


def _dense_module(weight: torch.Tensor, conv1d: bool) -> nn.Module:
    """A bias-free nn.Linear / Conv1D holding `weight` as stored (no copy)."""
    module: nn.Module
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            module = Conv1D(weight.shape[1], weight.shape[0])
        module.bias = None
    else:
        with torch.device("meta"):
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    module.weight = nn.Parameter(weight, requires_grad=False)
    return module


def _linear4bit(plan: MergePlan, key: str, weight: torch.Tensor, conv1d: bool) -> nn.Module:
    """The bitsandbytes Linear4bit training used for this weight."""
    import bitsandbytes as bnb

    q = plan.quant
    assert q is not None
    if q.prequantized:
        qs = prequantized_state(plan.checkpoint, key)
        out_f, in_f = (int(s) for s in qs.shape)
    else:
        weight = weight.to(q.load_dtype)
        if conv1d:  # transformers transposes a Conv1D weight before quantizing it
            weight = weight.T
        out_f, in_f = weight.shape
    module = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=False,
        compute_dtype=q.compute_dtype,
        compress_statistics=q.double_quant,
        quant_type=q.quant_type,
        quant_storage=q.quant_storage,
        device="meta",
    )
    if q.prequantized:
        aux = [f"{key}.{s}" for s in QUANT_STATE_SUFFIXES if f"{key}.{s}" in plan.checkpoint.tensors]
        stats = {k[len(key) + 1 :]: v for k, v in plan.checkpoint.read_many(aux).items()}
        param = bnb.nn.Params4bit.from_prequantized(
            data=weight, quantized_stats=stats, requires_grad=False, device=torch.device("cpu"), module=module
        )
    else:
        old = module.weight
        settings = {k: v for k, v in old.__dict__.items() if k != "module"}
        param = bnb.nn.Params4bit(weight, requires_grad=False, **settings, module=module).to("cpu")  # type: ignore[misc]
    module.weight = param
    return module


def base_module(plan: MergePlan, action: Action, weight: torch.Tensor) -> nn.Module:
    """The base layer as training saw it: 4-bit when the plan merges against a 4-bit base, else dense."""
    if action.quantized:
        return _linear4bit(plan, action.source, weight, action.conv1d)
    return _dense_module(weight, action.conv1d)


def dora_layer(plan: MergePlan, module_name: str, base: nn.Module) -> DoRALinear:
    """A DoRALinear over `base` with the adapter's A, B and m, in the dtype `load_adapter` would give them."""
    cfg = plan.adapter_cfg
    layer = DoRALinear(
        base,
        r=cfg.r,
        alpha=cfg.alpha,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        adapter_dtype=plan.adapter_dtype,
        init_magnitude=False,
    )
    with torch.no_grad():
        for attr, tensor in plan.adapter[module_name].items():
            param = getattr(layer, attr)
            if param is not None:
                param.copy_(tensor.to(param.dtype))
    return layer.eval()


def to_stored_layout(weight: torch.Tensor, action: Action) -> torch.Tensor:
    """(out, in) -> the checkpoint's layout ((in, out) for Conv1D)."""
    return weight.t().contiguous() if action.conv1d else weight


@torch.no_grad()
def produce(plan: MergePlan, key: str, dtype: torch.dtype) -> torch.Tensor:
    """The output tensor `key` in `dtype`."""
    action = plan.actions[key]
    if action.kind == "saved":
        return plan.saved[action.source].to(dtype)
    stored = plan.checkpoint.read(action.source)
    if action.kind == "copy":
        return stored.to(dtype)
    base = base_module(plan, action, stored)
    del stored
    if action.kind == "dequant":
        from dora_dist.nn.weight_source import weight_source_for

        return to_stored_layout(weight_source_for(base).dense(dtype), action)
    layer = dora_layer(plan, action.module, base)
    return to_stored_layout(layer.merged_weight(dtype), action)


@torch.no_grad()
def merged_onto_original(plan: MergePlan, key: str) -> torch.Tensor:
    """W' of `key` merged into the original dense weight (fp32, (out, in)): what `--onto original` writes."""
    action = plan.actions[key]
    stored = plan.checkpoint.read(action.source)
    layer = dora_layer(plan, action.module, _dense_module(stored, action.conv1d))
    return layer.merged_weight(torch.float32)
