"""Pre-quantized bitsandbytes checkpoints: a directory saved by transformers' `save_pretrained` from a model loaded
with a BitsAndBytesConfig (what most QLoRA users download). Its config.json carries a `quantization_config`; its
safetensors hold each 4-bit linear as packed bytes plus the quantization state (absmax, quant_map, ...).

One rule, applied before any engine is chosen (so `parallel.engine=auto` and preflight see the real base):

- `quantization.mode=none` (the default) on such a checkpoint takes the checkpoint's settings (quant type, double
  quantization, compute dtype, quant storage) and says so in one line: a 4-bit base is never trained believing it
  dense (it cannot be un-quantized: the dense weights are gone).
- any other `quantization` section must agree with the checkpoint on the quant type, double quantization and
  compute dtype; a contradiction is a ConfigError that names both values (quant_storage is only the dtype the same
  packed bytes are viewed as: the checkpoint's is used).

FSDP2 then streams the stored packed rows into its row-sharded 4-bit tensors (`read_packed_rows`): the same bytes
and quantization constants, no re-quantization and no dense copy.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dora_dist.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from dora_dist.config import Config

#: quant-state entries saved next to a packed 4-bit weight (bitsandbytes' QuantState.as_dict(packed=True))
QUANT_STATE_SUFFIXES = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
    "quant_state.bitsandbytes__fp4",
)


@dataclass(frozen=True)
class CheckpointQuantization:
    """The bitsandbytes settings a checkpoint was saved with, in the job config's terms."""

    mode: str  # nf4 | fp4 | int8
    double_quant: bool
    compute_dtype: str
    quant_storage: str

    def settings(self) -> dict[str, object]:
        """quantization.* key -> value (int8 has only a mode)."""
        if self.mode == "int8":
            return {"mode": "int8"}
        return {
            "mode": self.mode,
            "double_quant": self.double_quant,
            "compute_dtype": self.compute_dtype,
            "quant_storage": self.quant_storage,
        }

    def describe(self) -> str:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in self.settings().items())


#: quantization.* key -> the checkpoint's quantization_config key it is read from (for error messages)
CHECKPOINT_KEYS = {
    "mode": "bnb_4bit_quant_type",
    "double_quant": "bnb_4bit_use_double_quant",
    "compute_dtype": "bnb_4bit_compute_dtype",
    "quant_storage": "bnb_4bit_quant_storage",
}


#: the settings a job's section must share with the checkpoint. quant_storage is only the dtype the packed bytes
#: are viewed as (the bytes are the same): the checkpoint's is used whatever the section says (fsdp2 requires
#: uint8 in the section and views the stored bytes as uint8 rows)
COMPARED = ("mode", "double_quant", "compute_dtype")


def _fmt(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _dtype_name(value, default: str) -> str:
    if value is None:
        return default
    return str(value).replace("torch.", "")


def checkpoint_quantization(hf_config: dict | None) -> CheckpointQuantization | None:
    """The bitsandbytes settings in a config.json dict, or None for a dense checkpoint."""
    q = (hf_config or {}).get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = q.get("quant_method", "bitsandbytes")
    four = q.get("load_in_4bit") or q.get("_load_in_4bit")
    eight = q.get("load_in_8bit") or q.get("_load_in_8bit")
    if method != "bitsandbytes" or not (four or eight):
        raise ModelError(
            f"the checkpoint's config.json has a quantization_config of quant_method={method!r} "
            f"(load_in_4bit={bool(four)}, load_in_8bit={bool(eight)}); only bitsandbytes 4-bit (nf4/fp4) "
            "and 8-bit checkpoints can be trained here: use the dense checkpoint"
        )
    if eight:
        return CheckpointQuantization("int8", False, "float32", "uint8")
    return CheckpointQuantization(
        str(q.get("bnb_4bit_quant_type", "fp4")),
        bool(q.get("bnb_4bit_use_double_quant")),
        _dtype_name(q.get("bnb_4bit_compute_dtype"), "float32"),
        _dtype_name(q.get("bnb_4bit_quant_storage"), "uint8"),
    )


def local_config_json(cfg: Config) -> dict | None:
    """config.json of the job's pretrained model without any download: a local directory (the built-in model is
    dense) or a hub id already in the Hugging Face cache. None when it cannot be read here yet."""
    name = cfg.model.name_or_path
    if name.startswith("builtin:") or (cfg.model.config is not None):
        return None
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json", revision=cfg.model.revision)
        except Exception:  # not a hub id (or no cache): the loader reports it later
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # check_remote_code / the loader name the broken file
    return data if isinstance(data, dict) else None


def reconcile(cfg: Config, found: CheckpointQuantization | None) -> tuple[object, str | None]:
    """(the job config to run, a one-line report for the log or None for a dense checkpoint). A copy carries the
    checkpoint's settings when quantization.mode=none; a contradicting section raises a ConfigError naming both."""
    if found is None:
        return cfg, None
    name = cfg.model.name_or_path
    q = cfg.quantization
    if q.mode == "none":
        cfg = copy.deepcopy(cfg)
        for key, value in found.settings().items():
            setattr(cfg.quantization, key, value)
        keys = ", ".join(f"quantization.{k}={_fmt(v)}" for k, v in found.settings().items())
        return cfg, (
            f"[dora_dist] model {name} is a pre-quantized bitsandbytes checkpoint: training its 4-bit base "
            f"with the checkpoint's settings ({keys})"
        )
    clashes = [
        f"quantization.{key}={_fmt(getattr(q, key))} vs the checkpoint's {CHECKPOINT_KEYS[key]}={_fmt(value)}"
        for key, value in found.settings().items()
        if key in COMPARED and getattr(q, key) != value
    ]
    if clashes:
        raise ConfigError(
            f"model.name_or_path={name} is a pre-quantized bitsandbytes checkpoint ({found.describe()}) "
            f"and the job's quantization section contradicts it: {'; '.join(clashes)}. Remove the "
            "quantization section (the checkpoint's settings are then used) or make it match"
        )
    return cfg, (
        f"[dora_dist] model {name} is a pre-quantized bitsandbytes checkpoint ({found.describe()}): its "
        "stored 4-bit weights are trained as saved"
    )


def adopt_checkpoint_quantization(cfg: Config) -> tuple[object, str | None]:
    """`reconcile` with the checkpoint's config.json as far as it can be read without a download."""
    return reconcile(cfg, checkpoint_quantization(local_config_json(cfg)))


def check_loaded_config(cfg: Config, hf_config) -> None:
    """At load time, with the config transformers resolved (a hub id may not have been cached at preflight): the
    job must already carry the checkpoint's settings, else a 4-bit base would be taken for a dense one."""
    data = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    found = checkpoint_quantization(data)
    if found is None:
        return
    if cfg.quantization.mode == "none":
        raise ConfigError(
            f"model.name_or_path={cfg.model.name_or_path} is a pre-quantized bitsandbytes checkpoint "
            f"({found.describe()}) but the job has quantization.mode=none: set quantization.mode="
            f"{found.mode} (and the matching settings), or train the dense checkpoint"
        )
    reconcile(cfg, found)


# ------------------------------------------------------------------------------------------------------------
# FSDP2: stream the stored packed rows of one weight into this rank's Sharded4bitTensor
# ------------------------------------------------------------------------------------------------------------
def quant_state_keys(weight_key: str, keys) -> list[str]:
    """The checkpoint keys holding the quantization state of `weight_key` (empty for a dense weight)."""
    prefix = weight_key + "."
    return [k for k in keys if k.startswith(prefix) and k[len(prefix) :] in QUANT_STATE_SUFFIXES]


def load_quant_state(weight_key: str, tensors: dict[str, torch.Tensor]):
    """bitsandbytes' QuantState from the saved entries (`tensors`: full key -> tensor)."""
    from bitsandbytes.functional import QuantState

    prefix = len(weight_key) + 1
    return QuantState.from_dict({k[prefix:]: v for k, v in tensors.items()}, device=torch.device("cpu"))


@torch.no_grad()
def read_packed_rows(sl, quant_state, rows: tuple[int, int], dtype: torch.dtype, meta, key: str):
    """This rank's rows [r0, r1) of a stored packed 4-bit weight as a Sharded4bitTensor, bytes unchanged.

    `sl` is the safetensors slice of the packed weight ((n/2, 1) uint8, or the same bytes viewed as the checkpoint's
    quant_storage dtype); only the bytes of the kept rows are read."""
    from dora_dist.quant.sharded4bit import Sharded4bitTensor

    out_f, in_f = (int(s) for s in quant_state.shape)
    if (quant_state.quant_type, int(quant_state.blocksize), quant_state.nested) != (
        meta.quant_type,
        meta.blocksize,
        meta.nested,
    ):
        raise ModelError(
            f"{key}: stored as {quant_state.quant_type} blocksize={quant_state.blocksize} "
            f"double_quant={quant_state.nested}, but the model was built for {meta.quant_type} "
            f"blocksize={meta.blocksize} double_quant={meta.nested}"
        )
    r0, r1 = rows
    first, last = r0 * in_f // 2, r1 * in_f // 2  # byte range of the kept rows in the flat packed array
    probe = sl[0:1]
    item = probe.element_size()
    per_row = probe.numel()  # stored as (elements, 1) (or flat)
    a, b = first // (item * per_row), -(-last // (item * per_row))
    raw = sl[a:b].contiguous().reshape(-1).view(torch.uint8)
    packed = raw[first - a * item * per_row : last - a * item * per_row]
    if packed.numel() != last - first:
        raise ModelError(f"{key}: the stored packed weight holds fewer bytes than its shape {out_f}x{in_f} needs")
    return Sharded4bitTensor.from_bnb(packed, quant_state, dtype, rows=(r0, r1))
