"""The adapter a run hands over: PEFT files, tokenizer and training config in one directory. One function for the
final adapter (<output.dir>/adapter) and the best one (<output.dir>/adapter_best), so the two cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dora_dist.config import Config
    from dora_dist.dist_env import DistEnv
    from dora_dist.parallel.base import Engine


def export_adapter(
    out: Path,
    engine: Engine,
    env: DistEnv,
    cfg: Config,
    tokenizer: Any,
    eval_record: dict[str, Any] | None = None,
) -> Path:
    """Write `out`/: the adapter in PEFT's format (each file written atomically by save_adapter), the tokenizer,
    training_config.yaml (read by `dora-dist generate` for a 4-bit base) and, when given, eval.json (which eval made
    this the best adapter). COLLECTIVE: every rank calls it (the engine gathers the adapter); rank 0 writes."""
    from dora_dist import models
    from dora_dist.adapters import save_adapter

    state = engine.adapter_state_dict()  # all ranks take part; full tensors on rank 0
    if env.is_main:
        save_adapter(engine.unwrap(), out, state_dict=state, base_model_name_or_path=models.adapter_base_name(cfg, env))
        tokenizer.save_pretrained(out)
        cfg.save(out / "training_config.yaml")
        if eval_record is not None:
            (out / "eval.json").write_text(json.dumps(eval_record) + "\n")
    return out
