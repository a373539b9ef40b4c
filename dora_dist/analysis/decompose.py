"""Magnitude and direction change of a fine-tuned weight against its base, one layer at a time (DoRA paper §2.2).

For base rows W_i and tuned rows W'_i (output-row convention: row i of the (out, in) weight)

    ΔM = mean_i |‖W'_i‖ − ‖W_i‖|        ΔD = mean_i (1 − cos(W'_i, W_i))

Both are sums over rows, so a layer is visited in row chunks of its weight source: a 4-bit base is dequantized a
chunk at a time, and an adapter's W' rows are built from the same chunk with the layer's own merge logic
(DoRALinear.merged_rows), so the analysis sees exactly the weights the model computes with. Only one layer of
the base and one of the tuned model are in memory at any time.

Precision: chunks are fp32 (float64 for a float64 base) and W' rows are formed there, never rounded to a 16-bit
compute dtype, so a bf16 run's |Δm|/m of 1e-4 shows up as it is (the trained model applies it through an fp32
scale too: nn/dora_epilogue.py). A merged 16-bit checkpoint (TunedCheckpoint) is read as stored: what its rounding
dropped is not there to measure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dora_dist.nn.dora_linear import DoRALinear
from dora_dist.nn.weight_source import WeightSource, weight_source_for

#: leaf names of transformers Conv1D layers (GPT-2 family), stored (in, out)
CONV1D_LEAVES = {"c_attn", "c_proj", "c_fc", "q_attn"}
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}

RowsFn = Callable[[torch.Tensor, int, int], torch.Tensor]


@dataclass
class LayerChange:
    """ΔM and ΔD of one layer of one checkpoint, with the mean base row norm for scale."""

    layer: str
    delta_m: float
    delta_d: float
    base_norm: float
    rows: int


@torch.no_grad()
def layer_change(layer: str, base: WeightSource, tuned_rows: RowsFn) -> LayerChange:
    """ΔM, ΔD over the rows of `base`; tuned_rows(base_chunk, start, stop) gives W'[start:stop].

    Accumulated in float64 so a pure rescale gives ΔD = 0 and a pure rotation ΔM = 0 to rounding of the inputs.
    A zero row has no direction: cos is taken as 1 when both rows are zero and 0 when only one is.
    """
    sum_m = sum_d = sum_n = 0.0
    rows = 0
    for start, chunk in base.iter_row_chunks():
        stop = start + chunk.shape[0]
        w = chunk.double()
        t = tuned_rows(chunk, start, stop).double()
        n0, n1 = w.norm(dim=1), t.norm(dim=1)
        # 1 − cos(u, v) = ‖u − v‖²/2 for unit rows: no cancellation for small angles, exactly 0 for equal rows
        u = w / torch.where(n0 > 0, n0, 1.0)[:, None]
        v = t / torch.where(n1 > 0, n1, 1.0)[:, None]
        one_minus_cos = 0.5 * (u - v).pow(2).sum(dim=1)
        one_minus_cos = torch.where((n0 > 0) != (n1 > 0), 1.0, one_minus_cos)  # one zero row: cos = 0
        sum_m += float((n1 - n0).abs().sum())
        sum_d += float(one_minus_cos.sum())
        sum_n += float(n0.sum())
        rows += w.shape[0]
    return LayerChange(layer, sum_m / rows, sum_d / rows, sum_n / rows, rows)


def row_change(base: torch.Tensor, tuned: torch.Tensor) -> tuple[float, float]:
    """(ΔM, ΔD) of two dense (out, in) weights; the reference the chunked path is tested against."""
    change = layer_change("w", dense_source(base), lambda _c, i, j: tuned[i:j])
    return change.delta_m, change.delta_d


# --- base modules from tensors --------------------------------------------------------------------------
def dense_source(
    weight: torch.Tensor, conv1d: bool = False, quant: str | None = None, compute_dtype: torch.dtype = torch.float32
) -> WeightSource:
    """A weight source over one checkpoint tensor: nn.Linear (out, in), Conv1D (in, out) or a 4-bit Linear4bit
    quantized from it (quant="nf4"/"fp4", as a QDoRA run quantized its base)."""
    return weight_source_for(base_module(weight, conv1d, quant, compute_dtype))


def base_module(
    weight: torch.Tensor, conv1d: bool = False, quant: str | None = None, compute_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A bias-free base layer holding `weight` (no copy for dense bases)."""
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        mod = Conv1D(weight.shape[1], weight.shape[0])
        mod.weight = nn.Parameter(weight, requires_grad=False)
        mod.bias = None
        return mod
    if quant is None:
        mod = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        mod.weight = nn.Parameter(weight, requires_grad=False)
        return mod
    if quant not in ("nf4", "fp4"):
        raise ValueError(f"base quantization must be nf4 or fp4, got {quant!r}")
    import bitsandbytes as bnb

    mod = bnb.nn.Linear4bit(
        weight.shape[1], weight.shape[0], bias=False, compute_dtype=compute_dtype, quant_type=quant, device="meta"
    )
    param = bnb.nn.Params4bit(weight.detach().to(torch.float32).cpu(), requires_grad=False, quant_type=quant)
    mod.weight = param._quantize("cpu") if hasattr(param, "_quantize") else param.to("cpu")
    return mod


# --- checkpoints read one tensor at a time ------------------------------------------------------------------
class SafetensorsCheckpoint:
    """The 2-D weights of a model directory (model.safetensors or a sharded index), read lazily with safe_open."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.directory} has no *.safetensors files")
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self.keys: dict[str, Path] = {k: f for f, h in self._handles.items() for k in h.keys()}
        cfg_file = self.directory / "config.json"
        self.model_type = json.loads(cfg_file.read_text()).get("model_type") if cfg_file.is_file() else None

    def matrices(self) -> list[str]:
        """Module names (without '.weight') of every 2-D weight: linear layers, embeddings, heads."""
        out = []
        for key, f in self.keys.items():
            if key.endswith(".weight") and len(self._handles[f].get_slice(key).get_shape()) == 2:
                out.append(key[: -len(".weight")])
        return sorted(out)

    def resolve(self, module: str) -> str | None:
        """The checkpoint key of `module`'s weight; tolerates a model prefix present on one side only."""
        key = module + ".weight"
        if key in self.keys:
            return key
        hits = [k for k in self.keys if k.endswith("." + key) or key.endswith("." + k)]
        return hits[0] if len(hits) == 1 else None

    def tensor(self, key: str) -> torch.Tensor:
        return self._handles[self.keys[key]].get_tensor(key)

    def is_conv1d(self, module: str) -> bool:
        return self.model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_LEAVES

    def source(self, module: str, quant: str | None = None) -> WeightSource:
        key = self.resolve(module)
        if key is None:
            raise KeyError(f"{self.directory} has no weight for {module!r}")
        return dense_source(self.tensor(key), self.is_conv1d(module), quant)


# --- tuned checkpoints ------------------------------------------------------------------------------------
class Tuned:
    """One fine-tuned checkpoint: which layers changed and their rows W'[start:stop]."""

    method: str
    label: str

    def layers(self, base: SafetensorsCheckpoint | None) -> list[str]:
        raise NotImplementedError

    def rows_fn(self, layer: str, base_source: WeightSource) -> RowsFn:
        raise NotImplementedError


class TunedCheckpoint(Tuned):
    """A merged model or a full fine-tune: every 2-D weight it shares with the base."""

    def __init__(self, directory: str | Path, method: str = "full", label: str | None = None):
        self.ckpt = SafetensorsCheckpoint(directory)
        self.method, self.label = method, label or Path(directory).name

    def layers(self, base: SafetensorsCheckpoint | None) -> list[str]:
        mats = self.ckpt.matrices()
        return [m for m in mats if base is None or base.resolve(m) is not None]

    def rows_fn(self, layer: str, base_source: WeightSource) -> RowsFn:
        tuned = self.ckpt.source(layer)
        if (tuned.out_features, tuned.in_features) != (base_source.out_features, base_source.in_features):
            raise ValueError(f"{layer}: tuned shape {(tuned.out_features, tuned.in_features)} differs from the base")
        return lambda _chunk, start, stop: tuned.row_chunk(start, stop)


class TunedAdapter(Tuned):
    """A PEFT-format LoRA/DoRA adapter (ours or peft's): W' built per row chunk by DoRALinear's merge logic."""

    def __init__(self, directory: str | Path, method: str | None = None, label: str | None = None):
        from dora_dist.adapters.peft_format import PREFIX, SUFFIXES, read_adapter

        self.cfg, tensors = read_adapter(directory, allow_lora=True)
        self.method = method or ("dora" if self.cfg.use_dora else "lora")
        self.label = label or Path(directory).name
        self.parts: dict[str, dict[str, torch.Tensor]] = {}
        self.full: dict[str, torch.Tensor] = {}  # 2-D weights of modules_to_save, replaced in full
        for key, tensor in tensors.items():
            body = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            for suffix, attr in SUFFIXES.items():
                if body.endswith("." + suffix):
                    self.parts.setdefault(body[: -len(suffix) - 1], {})[attr] = tensor
                    break
            else:
                if body.endswith(".weight") and tensor.dim() == 2:
                    self.full[body[: -len(".weight")]] = tensor

    def layers(self, base: SafetensorsCheckpoint | None) -> list[str]:
        return sorted(self.parts) + sorted(self.full)

    def rows_fn(self, layer: str, base_source: WeightSource) -> RowsFn:
        if layer in self.full:
            full = self.full[layer]
            return lambda _chunk, start, stop: full[start:stop]
        return adapter_rows(
            base_source.module, self.parts[layer], self.cfg.r, self.cfg.alpha, self.cfg.use_rslora, self.cfg.use_dora
        )


@torch.no_grad()
def adapter_rows(
    base: nn.Module, parts: dict[str, torch.Tensor], r: int, alpha: float, use_rslora: bool, use_dora: bool
) -> RowsFn:
    """W'[start:stop] = m ⊙ (W + sBA)/‖W + sBA‖ (or W + sBA for LoRA) from the base's own row chunk."""
    layer = DoRALinear(base, r=r, alpha=alpha, use_rslora=use_rslora, use_dora=use_dora, init_magnitude=False)
    layer.lora_A.copy_(parts["lora_A"])
    layer.lora_B.copy_(parts["lora_B"])
    if use_dora:
        layer.magnitude.copy_(parts["magnitude"])
    scale = layer.merged_scale()  # m / ‖W + sBA‖ per row, itself computed over row chunks
    return lambda chunk, start, stop: layer.merged_rows(chunk, start, stop, scale)
