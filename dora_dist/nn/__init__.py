"""DoRA layers and the weight sources they read their frozen base through (no torch.distributed here)."""

from dora_dist.nn.dora_linear import DoRALinear, dora_output, safe_divide_norm
from dora_dist.nn.weight_source import Conv1DWeight, DenseWeight, WeightSource, weight_source_for

__all__ = [
    "DoRALinear",
    "dora_output",
    "safe_divide_norm",
    "Conv1DWeight",
    "DenseWeight",
    "WeightSource",
    "weight_source_for",
]
