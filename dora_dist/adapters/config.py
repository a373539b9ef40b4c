"""DoRAConfig: what to adapt and how, validated on construction, convertible to and from PEFT's LoraConfig JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dora_dist.errors import AdapterError
from dora_dist.nn.dora_linear import check_layer_settings

ADAPTER_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def check_adapter_settings(r, alpha, dropout, target_modules, adapter_dtype, prefix: str = "") -> None:
    """Validate adapter settings wherever they come from (this DoRAConfig, the job config's `dora:` section), raising
    ValueError naming the setting as `prefix + name`."""
    check_layer_settings(r, alpha, dropout, prefix)
    if isinstance(target_modules, (list, tuple)):
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"{prefix}target_modules must be a non-empty list of names, got {target_modules!r}")
    elif not isinstance(target_modules, str) or not target_modules:
        raise ValueError(
            f"{prefix}target_modules must be a list of names, a regex or 'all-linear', got {target_modules!r}"
        )
    if adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(f"{prefix}adapter_dtype must be one of {sorted(ADAPTER_DTYPES)}, got {adapter_dtype!r}")


def check_modules_to_save(modules_to_save, prefix: str = "") -> None:
    """None, or a list of module names trained in full beside the adapters."""
    if modules_to_save is None:
        return
    if isinstance(modules_to_save, str) or not all(isinstance(m, str) and m for m in modules_to_save):
        raise ValueError(f"{prefix}modules_to_save must be a list of module names, got {modules_to_save!r}")


@dataclass
class DoRAConfig:
    """Adapter hyper-parameters.

    target_modules: a list of module-name suffixes (peft semantics: "q_proj" matches "...self_attn.q_proj"),
    a single regular expression matched against the full module name, or "all-linear" (every supported linear
    layer except the output head).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")
    use_rslora: bool = False
    use_dora: bool = True
    adapter_dtype: str = "float32"
    # modules trained in full next to the adapters (e.g. a new classifier head), saved with the adapter under
    # peft's keys; names match like target_modules ("classifier" matches "...classifier")
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        check_adapter_settings(
            self.r, self.alpha, self.dropout, self.target_modules, self.adapter_dtype, prefix="DoRAConfig."
        )
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        check_modules_to_save(self.modules_to_save, prefix="DoRAConfig.")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save) or None

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def torch_adapter_dtype(self) -> torch.dtype:
        return ADAPTER_DTYPES[self.adapter_dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_peft_dict(
        self,
        target_modules: list[str] | str,
        fan_in_fan_out: bool,
        base_model_name_or_path: str | None,
        task_type: str | None = "CAUSAL_LM",
    ) -> dict[str, Any]:
        """The adapter_config.json that peft's LoraConfig / PeftModel.from_pretrained read: only LoraConfig's own
        keys (an unknown key makes every peft user see an "upgrade peft" warning); our own metadata goes into the
        safetensors header instead."""
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target_modules,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft_dict(
        cls, cfg: dict[str, Any], source: str = "adapter_config.json", allow_lora: bool = False
    ) -> DoRAConfig:
        """Read peft's adapter_config.json, refusing what this layer cannot represent."""
        peft_type = cfg.get("peft_type")
        if peft_type != "LORA":
            raise AdapterError(f"{source}: peft_type is {peft_type!r}; dora_dist loads LoRA/DoRA adapters only")
        if not cfg.get("use_dora", False) and not allow_lora:
            raise AdapterError(
                f"{source}: this is a plain LoRA adapter (use_dora is false), not a DoRA adapter; "
                "pass allow_lora=True to load it as LoRA"
            )
        for key in ("rank_pattern", "alpha_pattern"):
            if cfg.get(key):
                raise AdapterError(f"{source}: per-module {key} is not supported ({cfg[key]!r})")
        if cfg.get("bias", "none") != "none":
            raise AdapterError(f"{source}: bias={cfg['bias']!r} is not supported (only 'none')")
        target = cfg.get("target_modules")
        if target is None:
            raise AdapterError(f"{source}: target_modules is missing")
        return cls(
            r=int(cfg["r"]),
            alpha=float(cfg.get("lora_alpha", 8)),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            target_modules=sorted(target) if isinstance(target, (list, set, tuple)) else target,
            use_rslora=bool(cfg.get("use_rslora", False)),
            use_dora=bool(cfg.get("use_dora", False)),
            modules_to_save=sorted(set(cfg["modules_to_save"])) if cfg.get("modules_to_save") else None,
        )
