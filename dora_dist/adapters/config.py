"""DoRAConfig: what to adapt and how. The one adapter-settings dataclass: the library's (apply_dora) and the job
config's `dora:` section (dora_dist/config.py). Validated once, on construction; convertible to and from PEFT's
LoraConfig JSON.

A new adapter option is one field here (its `#:` comment is what `dora-dist keys` prints; `metadata=IDENTITY`
when a checkpoint may only continue under the same value) plus its use.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from dora_dist.errors import AdapterError, SettingError
from dora_dist.nn.dora_linear import check_layer_settings

#: field metadata of a setting that defines a run: a checkpoint or a finished run only continues under the same
#: value (dora_dist.config.identity_keys reads it, dora_dist.run_state compares the values)
IDENTITY: dict[str, Any] = {"identity": True}

AdapterDtype = Literal["float32", "bfloat16", "float16", "float64"]
ADAPTER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_OWNER = "DoRAConfig."


@dataclass
class DoRAConfig:
    """Adapter hyper-parameters (the job config's `dora:` section is this class: `dora.r` is DoRAConfig.r).

    target_modules: a list of module-name suffixes (peft semantics: "q_proj" matches "...self_attn.q_proj"),
    a single regular expression matched against the full module name, or "all-linear" (every supported linear
    layer except the output head).
    """

    #: adapter rank (the inner size of B·A)
    r: int = field(default=8, metadata=IDENTITY)
    #: scaling numerator: the low-rank update is scaled by alpha/r (alpha/√r with use_rslora)
    alpha: float = field(default=16.0, metadata=IDENTITY)
    #: dropout on the adapter's input (0: none)
    dropout: float = 0.0
    #: "all-linear" (every linear layer except the output head) or a list of module-name suffixes (in a job config a
    #: single name is a one-item list; the library reads a single string as a regex over full module names)
    target_modules: str | list[str] = field(default="all-linear", metadata=IDENTITY)
    #: rank-stabilised scaling alpha/√r instead of alpha/r
    use_rslora: bool = field(default=False, metadata=IDENTITY)
    #: False gives plain LoRA through the same layer (for comparisons)
    use_dora: bool = field(default=True, metadata=IDENTITY)
    #: dtype of the trainable A, B and magnitude (float32 keeps AdamW exact with a bf16 base; a job refuses float16)
    adapter_dtype: AdapterDtype = field(default="float32", metadata=IDENTITY)
    #: modules trained in full beside the adapters (e.g. [lm_head]); saved in the adapter under peft's keys; names
    #: match like target_modules ("classifier" matches "...classifier")
    modules_to_save: list[str] | None = field(default=None, metadata=IDENTITY)

    def __post_init__(self) -> None:
        """The one validation of adapter settings; a SettingError names the field (the job config's loader reports
        it as `dora.<field>`)."""
        check_layer_settings(self.r, self.alpha, self.dropout, _OWNER)
        tm: Any = self.target_modules
        if isinstance(tm, (list, tuple)):
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise SettingError("target_modules", f"must be a non-empty list of names, got {tm!r}", _OWNER)
            self.target_modules = list(tm)
        elif not isinstance(tm, str) or not tm:
            raise SettingError(
                "target_modules", f"must be a list of names, a regex or 'all-linear', got {tm!r}", _OWNER
            )
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise SettingError(
                "adapter_dtype", f"must be one of {sorted(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}", _OWNER
            )
        saved: Any = self.modules_to_save
        if saved is not None:
            if (
                isinstance(saved, str)
                or not hasattr(saved, "__iter__")
                or not all(isinstance(m, str) and m for m in saved)
            ):
                raise SettingError("modules_to_save", f"must be a list of module names, got {saved!r}", _OWNER)
            self.modules_to_save = list(saved) or None

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
