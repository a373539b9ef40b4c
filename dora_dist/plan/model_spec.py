"""The job's parameters as a table (name, shape, role, block, trainable), from a Config with no weights loaded.

The model is built on the meta device from its transformers config (known hub models use the architectures
embedded in dora_dist/models/architectures, so nothing is downloaded) and DoRA is applied exactly as the trainer
applies it, so the table holds the same parameters, in the same order and shapes, as a real run. The projection
(comm.py, memory.py) works only from this table and the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dora_dist.config import Config


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    role: str  # "linear" (a DoRA-wrapped base weight), "base" (other frozen), "lora_A", "lora_B", "magnitude"
    block: int  # decoder block index, or -1 for the root (embeddings, final norm, head)
    trainable: bool

    @property
    def numel(self) -> int:
        return prod(self.shape) if self.shape else 1


@dataclass
class ModelSpec:
    params: list[ParamSpec]
    n_blocks: int
    hidden: int
    intermediate: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied: bool = False
    extra: dict = field(default_factory=dict)

    def select(
        self, *, trainable: bool | None = None, roles: tuple[str, ...] | None = None, block: int | None = None
    ) -> list[ParamSpec]:
        out = self.params
        if trainable is not None:
            out = [p for p in out if p.trainable == trainable]
        if roles is not None:
            out = [p for p in out if p.role in roles]
        if block is not None:
            out = [p for p in out if p.block == block]
        return out

    def numel(self, **kw) -> int:
        return sum(p.numel for p in self.select(**kw))

    @property
    def units(self) -> list[int]:
        """FSDP2 units in forward order: the root (-1) holds what is outside the blocks."""
        return [-1] + list(range(self.n_blocks))


def _block_index(name: str) -> int:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks", "layer") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return -1


def _role(name: str, trainable: bool) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("lora_A", "lora_B", "magnitude"):
        return leaf
    return "linear" if ".base_layer." in name else "base"


def model_spec(cfg: Config) -> ModelSpec:
    """The parameter table of the job `cfg` describes (meta build + apply_dora; cached per architecture)."""
    from dora_dist import models

    hf = models.model_config(cfg)
    d = cfg.dora
    key = (hf.to_json_string(), str(d.target_modules), d.r, d.use_dora)
    return _spec_cached(key, hf, cfg)


_CACHE: dict = {}


def _spec_cached(key, hf, cfg: Config) -> ModelSpec:
    if key in _CACHE:
        return _CACHE[key]
    from dora_dist import models

    model = models.build_on_meta(hf)
    models.add_adapters(model, cfg)
    params = []
    for name, p in model.named_parameters():
        params.append(
            ParamSpec(name, tuple(p.shape), _role(name, p.requires_grad), _block_index(name), bool(p.requires_grad))
        )
    n_blocks = 1 + max((p.block for p in params), default=-1)
    heads = int(getattr(hf, "num_attention_heads", 1))
    hidden = int(getattr(hf, "hidden_size", 0))
    spec = ModelSpec(
        params=params,
        n_blocks=n_blocks,
        hidden=hidden,
        intermediate=int(getattr(hf, "intermediate_size", 4 * hidden) or 4 * hidden),
        vocab=int(getattr(hf, "vocab_size", 0)),
        n_heads=heads,
        n_kv_heads=int(getattr(hf, "num_key_value_heads", heads) or heads),
        head_dim=int(getattr(hf, "head_dim", None) or hidden // max(1, heads)),
        tied=bool(getattr(hf, "tie_word_embeddings", False)),
    )
    del model
    _CACHE[key] = spec
    return spec


def dtype_bytes(name: str) -> int:
    return {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2}[name]


def base_dtype_bytes(cfg: Config) -> int:
    """Bytes per element of the frozen dense base (model.dtype, auto: bf16 under training.precision=bf16)."""
    from dora_dist.models import base_dtype

    return torch.tensor([], dtype=base_dtype(cfg)).element_size()
