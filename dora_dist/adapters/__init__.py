"""Adapters: which modules get DoRA, how they are saved in PEFT's format, and how they are merged back."""

from dora_dist.adapters.config import DoRAConfig
from dora_dist.adapters.inject import (
    apply_dora,
    dora_layers,
    find_target_modules,
    init_magnitudes,
    merge_and_unload,
    set_merged,
)
from dora_dist.adapters.peft_format import adapter_state_dict, load_adapter, read_adapter, save_adapter

__all__ = [
    "DoRAConfig",
    "apply_dora",
    "dora_layers",
    "find_target_modules",
    "init_magnitudes",
    "merge_and_unload",
    "set_merged",
    "adapter_state_dict",
    "load_adapter",
    "read_adapter",
    "save_adapter",
]
