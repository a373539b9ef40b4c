"""Adapters on disk in PEFT's format, so peft, vLLM and TGI read ours and we read theirs.

    adapter_config.json        LoraConfig fields (peft_type LORA, use_dora, r, lora_alpha, target_modules, ...)
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight     (r, in)
                               base_model.model.<module>.lora_B.weight     (out, r)
                               base_model.model.<module>.lora_magnitude_vector   (out,)   DoRA only
                               base_model.model.<module>.<param>   each tensor of a modules_to_save module
                               (peft's key, without its `modules_to_save.default.` infix)

Only safetensors is read or written: a pickled adapter_model.bin can run code when loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dora_dist.adapters.config import ADAPTER_DTYPES, DoRAConfig
from dora_dist.adapters.inject import candidate_modules, dora_layers, find_modules_to_save, inject_dora, modules_to_save
from dora_dist.errors import AdapterError, InputNotFoundError

#: written into the safetensors header (peft reads only "format"); the adapter_config.json stays peft's own keys
SAFETENSORS_METADATA = {"format": "pt", "producer": "dora_dist"}

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUFFIXES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude"}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of an unsharded model under PEFT's key names."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in dora_layers(model):
        for suffix, attr in SUFFIXES.items():
            tensor = getattr(layer, attr)
            if tensor is not None:
                state[f"{PREFIX}{name}.{suffix}"] = tensor.detach()
    for name, module in modules_to_save(model).items():
        for key, tensor in module.state_dict().items():
            state[f"{PREFIX}{name}.{key}"] = tensor.detach()
    return state


def saved_target_modules(model: nn.Module) -> list[str]:
    """The shortest target list peft will resolve to exactly our adapted modules.

    Leaf names ("q_proj") when they select the same set in this model, else full module names.
    """
    names = {name for name, _ in dora_layers(model)}
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    selected = {name for name, _ in candidate_modules(model) if name.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if selected == names else sorted(names)


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over the target."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    base_model_name_or_path: str | None = None,
    config: DoRAConfig | None = None,
) -> Path:
    """Write the adapter of a DoRA model in PEFT format.

    state_dict: full adapter tensors gathered by a parallel engine (defaults to the model's own tensors).
    """
    cfg = config or getattr(model, "dora_config", None)
    if cfg is None:
        raise ValueError("model has no dora_config: call apply_dora() (or pass config=) before save_adapter()")
    if not any(True for _ in dora_layers(model)):
        raise ValueError("model has no DoRA layers to save")
    if state_dict is None:
        state_dict = adapter_state_dict(model)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in dora_layers(model))
    # peft wraps CAUSAL_LM adapters in PeftModelForCausalLM, which needs a transformers model with generate().
    task_type = "CAUSAL_LM" if callable(getattr(model, "generate", None)) else None
    if type(model).__name__.endswith("ForSequenceClassification"):
        task_type = "SEQ_CLS"  # peft then trains/loads the classifier head as a modules_to_save module
    peft_cfg = cfg.to_peft_dict(saved_target_modules(model), fan_in_fan_out, base_model_name_or_path, task_type)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=SAFETENSORS_METADATA))
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(peft_cfg, indent=2) + "\n"))
    return out


def read_adapter(directory: str | os.PathLike, allow_lora: bool = False) -> tuple[DoRAConfig, dict[str, torch.Tensor]]:
    """Config and tensors of an adapter directory, with errors that name the missing or bad file."""
    path = Path(directory)
    if not path.is_dir():
        raise InputNotFoundError(f"adapter directory {str(path)!r} does not exist")
    cfg_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise InputNotFoundError(f"adapter directory {str(path)!r} has no {CONFIG_NAME}")
    if not weights_path.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{path}/adapter_model.bin is a pickle; dora_dist reads safetensors only. Convert it "
                f"with peft: PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)"
            )
        raise InputNotFoundError(f"adapter directory {str(path)!r} has no {WEIGHTS_NAME}")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_path} is not valid JSON: {exc}") from exc
    cfg = DoRAConfig.from_peft_dict(raw, source=str(cfg_path), allow_lora=allow_lora)
    from safetensors import SafetensorError

    try:
        return cfg, load_file(str(weights_path))
    except SafetensorError as exc:
        raise AdapterError(
            f"{weights_path} is not a readable safetensors file ({exc}); save the adapter again "
            "(save_adapter, or peft's save_pretrained(safe_serialization=True))"
        ) from exc


def _group_by_module(
    tensors: dict[str, torch.Tensor], source: str, saved: dict[str, nn.Module] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Adapter tensors by module; the tensors of `saved` (modules_to_save) are taken out of `tensors` first."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    tensors = dict(tensors)
    for name, module in (saved or {}).items():
        for key in module.state_dict():
            if f"{PREFIX}{name}.{key}" in tensors:
                tensors.pop(f"{PREFIX}{name}.{key}")
    for key, tensor in tensors.items():
        for suffix, attr in SUFFIXES.items():
            if key.startswith(PREFIX) and key.endswith("." + suffix):
                modules.setdefault(key[len(PREFIX) : -len(suffix) - 1], {})[attr] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise AdapterError(
            f"{source}: unexpected tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; expected "
            f"'{PREFIX}<module>.{{lora_A.weight, lora_B.weight, lora_magnitude_vector}}' or the "
            "tensors of a module named in modules_to_save"
        )
    return modules


def saved_adapter_dtype(by_module: dict[str, dict[str, torch.Tensor]], default: str) -> str:
    """The adapter dtype the file was saved in (the widest of its adapter tensors), so that a float64 adapter is
    loaded as float64, not cast to the config's default; `default` when the tensors are of no adapter dtype."""
    dtypes = [t.dtype for parts in by_module.values() for t in parts.values() if t.is_floating_point()]
    if not dtypes:
        return default
    widest = functools.reduce(torch.promote_types, dtypes)
    return next((name for name, dtype in ADAPTER_DTYPES.items() if dtype == widest), default)


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | os.PathLike, allow_lora: bool = False) -> nn.Module:
    """Load a PEFT-format LoRA/DoRA adapter (saved by us or by peft) into a plain model, or into a model that
    already has matching DoRA layers. The adapted modules are the ones named in the file."""
    cfg, tensors = read_adapter(directory, allow_lora=allow_lora)
    source = str(Path(directory) / WEIGHTS_NAME)
    saved = {n: model.get_submodule(n) for n in find_modules_to_save(model, cfg.modules_to_save, strict=False)}
    by_module = _group_by_module(tensors, source, saved)
    if not by_module:
        raise AdapterError(f"{source} holds no adapter tensors")
    existing = dict(dora_layers(model))
    if existing:
        missing = sorted(set(by_module) - set(existing))
        if missing:
            raise AdapterError(f"{source} has adapters for {missing[:5]} which are not DoRA layers in this model")
    else:
        module_names = {name for name, _ in model.named_modules()}
        missing = sorted(set(by_module) - module_names)
        if missing:
            raise AdapterError(
                f"{source} has adapters for modules this model ({type(model).__name__}) lacks: "
                f"{missing[:5]}; is it an adapter of another base model?"
            )
        cfg = dataclasses.replace(cfg, adapter_dtype=saved_adapter_dtype(by_module, cfg.adapter_dtype))
        inject_dora(model, sorted(by_module), cfg, init_magnitude=False)
    layers = dict(dora_layers(model))
    for name, parts in by_module.items():
        layer = layers[name]
        need = ["lora_A", "lora_B"] + (["magnitude"] if layer.use_dora else [])
        absent = [a for a in need if a not in parts]
        if absent:
            keys = [f"{PREFIX}{name}.{k}" for k, a in SUFFIXES.items() if a in absent]
            if absent == ["magnitude"] and not any("magnitude" in p for p in by_module.values()):
                raise AdapterError(
                    f"{source} holds a plain LoRA adapter (no lora_magnitude_vector tensors) but its "
                    f"{CONFIG_NAME} says use_dora=true: use the DoRA adapter's files, or set "
                    "use_dora to false there to load it as LoRA"
                )
            raise AdapterError(f"{source} is missing {keys}")
        for attr, tensor in parts.items():
            param = getattr(layer, attr)
            if param is None:
                raise AdapterError(f"{source}: {name} has a magnitude vector but the layer is plain LoRA")
            if tuple(tensor.shape) != tuple(param.shape):
                key = next(k for k, a in SUFFIXES.items() if a == attr)
                raise AdapterError(
                    f"{source}: tensor '{PREFIX}{name}.{key}' has shape {tuple(tensor.shape)} but the "
                    f"model expects {tuple(param.shape)} (another base model, or another dora.r?)"
                )
            param.copy_(tensor.to(param.dtype))
    _load_modules_to_save(saved, tensors, source)
    return model


def _load_modules_to_save(saved: dict[str, nn.Module], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy the full tensors of the modules_to_save into their modules (every tensor must be in the file)."""
    for name, module in saved.items():
        present = {k: tensors.get(f"{PREFIX}{name}.{k}") for k in module.state_dict()}
        absent = [f"{PREFIX}{name}.{k}" for k, t in present.items() if t is None]
        if absent:
            raise AdapterError(f"{source} is missing {absent} (modules_to_save {name!r})")
        for key, target in module.state_dict(keep_vars=True).items():
            tensor = present[key]
            if tuple(tensor.shape) != tuple(target.shape):
                raise AdapterError(
                    f"{source}: tensor '{PREFIX}{name}.{key}' has shape {tuple(tensor.shape)} but the "
                    f"model expects {tuple(target.shape)}"
                )
            target.data.copy_(tensor.to(target.dtype))
