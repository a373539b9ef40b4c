"""Models and tokenizers: the built-in tiny Llama, local paths, hub ids, from-scratch configs, meta-device builds,
and 4/8-bit loading through transformers' BitsAndBytesConfig.

The built-in default ("builtin:tiny-llama") needs no download: a BPE tokenizer is trained locally on the synthetic
corpus and a small Llama is initialised from a fixed seed; both are saved once as an ordinary transformers
checkpoint under the cache directory, so every later run (and `dora-dist merge`) loads them like any local model.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dora_dist.errors import (
    ConfigError,
    InputNotFoundError,
    ModelError,
    SettingError,
    UserError,
    importable,
    one_line,
)
from dora_dist.models.builtin import (
    BUILTIN_NAME,
    TINY_LLAMA,
    builtin_model_dir,
    default_cache_dir,
    ensure_builtin_model,
    resolve_base,
    train_builtin_tokenizer,
)

if TYPE_CHECKING:
    from dora_dist.adapters.config import DoRAConfig
    from dora_dist.config import Config
    from dora_dist.dist_env import DistEnv
    from dora_dist.models.load_plan import LoadPlan

# Set before any tokenizer of a job is made (here and in builtin.py): the tokenizers library's threads and a later
# fork (DataLoader workers, torch.compile's compile workers) otherwise warn, or deadlock. A user's own value wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

#: architecture of well-known hub models, embedded so configs can be validated (and built on meta) offline
KNOWN_ARCHITECTURES = {
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b.json",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b.json",
    "meta-llama/Meta-Llama-3.1-8B": "llama-3.1-8b.json",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama-3.1-8b.json",
    "meta-llama/Llama-3.1-70B": "llama-3.1-70b.json",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b.json",
    "meta-llama/Meta-Llama-3.1-70B": "llama-3.1-70b.json",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "llama-3.1-70b.json",
}
ARCH_DIR = Path(__file__).resolve().parent / "architectures"


def base_dtype(cfg: Config) -> torch.dtype:
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    return torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32


def resolve_model_path(cfg: Config, env: DistEnv | None = None) -> str:
    """The local directory or hub id to load; builds the built-in model first when needed."""
    name = cfg.model.name_or_path
    if name == BUILTIN_NAME:
        return str(ensure_builtin_model(cfg, env))
    check_model_path(cfg)
    return name


def adapter_base_name(cfg: Config, env: DistEnv | None = None) -> str:
    """What a saved adapter names as its base (base_model_name_or_path): the built-in model by its name, which any
    machine rebuilds (merge, generate and analyze resolve it: builtin.resolve_base), anything else as loaded."""
    if cfg.model.name_or_path == BUILTIN_NAME and cfg.model.config is None:
        return BUILTIN_NAME
    return resolve_model_path(cfg, env)


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def check_model_path(cfg: Config) -> None:
    """model.name_or_path / model.tokenizer: a built-in name we have, and a local path (one that starts with /, ./,
    ../ or ~) that exists. Hub ids are left to the loader (checked without a download: nothing to check here)."""
    name = cfg.model.name_or_path
    if name.startswith("builtin:") and name != BUILTIN_NAME:
        raise ConfigError(f"model.name_or_path: unknown built-in model {name!r}; the built-in one is {BUILTIN_NAME!r}")
    uses_path = cfg.model.config is None or name == BUILTIN_NAME
    for key, value in (("model.name_or_path", name if uses_path else None), ("model.tokenizer", cfg.model.tokenizer)):
        if value and not value.startswith("builtin:") and _looks_local(value) and not Path(value).expanduser().exists():
            raise InputNotFoundError(
                f"{key}: no such directory: {value}; give an existing local model directory or a Hugging Face hub id"
            )


def check_remote_code(cfg: Config) -> None:
    """A local model whose config.json maps its classes to code shipped beside it (auto_map), of a model type
    transformers does not know, loads only with model.trust_remote_code=true: say so before anything is loaded."""
    name = cfg.model.name_or_path
    config_file = Path(name).expanduser() / "config.json"
    if cfg.model.trust_remote_code or not config_file.is_file():
        return
    try:
        data = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ModelError(f"model.name_or_path: {config_file} is not valid JSON ({exc})") from exc
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    if not auto_map:
        return
    from transformers import CONFIG_MAPPING

    if data.get("model_type") in CONFIG_MAPPING:
        return  # transformers has its own implementation and uses it without running the model's code
    classes = ", ".join(f"{k} -> {v}" for k, v in sorted(auto_map.items()))
    raise ConfigError(
        f"model.name_or_path={name} needs its own code (config.json auto_map: {classes}); set "
        "model.trust_remote_code=true if you trust that code, or use a model transformers supports"
    )


def quantization_problem(cfg: Config) -> str | None:
    """Why the configured 4/8-bit base cannot be loaded here (bitsandbytes missing), or None."""
    mode = cfg.quantization.mode
    if mode != "none" and not importable("bitsandbytes"):
        return (
            f"quantization.mode={mode} needs bitsandbytes, which is not installed (or cannot be imported) here: "
            "pip install 'dora_dist[quant]', or set quantization.mode=none"
        )
    return None


@contextlib.contextmanager
def loading(what: str, name: str):
    """Turn a loader's OSError (no such model/tokenizer, no config.json, unreachable hub id) into a ModelError."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, UserError):
            raise
        raise ModelError(f"model.name_or_path: cannot load the {what} from {name!r}: {one_line(exc)[:300]}") from exc


def known_architecture(name_or_path: str) -> dict | None:
    """The embedded config.json of a known hub model (no download), else None."""
    fname = KNOWN_ARCHITECTURES.get(name_or_path)
    if fname is None:
        return None
    return json.loads((ARCH_DIR / fname).read_text())


def hf_config_from_dict(d: dict | None):
    from transformers import AutoConfig

    d = dict(d or {})
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ValueError("a model config dict needs a 'model_type' key (e.g. 'llama')")
    d.pop("architectures", None)
    d.pop("torch_dtype", None)
    d.pop("transformers_version", None)
    return AutoConfig.for_model(model_type, **d)


def model_config(cfg: Config, env: DistEnv | None = None):
    """The transformers config of the model the job will train (no weights loaded)."""
    from transformers import AutoConfig

    if cfg.model.builds_from_scratch:
        return hf_config_from_dict(cfg.model.config)
    path = resolve_model_path(cfg, env)
    arch = known_architecture(path)
    if arch is not None and not Path(path).exists():
        return hf_config_from_dict(arch)
    with loading("model config", path):
        return AutoConfig.from_pretrained(
            path, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision
        )


def build_on_meta(config) -> nn.Module:
    """Instantiate a causal LM from a transformers config (or dict) on the meta device: no memory, no download."""
    from transformers import AutoModelForCausalLM

    if isinstance(config, dict):
        config = hf_config_from_dict(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def quantization_config(cfg: Config):
    q = cfg.quantization
    if q.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if q.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.mode,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=getattr(torch, q.quant_storage),
    )


def load_tokenizer(cfg: Config, env: DistEnv | None = None):
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer or resolve_model_path(cfg, env)
    if cfg.model.builds_from_scratch and not cfg.model.tokenizer:
        raise ConfigError("model.config builds a model from scratch: set model.tokenizer to a tokenizer path or id")
    from dora_dist.hub import check_hub_model

    check_hub_model(name, "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path", cfg.model.revision)
    with loading("tokenizer", name):
        tok = AutoTokenizer.from_pretrained(
            name, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: Config, env: DistEnv | None = None, plan: LoadPlan | None = None) -> nn.Module:
    """The base causal LM as the engine's LoadPlan asks (see models/load_plan.py): real weights on plan.device
    (4/8-bit bases are quantized when placed there), or a meta build the engine fills after sharding.

    From-scratch configs are initialised with torch.manual_seed(training.seed), identical on every rank.
    """
    from transformers import AutoModelForCausalLM

    from dora_dist.models.load_plan import LoadPlan

    plan = plan or LoadPlan("direct", torch.device("cpu"))
    device = plan.device
    if plan.kind == "sharded_4bit":
        # bitsandbytes' Params4bit cannot be sharded: build on meta with row-shardable 4-bit linears; the engine
        # allocates and loads each rank's rows after fully_shard (models/lowmem_load.py).
        from dora_dist.models.lowmem_load import build_lowmem_qdora_model

        return build_lowmem_qdora_model(cfg, env)
    dtype = base_dtype(cfg)
    common: dict[str, Any] = {}
    if cfg.model.attn_implementation:
        common["attn_implementation"] = cfg.model.attn_implementation
    if str(device) == "meta":
        # Parameters on meta (no memory, no weights read), buffers (e.g. RoPE inv_freq) real: the engine fills the
        # parameters afterwards (FSDP2 load_on_rank0: broadcast from rank 0 into each rank's shards).
        from accelerate import init_empty_weights

        if cfg.quantization.mode != "none":
            raise ValueError("a 4/8-bit model cannot be built on the meta device by this loader")
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(model_config(cfg, env), dtype=dtype, **common)
        model.config.use_cache = False
        return model
    if cfg.model.builds_from_scratch:
        if cfg.quantization.mode != "none":
            raise ValueError(
                "quantization needs pretrained weights; a model built from model.config cannot be "
                "loaded in 4/8 bits (save it with save_pretrained first)"
            )
        config = hf_config_from_dict(cfg.model.config)
        torch.manual_seed(cfg.training.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
        return model.to(device)
    path = resolve_model_path(cfg, env)
    from dora_dist.models.prequantized import check_loaded_config, checkpoint_quantization

    hf_config = model_config(cfg, env)
    check_loaded_config(cfg, hf_config)  # a pre-quantized base is loaded as one, with its own settings
    prequantized = checkpoint_quantization(hf_config.to_dict()) is not None
    qcfg = quantization_config(cfg)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision, **common)
    if qcfg is not None:
        if not prequantized:  # else transformers reads the (matching, see prequantized.reconcile) saved settings
            kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": str(device) if str(device) != "cuda" else torch.cuda.current_device()}
        if str(device).startswith("cuda") and torch.device(device).index is not None:
            kwargs["device_map"] = {"": torch.device(device).index}
    with loading("model", path):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if qcfg is None:
        model = model.to(device)  # type: ignore[arg-type]  # transformers' stub types .to's self oddly
    model.config.use_cache = False
    return model


def dora_config_from(cfg: Config) -> DoRAConfig:
    """The job's adapter settings: its `dora:` section is a DoRAConfig (validated when the config was loaded)."""
    return cfg.dora


def add_adapters(model: nn.Module, cfg: Config) -> nn.Module:
    """apply_dora with the job's settings, the adapters drawn from training.seed in module order (the same on every
    engine and world size, see lowmem_load.init_adapters). Magnitudes are left for the engine
    (`Engine.init_magnitudes`)."""
    from dora_dist.adapters import apply_dora
    from dora_dist.models.lowmem_load import init_adapters

    try:
        model = apply_dora(model, dora_config_from(cfg), init_magnitude=False)
    except SettingError as exc:  # a list that does not fit this model is a config problem, named by its setting
        raise ConfigError(f"dora.{exc.name}: {exc}") from exc
    except (ValueError, TypeError) as exc:  # no layer to adapt, or one of a type DoRA cannot adapt
        raise ConfigError(f"dora.target_modules: {exc}") from exc
    check_rank_fits(model, cfg.dora.r)
    init_adapters(model, cfg.training.seed)
    return model


def check_rank_fits(model: nn.Module, r: int) -> None:
    """dora.r above a layer's smaller side (min(in, out)) adds parameters without adding rank: refuse it, naming
    the first such layer and the largest r that fits every adapted layer."""
    from dora_dist.adapters.inject import dora_layers

    layers = [(name, layer) for name, layer in dora_layers(model)]
    too_small = [(name, layer) for name, layer in layers if r > min(layer.in_features, layer.out_features)]
    if too_small:
        name, layer = too_small[0]
        fits = min(min(lay.in_features, lay.out_features) for _, lay in layers)
        raise ConfigError(
            f"dora.r={r} is larger than the smaller side of {name} ({layer.out_features}×"
            f"{layer.in_features}; {len(too_small)} layer(s) like it): use dora.r <= {fits}"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a ZeRO-3 partitioned parameter counts by its full size (ds_numel)."""

    def numel(p: nn.Parameter) -> int:
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


__all__ = [
    "BUILTIN_NAME",
    "TINY_LLAMA",
    "DTYPES",
    "KNOWN_ARCHITECTURES",
    "base_dtype",
    "resolve_model_path",
    "adapter_base_name",
    "resolve_base",
    "known_architecture",
    "hf_config_from_dict",
    "model_config",
    "build_on_meta",
    "quantization_config",
    "load_tokenizer",
    "load_model",
    "dora_config_from",
    "add_adapters",
    "count_parameters",
    "check_model_path",
    "check_remote_code",
    "check_rank_fits",
    "quantization_problem",
    "builtin_model_dir",
    "default_cache_dir",
    "ensure_builtin_model",
    "train_builtin_tokenizer",
]
