"""Experiment trackers (`output.loggers`): jsonl (metrics.jsonl, the default), tensorboard, wandb.

Rank 0 writes; the other ranks get a logger that does nothing. Every tracker receives the same records the
trainer writes to metrics.jsonl (the per-step scalars of the log line, and the eval records {"step", "eval_loss",
"eval_ppl", ...}) and the resolved config as hyper-parameters. The optional packages are imported only when
chosen; a missing one is a ConfigError naming the extra to install — raised on every rank, before the first step,
so no rank is left waiting in a collective.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dora_dist.errors import ConfigError
from dora_dist.metrics import MetricsLogger

if TYPE_CHECKING:
    from dora_dist.config import Config

LOGGER_CHOICES = ("jsonl", "tensorboard", "wandb")
#: logger -> (module that must import, pip extra)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_loggers(names: list[str]) -> None:
    """Unknown names and missing packages, as ConfigErrors (cheap: no import)."""
    for name in names:
        if name not in LOGGER_CHOICES:
            raise ConfigError(f"output.loggers: unknown logger {name!r}; choose from {', '.join(LOGGER_CHOICES)}")
        if name in _PACKAGES:
            module, extra = _PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"output.loggers includes {name!r} but the {module!r} package is not installed: "
                    f"pip install 'dora_dist[{extra}]' (or pip install {module})"
                )


def _scalars(record: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _tag(key: str) -> str:
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def flat_config(cfg_dict: dict, prefix: str = "") -> dict[str, Any]:
    """{"training.lr": 5e-3, ...}: scalars kept, lists and None as strings (hparams take scalars only)."""
    out: dict[str, Any] = {}
    for key, value in cfg_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class TensorBoardLogger:
    def __init__(self, out_dir: Path, cfg: Config):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        flat = flat_config(cfg.to_dict())
        self.writer.add_text("config", "```yaml\n" + cfg.to_yaml() + "\n```", 0)
        for summary in hparams(flat, {}):  # the hparams plugin, in this run's own file
            self.writer.file_writer.add_summary(summary)

    def log(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(_tag(key), value, record["step"])

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbLogger:
    def __init__(self, out_dir: Path, cfg: Config):
        import wandb

        out = cfg.output
        self.run = wandb.init(
            project=out.wandb_project,
            name=out.wandb_run_name or Path(out.dir).name,
            dir=str(out_dir),
            mode=out.wandb_mode,
            config=cfg.to_dict(),
            reinit="finish_previous",
        )

    def log(self, record: dict) -> None:
        self.run.log({_tag(k): v for k, v in _scalars(record).items()}, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class RunLoggers:
    """The trainer's one logger: metrics.jsonl (when chosen) plus the trackers, on rank 0."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, record: dict) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            close = getattr(logger, "close", None)
            if close is not None:
                close()


def make_loggers(cfg: Config, out_dir: str | Path, is_main: bool, resume_step: int = 0) -> RunLoggers:
    """All ranks call; rank 0 gets the real loggers. The names and packages were checked by preflight
    (check_loggers), before any model work."""
    names = list(cfg.output.loggers)
    out_dir = Path(out_dir)
    if not is_main:
        return RunLoggers([])
    loggers: list = []
    if "jsonl" in names:
        loggers.append(MetricsLogger(out_dir, True, resume_step=resume_step))
    if "tensorboard" in names:
        loggers.append(TensorBoardLogger(out_dir, cfg))
    if "wandb" in names:
        loggers.append(WandbLogger(out_dir, cfg))
    return RunLoggers(loggers)
