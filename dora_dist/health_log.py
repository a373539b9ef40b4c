"""The trainer's side of DoRA's health (dora_dist/health.py): when to measure, the one-time warning, the summary.

All ranks call `HealthMonitor.measure` on the same steps (it is collective); rank 0 logs the record, prints the
warning and keeps the final values for summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dora_dist.health import GROUPS, LayerHealth, group_record, measure

if TYPE_CHECKING:
    from dora_dist.config import Config
    from dora_dist.dist_env import DistEnv

GROUP_NAMES = {"attn": "attention", "mlp": "mlp", "other": "other"}


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype the DoRA epilogue runs in: bf16 under training.precision=bf16 (the base in bf16, or FSDP2's bf16
    parameters), else fp32 (a 4-bit base's fp32 compute dtype included)."""
    return torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32


def warning_text(step: int, rec: dict, min_change: float, min_share: float) -> str | None:
    """The one-line warning for a record, or None when the magnitudes moved and every share is high enough."""
    problems, causes = [], []
    moved = rec.get("dora_dm_rel_max")
    if moved is not None and moved < min_change:
        problems.append(
            f"the magnitudes have not moved (max |m - m0|/m0 = {moved:.2e} < {min_change:g} in every layer)"
        )
        causes += [
            "the magnitude is frozen (requires_grad off, or left out of the optimizer)",
            "the learning rate is too small for it",
            "weight decay on it",
        ]
    low = {
        g: rec[f"dora_share_{g}"]
        for g in GROUPS
        if rec.get(f"dora_share_{g}") is not None and rec[f"dora_share_{g}"] < min_share
    }
    if low:
        shares = ", ".join(f"{GROUP_NAMES[g]} {v:.2f}" for g, v in low.items())
        problems.append(f"the magnitude's effective share of the output is low ({shares} < {min_share:g})")
        causes.append("16-bit rounding of m/||W'|| in the forward (training.precision=bf16)")
    if not problems:
        return None
    return (
        f"[dora_dist] warning: DoRA looks like LoRA after {step} steps: {'; '.join(problems)}. Likely causes: "
        f"{'; '.join(dict.fromkeys(causes))}. See output.dora_health_* in the README."
    )


@dataclass
class HealthMonitor:
    """Measures every `every` steps (and at the run's last step), warns once after `warn_after` steps."""

    enabled: bool
    every: int
    warn_after: int
    min_change: float
    min_share: float
    dtype: torch.dtype
    warned: str | None = None
    last: dict = field(default_factory=dict)
    last_step: int = -1
    layers: list[LayerHealth] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: Config) -> HealthMonitor:
        out = cfg.output
        return cls(
            enabled=bool(out.dora_health and cfg.dora.use_dora),
            every=out.dora_health_every or cfg.training.log_every,
            warn_after=out.dora_health_warn_after,
            min_change=out.dora_health_min_change,
            min_share=out.dora_health_min_share,
            dtype=compute_dtype(cfg),
        )

    def due(self, step: int, last_step: int) -> bool:
        """The same answer on every rank (a function of the step only)."""
        return self.enabled and (step % self.every == 0 or step == last_step)

    def measure(self, engine, env: DistEnv, step: int) -> dict:
        """COLLECTIVE: the record's health keys (health.group_record)."""
        self.layers = measure(engine, env, self.dtype)
        self.last, self.last_step = group_record(self.layers), step
        return dict(self.last)

    def check(self, step: int, rec: dict) -> str | None:
        """The warning, once, from `warn_after` steps on; None when not due, already given, or all is well."""
        if self.warned is not None or not self.warn_after or step < self.warn_after:
            return None
        text = warning_text(step, rec, self.min_change, self.min_share)
        if text is not None:
            self.warned = text
        return text

    def summary(self) -> dict | None:
        """summary.json's "dora_health": the last measured values per layer group, and the warning if one was given."""
        if not self.last:
            return None
        groups = {}
        for g in GROUPS:
            if f"dora_dm_{g}" in self.last:
                groups[GROUP_NAMES[g]] = {
                    "delta_m": self.last[f"dora_dm_{g}"],
                    "delta_d": self.last[f"dora_dd_{g}"],
                    "delta_m_rel": self.last[f"dora_dm_rel_{g}"],
                    "effective_share": self.last[f"dora_share_{g}"],
                }
        return {
            "step": self.last_step,
            "groups": groups,
            "max_delta_m_rel": self.last.get("dora_dm_rel_max"),
            "warning": self.warned,
        }


def format_health(rec: dict) -> str:
    """A short suffix for the console line: ΔM/m and ΔD of attention and MLP."""
    parts = []
    for g in ("attn", "mlp"):
        if f"dora_dm_rel_{g}" in rec:
            share = rec.get(f"dora_share_{g}")
            parts.append(
                f"{g} dM/m {rec[f'dora_dm_rel_{g}']:.2e} dD {rec[f'dora_dd_{g}']:.2e}"
                + (f" share {share:.2f}" if share is not None else "")
            )
    return ("  " + "  ".join(parts)) if parts else ""
