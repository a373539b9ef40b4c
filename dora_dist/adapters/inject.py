"""Put DoRA layers into a model (apply_dora), find them again, and fold them back in (merge_and_unload)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from dora_dist.adapters.config import DoRAConfig
from dora_dist.errors import SettingError
from dora_dist.nn.dora_linear import DoRALinear
from dora_dist.nn.weight_source import is_supported_base, supported_bases


def dora_layers(model: nn.Module) -> Iterator[tuple[str, DoRALinear]]:
    """(module name, layer) for every DoRALinear in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, DoRALinear):
            yield name, module


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection (lm_head), which 'all-linear' leaves alone as peft does."""
    heads = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        heads |= {name for name, module in model.named_modules() if module is head}
    return heads


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every named module that is not inside an existing DoRA layer."""
    inside: list[str] = []
    out = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, DoRALinear):
            inside.append(name)
        out.append((name, module))
    return out


def find_target_modules(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the modules `target_modules` selects, with errors that list what the model has."""
    candidates = candidate_modules(model)
    supported = [name for name, m in candidates if is_supported_base(m)]
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        names = [n for n in supported if n not in heads and n.rsplit(".", 1)[-1] not in heads]
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        names = [name for name, _ in candidates if pattern.fullmatch(name)]
        if not names:
            raise SettingError(
                "target_modules",
                f"regex {target_modules!r} matches no module; linear layers in this model: {_leaf_summary(supported)}",
            )
    else:
        names, unmatched = [], []
        for target in target_modules:
            hits = [name for name, _ in candidates if name == target or name.endswith("." + target)]
            if not hits:
                unmatched.append(target)
            names.extend(h for h in hits if h not in names)
        if unmatched:
            raise SettingError(
                "target_modules",
                f"{unmatched} match no module in {type(model).__name__}; linear layers "
                f"in this model: {_leaf_summary(supported)}",
            )
    if not names:
        raise ValueError(f"no linear layer to adapt in {type(model).__name__} (target_modules={target_modules!r})")
    chosen = set(names)
    names = [name for name, _ in candidates if name in chosen]  # module order, whatever the order of the targets
    by_name = dict(candidates)
    bad = [f"{n} ({type(by_name[n]).__name__})" for n in names if not is_supported_base(by_name[n])]
    if bad:
        raise TypeError(
            f"target_modules select unsupported module types: {', '.join(bad)}; DoRA supports "
            + ", ".join(supported_bases())
        )
    return names


def _leaf_summary(names: Iterable[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return ", ".join(leaves) if leaves else "(none)"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def find_modules_to_save(model: nn.Module, modules_to_save: list[str] | None, strict: bool = True) -> list[str]:
    """Full names of the modules `modules_to_save` selects (suffix match on whole name components, outermost only).

    Unlike peft we do not wrap them in a copy: they are trained in place, which keeps DDP/FSDP seeing plain
    parameters; the adapter file still holds them under peft's keys (`base_model.model.<module>.<param>`). A
    parameter they share with another module (tied embeddings) is first given its own copy, as peft's wrapper copies
    the module (`untie_modules_to_save`).
    strict=False ignores names the model lacks (peft's configs for SEQ_CLS list both "classifier" and "score").
    """
    if not modules_to_save:
        return []
    found: list[str] = []
    unmatched = []
    for key in modules_to_save:
        hits = [n for n, _ in candidate_modules(model) if n == key or n.endswith("." + key)]
        if not hits:
            unmatched.append(key)
        found.extend(h for h in hits if h not in found)
    if unmatched and strict:
        raise SettingError("modules_to_save", f"{unmatched} match no module in {type(model).__name__}")
    found = [n for n in found if not any(n.startswith(o + ".") for o in found)]
    adapted = {n for n, _ in dora_layers(model)}
    clash = [n for n in found if n in adapted or any(a.startswith(n + ".") for a in adapted)]
    if clash:
        raise SettingError(
            "modules_to_save", f"{clash} are (or contain) DoRA targets; a module is either adapted or trained in full"
        )
    return sorted(found)


def modules_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} trained in full next to the adapters, from the model's DoRAConfig."""
    cfg = getattr(model, "dora_config", None)
    names = find_modules_to_save(model, cfg.modules_to_save if cfg else None, strict=False)
    return {n: model.get_submodule(n) for n in names}


#: on a model after `inject_dora`: {parameter of a modules_to_save module given its own copy: the name it was tied to}
UNTIED_ATTR = "dora_untied"


def untie_modules_to_save(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Give every parameter of the modules_to_save that is shared with a module outside them its own copy.

    The one rule for tied weights (e.g. lm_head tied to the input embeddings): the saved module trains a copy and
    the module it was tied to keeps the base weights, exactly what peft does (its ModulesToSaveWrapper trains a copy
    of the module; peft reloads our adapter the same way, so its logits equal the trained model's). Training the
    shared tensor instead would move the input embeddings too, which the adapter file cannot carry under
    peft's default loading. The model's config is marked untied so nothing re-ties them (transformers'
    tie_weights, a merged model's save_pretrained). A copy of a meta parameter stays on meta; a ZeRO-3 partitioned
    one is gathered to copy it. Returns {copy: the parameter it was tied to}, also kept as `model.dora_untied`.
    """
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{mod_name}.{attr}" if mod_name else attr)
    untied: dict[str, str] = dict(getattr(model, UNTIED_ATTR, {}) or {})
    for name in names:
        for sub_name, sub in model.get_submodule(name).named_modules():
            for attr, param in list(sub.named_parameters(recurse=False)):
                full = ".".join(p for p in (name, sub_name, attr) if p)
                inside = name + "."
                others = [o for o in owners.get(id(param), []) if not o.startswith(inside)]
                if not others:
                    continue
                setattr(sub, attr, nn.Parameter(_full_copy(param), requires_grad=param.requires_grad))
                untied[full] = others[0]
    if untied:
        config = getattr(model, "config", None)
        for c in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c}.values():
            if getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
    setattr(model, UNTIED_ATTR, untied)
    return untied


@torch.no_grad()
def _full_copy(param: torch.Tensor) -> torch.Tensor:
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned: gather the whole tensor to copy it (DeepSpeed converts the
        import deepspeed  # copy into a partitioned parameter when it wraps the model)

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().clone()
    return param.detach().clone()


def inject_dora(model: nn.Module, names: list[str], cfg: DoRAConfig, init_magnitude: bool = True) -> nn.Module:
    """Replace exactly the named modules by DoRALinear; freeze everything but them and cfg.modules_to_save."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        layer = DoRALinear(
            base,
            r=cfg.r,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            use_rslora=cfg.use_rslora,
            use_dora=cfg.use_dora,
            adapter_dtype=cfg.torch_adapter_dtype,
            init_magnitude=init_magnitude,
        )
        _set_submodule(model, name, layer)
    saved = find_modules_to_save(model, cfg.modules_to_save, strict=False)
    untie_modules_to_save(model, saved)  # a tied module trains its own copy, as in peft
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    model.dora_config = cfg
    return model


def apply_dora(model: nn.Module, cfg: DoRAConfig, init_magnitude: bool = True) -> nn.Module:
    """Turn the modules selected by cfg.target_modules into DoRALinear, in place; only adapters stay trainable.

    init_magnitude=False leaves m at 1 (for models on the meta device, or when an engine initialises it from
    sharded weights after loading); call `init_magnitudes(model)` once the real weights are in place.
    """
    if not isinstance(cfg, DoRAConfig):
        raise TypeError(f"apply_dora expects a DoRAConfig, got {type(cfg).__name__}")
    if any(True for _ in dora_layers(model)):
        raise ValueError("this model already has DoRA layers; merge_and_unload() it or load a fresh base model")
    find_modules_to_save(model, cfg.modules_to_save, strict=True)  # unknown names are an error here, not on load
    return inject_dora(model, find_target_modules(model, cfg.target_modules), cfg, init_magnitude)


@torch.no_grad()
def init_magnitudes(model: nn.Module) -> None:
    """m = ‖W‖ per row for every DoRA layer (single process, or a model whose weights are not sharded)."""
    for _, layer in dora_layers(model):
        layer.init_magnitude()


def set_merged(model: nn.Module, merged: bool, keep_original: bool = True) -> None:
    """Merge (or unmerge) every DoRA layer in place; the layers stay, so training can resume after unmerge.
    keep_original: each layer keeps a copy of its base weight while merged, so unmerge is exact (see
    DoRALinear.merge: rounding W' back to W is not, in 16 bits least of all)."""
    for _, layer in dora_layers(model):
        layer.merge(keep_original) if merged else layer.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module, requantize: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every DoRA layer by a plain module holding W' = m ⊙ (W + sBA)/‖W + sBA‖ (modules_to_save are
    trained in place, so they already hold their weights).

    Dense and Conv1D bases are merged in place. A quantized base becomes a dense nn.Linear in its compute dtype
    (or `dtype`); with requantize=True a 4-bit base is quantized again to 4 bits, which is lossy: the merged
    weight gets a fresh quantization error on top of the adapter's effect.
    """
    from dora_dist.quant.bnb import BnB4bitWeight

    for name, layer in list(dora_layers(model)):
        source = layer.weight_source
        if layer.merged or source.supports_inplace_merge():
            layer.merge(keep_original=False)  # the layer is dropped: nothing will unmerge it
            plain = layer.base_layer
        elif requantize and isinstance(source, BnB4bitWeight):
            # merge in fp32: requantize_4bit casts to the dtype the base was quantized from; going through a bf16
            # compute dtype first would add a bf16 rounding on top of the (documented) requantization error.
            plain = source.to_plain_module(layer.merged_weight(torch.float32), requantize=True)
        else:
            plain = source.to_plain_module(layer.merged_weight(dtype or source.compute_dtype))
        _set_submodule(model, name, plain)
    if hasattr(model, "dora_config"):
        del model.dora_config
    return model
