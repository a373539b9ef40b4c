"""Weight-decomposition analysis: how fine-tuning changes the magnitude and direction of each weight row."""

from dora_dist.analysis.decompose import (
    LayerChange,
    SafetensorsCheckpoint,
    TunedAdapter,
    TunedCheckpoint,
    dense_source,
    layer_change,
    row_change,
)
from dora_dist.analysis.report import analyze, correlations, open_tuned

__all__ = [
    "LayerChange",
    "SafetensorsCheckpoint",
    "TunedAdapter",
    "TunedCheckpoint",
    "dense_source",
    "layer_change",
    "row_change",
    "analyze",
    "correlations",
    "open_tuned",
]
