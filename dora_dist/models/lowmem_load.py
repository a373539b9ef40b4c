"""Low-memory QDoRA loading: no rank ever holds the full bf16 model.

The model is built on the meta device, its linear layers replaced by (meta) `ShardedLinear4bit`s, DoRA applied,
FSDP2 applied (each parameter becomes a meta DTensor of this rank's rows), and only then are real tensors
allocated (`to_empty`) and filled from the safetensors files, one tensor at a time:

- a dense tensor (embeddings, norms, lm_head) is read as just this rank's rows (`safe_open(...).get_slice`);
- a linear weight is read in row chunks of about CHUNK_ELEMENTS values, each chunk quantized with bitsandbytes'
  own `quantize_4bit`; the rank keeps the packed bytes of its rows plus the (small) per-block absmax of the whole
  matrix, from which the double quantization (a global mean and 256-block groups) is computed exactly as bnb does
  on the whole matrix. Chunks start at block boundaries, so the result is bit-identical to quantizing the full
  matrix in one call, and the peak is one bf16 chunk + this rank's 4-bit rows + one matrix's absmax.

A pre-quantized checkpoint (bitsandbytes packed bytes + quant state, models/prequantized.py) is not re-quantized:
each rank reads only its rows' stored bytes and the (small) quantization state, and re-lays them out by rows.

Every rank reads each linear weight in full (to get the global double-quant statistics) but holds at most one
chunk of it; the 70B job thus needs ~1/N of the 4-bit model per GPU plus a few MiB of staging.
Then `init_adapters` draws lora_A exactly as a single process would (same seed, same module order) and writes
each rank's rows, and the trainer's engine initialises the magnitudes from the local packed rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from dora_dist.nn.weight_source import is_dtensor
from dora_dist.quant.sharded4bit import Sharded4bitTensor
from dora_dist.quant.sharded4bit_linear import ShardedLinear4bit

if TYPE_CHECKING:
    from dora_dist.config import Config
    from dora_dist.dist_env import DistEnv

CHUNK_ELEMENTS = 1 << 24  # values per bf16 staging chunk (32 MiB)


# ------------------------------------------------------------------------------------------------------------
# meta model
# ------------------------------------------------------------------------------------------------------------
def replace_linears_with_4bit(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: Iterable[str] = ("lm_head",),
) -> list[str]:
    """Swap every nn.Linear (except `skip` leaf names, as bnb's llm_int8_skip_modules) for a ShardedLinear4bit.

    On a meta model the new layers are empty meta tensors (to be filled by `load_safetensors_lowmem`); on a real
    model each weight is quantized as bitsandbytes would, layer by layer (the dense weight is released as we go).
    Returns the replaced module names.
    """
    skip = set(skip)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.rsplit(".", 1)[-1] not in skip]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, leaf)
        if lin.weight.is_meta:
            new = ShardedLinear4bit.empty(
                lin.in_features,
                lin.out_features,
                lin.bias is not None,
                quant_type,
                blocksize,
                double_quant,
                compute_dtype,
                device="meta",
            )
        else:
            new = ShardedLinear4bit.from_linear(lin, quant_type, blocksize, double_quant, compute_dtype)
        setattr(parent, leaf, new)
    return names


def build_qdora_on_meta(
    hf_config,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    dtype: torch.dtype = torch.bfloat16,
    **from_config_kwargs,
):
    """A causal LM from a transformers config, on meta, with 4-bit shardable linears. No memory used."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **from_config_kwargs)
    replace_linears_with_4bit(model, quant_type, blocksize, double_quant, compute_dtype)
    return model


# ------------------------------------------------------------------------------------------------------------
# materialize + load
# ------------------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rank-local tensor, global index of its first row) for a DTensor sharded by rows, or (t, 0)."""
    if not is_dtensor(t):
        return t, 0
    # The DTensor's own local tensor, not to_local(): writes (copy_ into a packed 4-bit shard also replaces its
    # quantization constants) must land on the object FSDP2 holds, not on a fresh alias of it.
    return t._local_tensor, _local_row_offset(t)


def _local_row_offset(t) -> int:
    """Global index of the first local row of a DTensor sharded Shard(0) on its mesh (torch.chunk layout)."""
    from torch.distributed.tensor import Shard

    offset, rows = 0, t.shape[0]
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise NotImplementedError(f"only row (Shard(0)) sharding is supported here, got {placement}")
            chunk = -(-rows // t.device_mesh.size(dim))
            offset += t.device_mesh.get_local_rank(dim) * chunk
            rows = chunk
    return offset


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate every meta tensor (sharded or not) on `device`, uninitialised, and recompute RoPE buffers."""
    model.to_empty(device=device)
    _reinit_rotary(model, device)
    return model


def _reinit_rotary(model: nn.Module, device) -> None:
    """Non-persistent buffers such as RoPE's inv_freq are not in checkpoints: rebuild them from the config."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            with torch.device(device):
                fresh = type(module)(module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf)


def checkpoint_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {path}")
    return files


def _resolve(model: nn.Module, key: str) -> tuple[nn.Module, str] | None:
    """The module and attribute a checkpoint key loads into (DoRA layers redirect to their base layer)."""
    from dora_dist.nn.dora_linear import DoRALinear

    mod_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None
    if isinstance(module, DoRALinear):
        module = module.base_layer
    if not hasattr(module, attr) or getattr(module, attr) is None:
        return None
    return module, attr


@torch.no_grad()
def quantize_rows_streaming(
    read_rows,
    out_features: int,
    in_features: int,
    rows: tuple[int, int],
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    dtype: torch.dtype,
    device=None,
) -> Sharded4bitTensor:
    """Quantize a (out, in) matrix read by `read_rows(a, b)` in chunks; keep rows [r0, r1). Bit-exact vs bnb."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState

    r0, r1 = rows
    align = blocksize // math.gcd(in_features, blocksize)  # chunks must start on a block boundary
    step = max(align, (CHUNK_ELEMENTS // max(1, in_features)) // align * align)
    absmaxes, local_bytes = [], []
    for a in range(0, out_features, step):
        b = min(a + step, out_features)
        chunk = read_rows(a, b).to(device)
        if chunk.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            chunk = chunk.float()
        packed, qs = bnbf.quantize_4bit(
            chunk.contiguous(), blocksize=blocksize, compress_statistics=False, quant_type=quant_type
        )
        absmaxes.append(qs.absmax)
        lo, hi = max(a, r0), min(b, r1)
        if lo < hi:
            local_bytes.append(packed.reshape(-1)[(lo - a) * in_features // 2 : (hi - a) * in_features // 2].clone())
        del chunk, packed
    absmax = torch.cat(absmaxes)
    code = bnbf.get_4bit_type(quant_type, device=absmax.device)
    shape = torch.Size((out_features, in_features))
    if double_quant:  # exactly bitsandbytes.functional.quantize_4bit(compress_statistics=True), on the whole matrix
        offset = absmax.mean()
        qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
        qs = QuantState(
            absmax=qabsmax,
            shape=shape,
            dtype=dtype,
            blocksize=blocksize,
            code=code,
            quant_type=quant_type,
            offset=offset,
            state2=state2,
        )
    else:
        qs = QuantState(absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize, code=code, quant_type=quant_type)
    packed_local = torch.cat(local_bytes) if local_bytes else torch.empty(0, dtype=torch.uint8, device=absmax.device)
    return Sharded4bitTensor.from_bnb(packed_local, qs, dtype, rows=(r0, r1))


@torch.no_grad()
def load_safetensors_lowmem(
    model: nn.Module, path: str | Path, strict: bool = True, weight_dtype: torch.dtype | None = None
) -> dict:
    """Fill a materialized (possibly FSDP2-sharded) model from safetensors, tensor by tensor, rows by rows.

    weight_dtype: cast linear weights to this dtype before quantizing (as transformers does when it loads a
    checkpoint in `dtype` and then quantizes), so the codes equal a bitsandbytes load of the same model.

    Returns {"loaded": n, "skipped": [...], "max_staging_bytes": peak bytes of one read}.
    """
    from safetensors import safe_open

    from dora_dist.models.prequantized import load_quant_state, quant_state_keys, read_packed_rows

    loaded, skipped, max_staging, filled = 0, [], 0, set()
    files = checkpoint_files(path)
    key_file = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            key_file.update((k, file) for k in f.keys())
    state_keys = {k: quant_state_keys(k, key_file) for k in key_file if k.endswith(".weight")}
    state_of = {sk for keys in state_keys.values() for sk in keys}  # read with their weight, not on their own

    def read_state(key):
        tensors = {}
        for sk in state_keys[key]:
            with safe_open(str(key_file[sk]), framework="pt", device="cpu") as g:
                tensors[sk] = g.get_tensor(sk)
        return load_quant_state(key, tensors)

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in state_of:
                    continue
                target = _resolve(model, key)
                if target is None:
                    skipped.append(key)
                    continue
                module, attr = target
                param = getattr(module, attr)
                sl = f.get_slice(key)
                shape = tuple(sl.get_shape())
                local, r0 = _local(param)
                prequantized = bool(state_keys.get(key))
                if tuple(param.shape) != shape and not prequantized:
                    raise ValueError(f"{file.name}:{key} has shape {shape}, the model expects {tuple(param.shape)}")
                r1 = r0 + (local.shape[0] if local.dim() else 0)
                if prequantized:  # a pre-quantized checkpoint: this rank's stored bytes, not re-quantized
                    if not (isinstance(module, ShardedLinear4bit) and attr == "weight"):
                        raise ValueError(f"{file.name}:{key} is stored 4-bit but the model has a dense {key}")
                    qs = read_state(key)
                    if tuple(qs.shape) != tuple(param.shape):
                        raise ValueError(
                            f"{file.name}:{key} has shape {tuple(qs.shape)}, the model expects {tuple(param.shape)}"
                        )
                    local.copy_(read_packed_rows(sl, qs, (r0, r1), local.dtype, local.meta, key))
                    max_staging = max(max_staging, (r1 - r0) * int(qs.shape[1]) // 2)
                elif isinstance(module, ShardedLinear4bit) and attr == "weight":
                    m = local.meta
                    staging = []

                    def read(a, b, sl=sl, staging=staging):
                        t = sl[a:b]
                        staging.append(t.numel() * t.element_size())
                        return t.to(weight_dtype) if weight_dtype is not None else t

                    q = quantize_rows_streaming(
                        read,
                        shape[0],
                        shape[1],
                        (r0, r1),
                        m.quant_type,
                        m.blocksize,
                        m.nested,
                        local.dtype,
                        device=local.packed.device,
                    )
                    local.copy_(q)
                    max_staging = max(max_staging, max(staging))
                else:
                    t = sl[r0:r1] if local.dim() else sl[:]
                    max_staging = max(max_staging, t.numel() * t.element_size())
                    local.copy_(t.to(dtype=local.dtype))
                loaded += 1
                filled.add(id(param))
    if strict:
        _check_all_loaded(model, filled, path)
    return {"loaded": loaded, "skipped": skipped, "max_staging_bytes": max_staging}


ADAPTER_PARAMS = ("lora_A", "lora_B", "magnitude")


def _check_all_loaded(model: nn.Module, filled: set[int], path) -> None:
    """Every base parameter must have come from the checkpoint: after to_empty() a missing one would hold whatever
    the allocator left there. Adapters (drawn, not loaded) and a tied output head (re-tied after) are exempt."""
    tied: set[int] = set()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            tied = {id(p) for p in head.parameters(recurse=False)}
    params = dict(model.named_parameters())
    tied |= {id(params[copy]) for copy in _untied_copies(model) if copy in params}  # filled from their source
    missing = [
        name
        for name, p in model.named_parameters()
        if name.rsplit(".", 1)[-1] not in ADAPTER_PARAMS and id(p) not in filled and id(p) not in tied
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(
            f"the checkpoint at {path} does not hold every weight of the model: missing {shown} "
            "(wrong path or architecture?)"
        )


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """Draw every lora_A (kaiming_uniform, a=√5, as nn.Linear and peft do) and zero every lora_B, layer by layer in
    module order, from a generator seeded with `seed`: the same adapters for any engine, world size, load path and
    target order, whatever the global RNG went through before. Sharded adapters (FSDP2 DTensors) keep their own
    rows of the full (r, in) draw (r·in values per layer: small). A model still on the meta device is skipped; it
    is drawn once its storage exists."""
    from dora_dist.nn.dora_linear import DoRALinear

    layers = [m for m in model.modules() if isinstance(m, DoRALinear)]
    if any(_local(layer.lora_A)[0].is_meta for layer in layers):
        return
    generator = torch.Generator().manual_seed(int(seed))
    for layer in layers:
        full = torch.empty(tuple(layer.lora_A.shape), dtype=layer.lora_A.dtype)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        local, r0 = _local(layer.lora_A)
        local.copy_(full[r0 : r0 + local.shape[0]].to(local.device))
        _local(layer.lora_B)[0].zero_()
        if layer.magnitude is not None:
            _local(layer.magnitude)[0].fill_(1.0)  # set for real by the engine's init_magnitudes
        layer.invalidate_cache()


# ------------------------------------------------------------------------------------------------------------
# trainer integration: parallel.engine=fsdp2 with quantization.mode=nf4|fp4
# ------------------------------------------------------------------------------------------------------------
def local_checkpoint_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local directory holding the safetensors of `name_or_path` (downloads *.safetensors/*.json from the hub)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=["*.safetensors", "*.json"]))


def build_lowmem_qdora_model(cfg: Config, env: DistEnv | None = None) -> nn.Module:
    """The job's causal LM on meta with ShardedLinear4bit linears; the engine loads it after sharding
    (`finish_lowmem_load`)."""
    from dora_dist import models

    if cfg.quantization.mode not in ("nf4", "fp4"):
        raise ValueError(f"the low-memory 4-bit path needs quantization.mode nf4 or fp4, got {cfg.quantization.mode}")
    if cfg.model.builds_from_scratch:
        raise ValueError(
            "quantization needs pretrained weights; a model built from model.config cannot be loaded "
            "in 4 bits (save it with save_pretrained first)"
        )
    from dora_dist.models.prequantized import check_loaded_config

    hf_config = models.model_config(cfg, env)
    check_loaded_config(cfg, hf_config)  # a pre-quantized checkpoint's settings are the job's (its bytes are kept)
    dtype = models.base_dtype(cfg)
    compute_dtype = models.DTYPES[cfg.quantization.compute_dtype]
    extra = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    model = build_qdora_on_meta(
        hf_config,
        cfg.quantization.mode,
        64,
        cfg.quantization.double_quant,
        compute_dtype,
        dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        **extra,
    )
    model.config.use_cache = False
    return model


@torch.no_grad()
def finish_lowmem_load(model: nn.Module, cfg: Config, env: DistEnv, device) -> dict:
    """After fully_shard of a model from `build_lowmem_qdora_model`: allocate this rank's shards, stream the
    checkpoint into them, draw the adapters from the job's seed."""
    from dora_dist import models

    materialize(model, device)
    path = local_checkpoint_dir(models.resolve_model_path(cfg, env), cfg.model.revision)
    stats = load_safetensors_lowmem(model, path, weight_dtype=models.base_dtype(cfg))
    _retie_embeddings(model)
    init_adapters(model, cfg.training.seed)
    return stats


def _untied_copies(model: nn.Module) -> dict[str, str]:
    """{parameter: the parameter it is a trained copy of} (tied weights in dora.modules_to_save, adapters/inject.py)."""
    from dora_dist.adapters.inject import UNTIED_ATTR

    return dict(getattr(model, UNTIED_ATTR, {}) or {})


def _retie_embeddings(model: nn.Module) -> None:
    """to_empty() unties shared parameters; copy the input embedding into a tied output head (same row shards),
    and each tied weight into the copy a modules_to_save module trains (a tied checkpoint stores it once)."""
    params = dict(model.named_parameters())
    for copy, source in _untied_copies(model).items():
        if copy in params and source in params:
            _local(params[copy])[0].copy_(_local(params[source])[0])
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not callable(get_in) or not callable(get_out) or get_out() is None:
        return
    w_in, w_out = get_in().weight, get_out().weight
    if w_in is not w_out:
        _local(w_out)[0].copy_(_local(w_in)[0])
