"""dora_dist: DoRA / QDoRA fine-tuning on one GPU, many GPUs and many nodes."""

import dora_dist.preflight  # noqa: F401  (registers the config rules that read the engine registry and the loggers)
import dora_dist.quant  # noqa: F401  (registers the quantized weight sources before any layer is built)
from dora_dist.adapters import (
    DoRAConfig,
    adapter_state_dict,
    apply_dora,
    dora_layers,
    init_magnitudes,
    load_adapter,
    merge_and_unload,
    save_adapter,
)
from dora_dist.nn import DoRALinear

__version__ = "0.1.0"
__all__ = [
    "DoRAConfig",
    "DoRALinear",
    "apply_dora",
    "dora_layers",
    "init_magnitudes",
    "merge_and_unload",
    "save_adapter",
    "load_adapter",
    "adapter_state_dict",
    "__version__",
]
