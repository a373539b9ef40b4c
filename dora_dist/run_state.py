"""What an output directory already holds, and what a new invocation may do with it.

A run is identified by the keys in `IDENTITY_KEYS` (the config fields marked `metadata=IDENTITY`): the base model,
the adapter, the data and the sampling seed. Checkpoints record them (in their COMPLETE marker) and so does
`<output.dir>/config.yaml`; resuming, or re-running into the same output directory, with other values is refused
with a message naming each changed key, because the result would silently be a mixture of two runs.

A finished run is recognised from `<output.dir>/summary.json` ("finished": true, written atomically at the end of
every run whatever the checkpoint settings): re-running the same job says so and exits 0; raising max_steps (or
epochs) extends it from its final checkpoint; anything else that would retrain into the directory is refused.
Summaries accumulate one "segment" per invocation (engine, world size, steps), so a resumed or extended run never
replaces its record by an emptier one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dora_dist.config import identity_keys
from dora_dist.errors import ConfigError

if TYPE_CHECKING:
    from dora_dist.config import Config

#: dotted config keys that define a run: a checkpoint or a finished run only continues under the same values
IDENTITY_KEYS = identity_keys()
#: keys that only say how long the run is: changing them extends (or shortens) a run
LENGTH_KEYS = ("training.max_steps", "training.epochs")
SUMMARY = "summary.json"


def _get(cfg_dict: dict, dotted: str) -> Any:
    node: Any = cfg_dict
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _values(cfg: Config, keys: tuple[str, ...]) -> dict[str, Any]:
    as_dict = cfg.to_dict()
    return {key: _get(as_dict, key) for key in keys}


def run_identity(cfg: Config) -> dict[str, Any]:
    """{"dora.r": 8, ...}: the values of IDENTITY_KEYS (JSON-serialisable, recorded in every checkpoint)."""
    return _values(cfg, IDENTITY_KEYS)


def identity_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """["dora.r: 8 -> 16", ...] for every identity key whose value differs (keys recorded by an older version and
    absent from `recorded` are not compared)."""
    return [
        f"{key}: {recorded[key]!r} -> {current.get(key)!r}"
        for key in IDENTITY_KEYS
        if key in recorded and _normalise(recorded[key]) != _normalise(current.get(key))
    ]


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples vs lists, as YAML/JSON round trips give them


def write_json_atomic(path: Path, data: dict) -> None:
    """Write then rename: a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def first_logged_loss(out_dir: Path) -> float | None:
    """The loss of step 1 in metrics.jsonl, if it is there."""
    try:
        with (Path(out_dir) / "metrics.jsonl").open() as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return first.get("loss") if isinstance(first, dict) and first.get("step") == 1 else None


def read_summary(out_dir: Path) -> dict | None:
    path = Path(out_dir) / SUMMARY
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def merge_summary(
    previous: dict | None, current: dict, start_step: int, first_logged_loss: float | None = None
) -> dict:
    """The run's summary after this invocation: its segments appended to the earlier ones; the run's first loss
    kept from before when this invocation resumed."""
    segments = list(previous.get("segments", [])) if previous and start_step > 0 else []
    segments.append(
        {key: current.get(key) for key in ("engine", "world_size", "wall_s", "preempted")}
        | {"start_step": start_step, "end_step": current["steps"]}
    )
    merged = dict(current, segments=segments)
    if start_step > 0:  # the run's first loss: from the earlier summary, or from metrics.jsonl after a crash
        merged["first_loss"] = (previous or {}).get("first_loss", first_logged_loss)
    if merged.get("last_loss") is None and previous and start_step > 0:
        merged["last_loss"] = previous.get("last_loss")
    return merged


@dataclass
class PriorRun:
    """A finished run found in output.dir: its summary and the identity of the config it ran with."""

    out_dir: Path
    summary: dict
    identity: dict | None
    config: dict | None = None  # the config.yaml it ran with, resolved (None: unreadable)

    @property
    def steps(self) -> int:
        return int(self.summary.get("steps", 0))


def find_finished_run(out_dir: str | Path) -> PriorRun | None:
    """The finished run in out_dir, or None (no summary, or a run that stopped early or was preempted)."""
    out_dir = Path(out_dir)
    summary = read_summary(out_dir)
    if not summary or not summary.get("finished"):
        return None
    identity = config = None
    if (out_dir / "config.yaml").is_file():
        from dora_dist.config import load_config

        try:
            prior_cfg = load_config(out_dir / "config.yaml")
            identity, config = run_identity(prior_cfg), prior_cfg.to_dict()
        except (ConfigError, ValueError, OSError):
            identity = None  # a config.yaml written by another version: compare nothing rather than refuse
    return PriorRun(out_dir, summary, identity, config)


#: keys whose change says nothing about the finished run's result (where and how this invocation reports)
_NOT_COMPARED = ("output.", "checkpoint.resume", "training.device", "parallel.")


def unused_changes(prior: PriorRun, cfg: Config) -> list[str]:
    """["training.lr: 0.005 -> 0.001", ...]: keys this invocation changes from the finished run's config that it
    does not use, as there is nothing to train (identity and length keys are decided by check_rerun)."""
    if prior.config is None:
        return []
    current = cfg.to_dict()
    out = []
    for section, keys in current.items():
        for key, value in keys.items():
            dotted = f"{section}.{key}"
            if dotted in IDENTITY_KEYS or dotted in LENGTH_KEYS or dotted.startswith(_NOT_COMPARED):
                continue
            before = _get(prior.config, dotted)
            if _normalise(before) != _normalise(value):
                out.append(f"{dotted}: {before!r} -> {value!r}")
    return out


def keep_earlier_metrics(out_dir: Path) -> Path | None:
    """A run starting at step 0 in a directory whose metrics.jsonl holds records of an earlier attempt (stopped
    before its first checkpoint): move that file aside as metrics.<n>.jsonl instead of overwriting it."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file() or path.stat().st_size == 0:
        return None
    n = 1
    while (kept := path.with_name(f"metrics.{n}.jsonl")).exists():
        n += 1
    os.replace(path, kept)
    return kept


def check_rerun(cfg: Config, prior: PriorRun) -> bool:
    """Decide what a new invocation does with the finished run in its output.dir, from the config alone.

    Returns True when the job is already done (same run, same length: the caller says so and exits 0), False when
    it may go on (the length keys changed: `check_extension` decides once max_steps is resolved). Raises ConfigError
    when the config is another run's or when it would retrain the finished run from scratch.
    """
    where = f"output.dir={prior.out_dir}"
    if prior.identity is not None:
        changes = identity_changes(prior.identity, run_identity(cfg))
        if changes:
            raise ConfigError(
                f"{where} holds a finished run of another job ({'; '.join(changes)}): "
                "choose another output.dir, or delete that one to replace it"
            )
    if cfg.checkpoint.resume == "none":
        raise ConfigError(
            f"{where} holds a finished run ({prior.steps} steps) and checkpoint.resume=none would "
            "retrain it from scratch and overwrite its adapter: choose another output.dir, or delete "
            "that one"
        )
    recorded_length = prior.summary.get("length")
    return recorded_length is None or _normalise(recorded_length) == _normalise(length_of(cfg))


def check_extension(prior: PriorRun, max_steps: int, resume_step: int | None) -> bool:
    """Once max_steps is resolved: True when there is nothing to do (the finished run already has max_steps steps);
    False when the run extends from its final checkpoint; ConfigError when that checkpoint does not exist."""
    if max_steps <= prior.steps:
        return True
    if resume_step is None or resume_step < prior.steps:  # a later one: an extension that was interrupted
        have = f"the latest is at step {resume_step}" if resume_step else "it has none"
        raise ConfigError(
            f"cannot extend the finished run in output.dir={prior.out_dir} from {prior.steps} to {max_steps} steps: "
            f"no checkpoint of its last step ({have}; checkpoint.save_final=true keeps one): use another output.dir"
        )
    return False


def length_of(cfg: Config) -> dict[str, Any]:
    """The length keys as given (recorded in summary.json, compared on a re-run)."""
    return _values(cfg, LENGTH_KEYS)


def _format_written_by(engine_name: str) -> str:
    """The checkpoint format of a record that predates the "format" key: the one its engine writes."""
    from dora_dist.parallel import ENGINES, capabilities

    return capabilities(engine_name).checkpoint_format if engine_name in ENGINES else "dcp"


def check_resume(checkpoint: Path, info: dict, cfg: Config, engine, world_size: int) -> None:
    """Refuse to resume from a checkpoint of another run, or one this engine cannot read at this world size.

    `info` is the checkpoint's COMPLETE record (step, engine, world_size, format, run identity). Checkpoints of the
    DCP engines (none, ddp, fsdp2) load on any of them at any world size (DCP reshards; the data order is global);
    DeepSpeed's need the same format and world size."""
    changes = identity_changes(info.get("run") or {}, run_identity(cfg))
    if changes:
        raise ConfigError(
            f"cannot resume from {checkpoint}: it was written by another job ({'; '.join(changes)}). "
            "Restore those settings, use another output.dir / checkpoint.dir, or "
            "checkpoint.resume=none to start over"
        )
    caps = engine.capabilities
    saved_engine = info.get("engine", "?")
    saved_format = info.get("format") or _format_written_by(saved_engine)
    if saved_format not in caps.resumes_from:
        raise ConfigError(
            f"cannot resume from {checkpoint}: it was written by parallel.engine={saved_engine} "
            f"({saved_format} format), which parallel.engine={engine.name} cannot read; resume with "
            f"parallel.engine={saved_engine}"
        )
    saved_world = int(info.get("world_size", world_size))
    if saved_world != world_size and not caps.reshardable_checkpoints:
        raise ConfigError(
            f"cannot resume from {checkpoint}: it was written by {saved_world} ranks and "
            f"parallel.engine={engine.name} checkpoints load only at the same world size (this run has "
            f"{world_size}); resume with {saved_world} ranks"
        )
