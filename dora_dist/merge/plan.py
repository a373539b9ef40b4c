"""What a streaming merge will write, decided from headers alone before any weight is read: for every tensor of
the base checkpoint, whether it is merged with an adapter, dequantized (a 4-bit base's other linears), replaced
by a `modules_to_save` tensor, or copied; its output dtype and shard. Every check of the input (an adapter of
another base, wrong shapes, a missing shard) happens here, so bad input stops the command before it writes.

The model is instantiated on the meta device (no memory) only to learn module types (Conv1D stores W as
(in, out)), tied parameters, and which linears bitsandbytes quantizes (transformers' own rule).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dora_dist.adapters.config import DoRAConfig
from dora_dist.adapters.peft_format import PREFIX, SUFFIXES, _group_by_module, read_adapter, saved_adapter_dtype
from dora_dist.errors import AdapterError, ConfigError, ModelError
from dora_dist.merge.safetensors_io import Checkpoint, OutTensor
from dora_dist.models.prequantized import QUANT_STATE_SUFFIXES, CheckpointQuantization, checkpoint_quantization

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class Quant4bit:
    """How the 4-bit base the adapter was trained on was quantized (bitsandbytes Params4bit settings)."""

    quant_type: str
    double_quant: bool
    compute_dtype: torch.dtype
    quant_storage: torch.dtype
    load_dtype: torch.dtype  # dtype the dense tensor was cast to before quantizing (the training model's dtype)
    prequantized: bool


@dataclass
class Action:
    """How one output tensor is produced."""

    kind: str  # copy | merge | dequant | saved
    source: str  # checkpoint key (copy, merge, dequant) or adapter key (saved)
    module: str = ""  # module name (merge, dequant)
    conv1d: bool = False  # the stored weight is (in, out)
    quantized: bool = False  # a 4-bit weight in the base the adapter was trained on


@dataclass
class MergePlan:
    base_dir: Path
    checkpoint: Checkpoint
    adapter_cfg: DoRAConfig
    adapter_dtype: torch.dtype
    adapter: dict[str, dict[str, torch.Tensor]]  # module -> {lora_A, lora_B, magnitude}
    saved: dict[str, torch.Tensor]  # adapter key -> tensor (modules_to_save)
    quant: Quant4bit | None  # the 4-bit base merged against (None: dense)
    shards: dict[str, list[OutTensor]] = field(default_factory=dict)
    actions: dict[str, Action] = field(default_factory=dict)
    untie: bool = False
    architecture: str = ""
    adapter_dir: Path = Path()

    def largest_tensor_bytes(self) -> int:
        return max((e.nbytes for es in self.shards.values() for e in es), default=0)


def base_quantization(training: dict, found: CheckpointQuantization | None, onto: str) -> Quant4bit | None:
    """The 4-bit base to merge against: the pre-quantized checkpoint's, or the one training quantized on the fly
    (from the adapter's training config); None for a dense base or `--onto original`."""
    if found is not None:
        if found.mode == "int8":
            raise ModelError("--base is an 8-bit (LLM.int8) checkpoint; merging needs a dense or 4-bit base")
        if onto == "original":
            raise ConfigError(
                "--onto original: the base is a pre-quantized 4-bit checkpoint, which holds no original weights; "
                "give the dense base with --base, or merge onto the 4-bit weights (the default)"
            )
        return Quant4bit(
            found.mode,
            found.double_quant,
            DTYPES[found.compute_dtype],
            getattr(torch, found.quant_storage),
            torch.float32,
            True,
        )
    q = training.get("quantization") or {}
    if q.get("mode", "none") not in ("nf4", "fp4") or onto == "original":
        return None
    model, train = training.get("model") or {}, training.get("training") or {}
    dtype = model.get("dtype", "auto")
    load = DTYPES[dtype] if dtype in DTYPES else (torch.bfloat16 if train.get("precision") == "bf16" else torch.float32)
    return Quant4bit(
        q["mode"],
        bool(q.get("double_quant", True)),
        DTYPES[q.get("compute_dtype", "bfloat16")],
        getattr(torch, q.get("quant_storage", "uint8")),
        load,
        False,
    )


def meta_model(base_dir: Path, config: dict) -> nn.Module:
    """The base's architecture on the meta device (no memory), without its quantization_config."""
    from dora_dist.models import build_on_meta

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        return build_on_meta(config)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"--base: cannot build the architecture of {base_dir}/config.json ({exc})") from exc


def quantized_linears(model: nn.Module, quant: Quant4bit) -> set[str]:
    """Names of the modules transformers replaces by bitsandbytes Linear4bit when loading this model in 4 bits."""
    from transformers import BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=quant.compute_dtype,
        bnb_4bit_quant_storage=quant.quant_storage,
    )
    # `model` is a PreTrainedModel and its _keep_in_fp32_modules a list; their annotations say nn.Module / Tensor
    keep_fp32 = model._keep_in_fp32_modules
    skip = HfQuantizer.get_modules_to_not_convert(model, q.llm_int8_skip_modules, keep_fp32)  # type: ignore[arg-type]
    replaced = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=q)
    import bitsandbytes as bnb

    return {n for n, m in replaced.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def checkpoint_key(model: nn.Module, param: str, ckpt: Checkpoint) -> str | None:
    """The checkpoint key of a model parameter: the same name, or without/with the base model prefix (GPT-2
    checkpoints on the hub store 'h.0...' for 'transformer.h.0...')."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    for key in (param, param[len(prefix) :] if param.startswith(prefix) else None, prefix + param):
        if key and key in ckpt.tensors:
            return key
    return None


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def build_plan(base_dir: Path, adapter_dir: Path, training: dict, onto: str, dtype: str) -> MergePlan:
    ckpt = Checkpoint(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    found = checkpoint_quantization(config)
    quant = base_quantization(training, found, onto)
    model = meta_model(base_dir, config)
    arch = type(model).__name__
    cfg, tensors = read_adapter(adapter_dir, allow_lora=True)
    source = str(adapter_dir / "adapter_model.safetensors")
    from dora_dist.adapters.inject import find_modules_to_save

    saved_modules = find_modules_to_save(model, cfg.modules_to_save, strict=False)
    by_module = _group_by_module(tensors, source, {n: model.get_submodule(n) for n in saved_modules})
    if not by_module:
        raise AdapterError(f"{source} holds no adapter tensors")
    modules = dict(model.named_modules())
    lacking = sorted(n for n in by_module if n not in modules)
    if lacking:
        raise AdapterError(
            f"{source} has adapters for modules this model ({arch}) lacks: {lacking[:5]}; is it an adapter of "
            "another base model?"
        )
    adapter_dtype = DTYPES.get(saved_adapter_dtype(by_module, cfg.adapter_dtype), torch.float32)
    plan = MergePlan(
        base_dir, ckpt, cfg, adapter_dtype, by_module, {}, quant, architecture=arch, adapter_dir=adapter_dir
    )
    shapes = _check_adapter_shapes(plan, model, source)
    prequant_aux = {k for k in ckpt.tensors if any(k.endswith("." + s) for s in QUANT_STATE_SUFFIXES)}
    if quant is None:
        quantized: set[str] = set()
    elif quant.prequantized:  # the checkpoint says which weights it stores in 4 bits
        stored = {k.rsplit(".weight.", 1)[0] + ".weight" for k in prequant_aux}
        quantized = {n for n in modules if checkpoint_key(model, n + ".weight", ckpt) in stored}
    else:
        quantized = quantized_linears(model, quant)
    weight_keys = {}
    for name in set(by_module) | quantized:
        key = checkpoint_key(model, name + ".weight", ckpt)
        if key is None:
            raise ModelError(f"--base: {base_dir} has no tensor for {name}.weight (a shard left out?)")
        weight_keys[key] = name
    explicit = DTYPES.get(dtype)

    def out_dtype(stored: torch.dtype, planned: torch.dtype | None = None) -> torch.dtype:
        if not stored.is_floating_point and planned is None:
            return stored
        return explicit or planned or stored

    for key, info in ckpt.tensors.items():
        if key in prequant_aux:
            continue
        shard = plan.shards.setdefault(info.file, [])
        module_name = weight_keys.get(key)
        if module_name is not None:
            name = module_name
            conv = _is_conv1d(modules[name])
            out, inp = shapes.get(name) or linear_shape(modules[name], name, source)
            stored_dtype = _dense_dtype(plan, info.dtype, key, name in quantized)
            kind = "merge" if name in by_module else "dequant"
            plan.actions[key] = Action(kind, key, name, conv, quantized=name in quantized)
            shard.append(OutTensor(key, out_dtype(stored_dtype, stored_dtype), (inp, out) if conv else (out, inp)))
        else:
            plan.actions[key] = Action("copy", key)
            shard.append(OutTensor(key, out_dtype(info.dtype), info.shape))
    _plan_saved(plan, model, saved_modules, tensors, source, out_dtype)
    return plan


def _dense_dtype(plan: MergePlan, stored: torch.dtype, key: str, quantized: bool) -> torch.dtype:
    """The dtype a merged/dequantized weight is written in by default: the stored dtype, or for a pre-quantized
    weight the dtype it was quantized from."""
    if plan.quant is None or not plan.quant.prequantized or not quantized:
        return stored
    from dora_dist.merge.tensors import prequantized_state

    return prequantized_state(plan.checkpoint, key).dtype


def linear_shape(module: nn.Module, name: str, source: str) -> tuple[int, int]:
    """(out, in) of a linear layer (nn.Linear, or Conv1D whose weight is (in, out))."""
    if _is_conv1d(module):
        inp, out = module.weight.shape  # type: ignore[misc]  # a Parameter, typed Tensor | Module
    elif isinstance(module, nn.Linear):
        out, inp = module.out_features, module.in_features
    else:
        raise AdapterError(f"{source}: {name} is a {type(module).__name__}, not a linear layer DoRA adapts")
    return int(out), int(inp)


def _check_adapter_shapes(plan: MergePlan, model: nn.Module, source: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each adapted module, checked against the adapter's A (r, in), B (out, r) and m (out,)."""
    shapes = {}
    r = plan.adapter_cfg.r
    for name, parts in plan.adapter.items():
        shapes[name] = out, inp = linear_shape(model.get_submodule(name), name, source)
        want = {"lora_A": (r, inp), "lora_B": (out, r), "magnitude": (out,)}
        need = ["lora_A", "lora_B"] + (["magnitude"] if plan.adapter_cfg.use_dora else [])
        for attr in need:
            if attr not in parts:
                key = next(k for k, a in SUFFIXES.items() if a == attr)
                raise AdapterError(f"{source} is missing ['{PREFIX}{name}.{key}']")
            if tuple(parts[attr].shape) != tuple(want[attr]):
                key = next(k for k, a in SUFFIXES.items() if a == attr)
                raise AdapterError(
                    f"{source}: tensor '{PREFIX}{name}.{key}' has shape {tuple(parts[attr].shape)} but the "
                    f"model expects {tuple(want[attr])} (another base model, or another dora.r?)"
                )
    return shapes


def _plan_saved(plan: MergePlan, model: nn.Module, saved_modules, tensors, source: str, out_dtype) -> None:
    """modules_to_save tensors replace the base's; a tied parameter gets its own tensor (the trainer's rule,
    adapters/inject.untie_modules_to_save): the saved module's from the adapter, its partner the base's."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in saved_modules:
        for sub, _ in model.get_submodule(name).named_parameters(remove_duplicate=False):
            pname = f"{name}.{sub}"
            akey = PREFIX + pname
            if akey not in tensors:
                raise AdapterError(f"{source} is missing ['{akey}'] (modules_to_save {name!r})")
            tied = [o for o in owners[id(params[pname])] if o != pname]
            key = checkpoint_key(model, pname, plan.checkpoint)
            shared = key or next(filter(None, (checkpoint_key(model, o, plan.checkpoint) for o in tied)), None)
            if shared is None:
                raise ModelError(f"--base: {plan.base_dir} has no tensor for {pname}")
            info = plan.checkpoint.tensors[shared]
            if tuple(tensors[akey].shape) != info.shape:
                raise AdapterError(
                    f"{source}: tensor '{akey}' has shape {tuple(tensors[akey].shape)} but the model expects "
                    f"{info.shape}"
                )
            if key is None:  # tied and not stored: add it next to its partner
                key = pname
                plan.shards[info.file].append(OutTensor(key, out_dtype(info.dtype), info.shape))
            else:
                entry = next(e for e in plan.shards[info.file] if e.key == key)
                assert entry.shape == info.shape
            plan.actions[key] = Action("saved", akey)
            plan.saved[akey] = tensors[akey]
            for other in tied:
                plan.untie = True
                if checkpoint_key(model, other, plan.checkpoint) is None:  # the partner keeps the base weights
                    plan.shards[info.file].append(OutTensor(other, out_dtype(info.dtype), info.shape))
                    plan.actions[other] = Action("copy", shared)
