"""Typed job configuration: dataclasses, YAML loading, dotted `key=value` overrides, validation.

    cfg = load_config("configs/quickstart.yaml", ["training.lr=1e-3", "parallel.engine=fsdp2"])

Every key is checked on load: an unknown key is an error that lists the valid keys of its section, a value of the
wrong type or out of range is an error naming the key (`training.lr`).

A leaf: it imports only dora_dist.errors and the adapter settings (dora_dist.adapters.config, whose DoRAConfig is
the `dora:` section), so every layer can import `Config`. Rules that need a layer above it to judge a value (the
engine registry, the trackers) live in dora_dist.preflight, which registers them here (`register_load_rule`).
Fields marked `metadata=IDENTITY` define a run (`identity_keys`; dora_dist.run_state compares them).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

import yaml

from dora_dist.adapters.config import IDENTITY, DoRAConfig
from dora_dist.errors import ConfigError, SettingError  # ConfigError re-exported: dora_dist.config.ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Section = TypeVar("_Section", bound="DataclassInstance")

#: the built-in model's name (models/builtin.py builds it); the default model.name_or_path
BUILTIN_NAME = "builtin:tiny-llama"


# --------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    #: "builtin:tiny-llama" (the embedded default, built locally), a local directory or a Hugging Face hub id
    name_or_path: str = field(default=BUILTIN_NAME, metadata=IDENTITY)
    #: build the model from scratch from this transformers config dict (needs "model_type"); overrides name_or_path
    #: for the weights (random init with training.seed). With name_or_path="builtin:tiny-llama", these keys
    #: override the tiny Llama's architecture.
    config: dict[str, Any] | None = field(default=None, metadata=IDENTITY)
    #: tokenizer location when it differs from the model (default: the model's own / the built-in one)
    tokenizer: str | None = None
    #: dtype of the frozen base weights: auto (bf16 when training.precision=bf16, else fp32), float32, bfloat16,
    #: float16; float64 for numerical reference runs (engine parity tests)
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = field(default="auto", metadata=IDENTITY)
    #: attention kernel passed to transformers (sdpa, eager, flash_attention_2; null: its default)
    attn_implementation: str | None = "sdpa"
    #: run a hub/local model's own Python code (config.json auto_map); only for code you trust
    trust_remote_code: bool = False
    #: hub branch, tag or commit of the model (null: main)
    revision: str | None = field(default=None, metadata=IDENTITY)
    #: where the built-in model/tokenizer and downloads are cached (default: $DORA_DIST_CACHE or ~/.cache/dora_dist)
    cache_dir: str | None = None

    @property
    def builds_from_scratch(self) -> bool:
        """model.config builds a new model (random init), rather than reshaping the built-in one."""
        return self.config is not None and self.name_or_path != BUILTIN_NAME


@dataclass
class QuantizationConfig:
    #: none, nf4 / fp4 (bitsandbytes 4-bit, QDoRA) or int8 (LLM.int8)
    mode: Literal["none", "nf4", "fp4", "int8"] = field(default="none", metadata=IDENTITY)
    #: dtype the 4/8-bit base is dequantized to for its matmuls
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    #: also quantize the 4-bit blocks' scales (QLoRA's double quantization; ~0.4 bit/param less)
    double_quant: bool = field(default=True, metadata=IDENTITY)
    #: storage dtype of the packed 4-bit weights (uint8, or bfloat16 for FSDP-style flat storage)
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"


@dataclass
class DataConfig:
    #: "synthetic" (the embedded corpus), a local .jsonl/.json/.parquet/.csv file or directory, or a hub dataset id
    source: str = field(default="synthetic", metadata=IDENTITY)
    #: auto (from the columns), text, prompt_completion, chat
    format: Literal["auto", "text", "prompt_completion", "chat"] = field(default="auto", metadata=IDENTITY)
    #: column holding the text (data.format=text)
    text_field: str = field(default="text", metadata=IDENTITY)
    #: column holding the prompt (data.format=prompt_completion; no loss on it)
    prompt_field: str = field(default="prompt", metadata=IDENTITY)
    #: column holding the completion (data.format=prompt_completion; the loss is on it)
    completion_field: str = field(default="completion", metadata=IDENTITY)
    #: column holding the chat messages [{role, content}, ...] (data.format=chat)
    messages_field: str = field(default="messages", metadata=IDENTITY)
    #: split to read from a hub dataset or a data directory (a single file has one split)
    split: str = field(default="train", metadata=IDENTITY)
    #: hub dataset configuration name
    subset: str | None = field(default=None, metadata=IDENTITY)
    #: tokens per training sequence (packed blocks, or the truncation length without packing)
    seq_len: int = field(default=128, metadata=IDENTITY)
    #: concatenate examples into full seq_len blocks (labels kept per token)
    packing: bool = field(default=True, metadata=IDENTITY)
    #: keep at most this many raw examples (0: all)
    max_samples: int = field(default=0, metadata=IDENTITY)
    #: number of examples of the synthetic corpus
    synthetic_samples: int = field(default=6000, metadata=IDENTITY)
    #: add the tokenizer's EOS after each example
    add_eos: bool = field(default=True, metadata=IDENTITY)
    #: hold out this fraction of the raw examples (split before packing, drawn with training.seed) as the eval set
    eval_fraction: float = field(default=0.0, metadata=IDENTITY)
    #: or evaluate on its own source (same formats and *_field keys as `source`); exclusive with eval_fraction
    eval_source: str | None = None
    #: split / subset of eval_source (default: "validation" for a hub id or directory; files have one split)
    eval_split: str = "validation"
    #: hub configuration name of eval_source
    eval_subset: str | None = None
    #: keep at most this many raw eval examples (0: all)
    eval_max_samples: int = 0


@dataclass
class TrainingConfig:
    #: optimizer steps; 0 means derive from `epochs`
    max_steps: int = 0
    #: passes over the data when max_steps is 0 (ignored, with a note, when max_steps > 0)
    epochs: float = 1.0
    #: sequences per forward/backward on each rank
    micro_batch_size: int = 8
    #: gradient accumulation steps; ignored (derived) when global_batch_size > 0
    grad_accum: int = 1
    #: samples per optimizer step over all ranks; 0 means micro_batch_size * grad_accum * world_size
    global_batch_size: int = field(default=0, metadata=IDENTITY)
    #: peak learning rate (AdamW)
    lr: float = 2e-4
    #: AdamW weight decay
    weight_decay: float = 0.0
    #: AdamW beta1
    adam_beta1: float = 0.9
    #: AdamW beta2
    adam_beta2: float = 0.999
    #: AdamW epsilon
    adam_eps: float = 1e-8
    #: linear warmup from 0 to lr over this many steps
    warmup_steps: int = 0
    #: learning-rate decay after warmup
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    #: the schedule decays to lr × min_lr_ratio
    min_lr_ratio: float = 0.0
    #: 0 disables clipping (the norm is still logged)
    max_grad_norm: float = 1.0
    #: a step whose loss or gradient is NaN/inf is skipped (no update, no LR tick; its batch is consumed); this many
    #: skipped steps in a row stop the run (1: stop at the first)
    max_bad_steps: int = 5
    #: seed of the adapter init, the data order and dropout (part of the run's identity)
    seed: int = field(default=42, metadata=IDENTITY)
    #: fp32, or bf16 autocast with a bf16 base (model.dtype=auto)
    precision: Literal["fp32", "bf16"] = "fp32"
    #: recompute each decoder block in backward: less activation memory, ~30% more compute
    gradient_checkpointing: bool = False
    #: lm_head + cross-entropy over chunks of this many tokens, so the fp32 logits are never whole (0: whole logits)
    loss_chunk_tokens: int = 512
    #: torch.compile each decoder block (DoRA layers included) before the engine wraps the model
    compile: bool = False
    #: auto (cuda if available), cpu, cuda
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: print a log line every N steps (metrics.jsonl gets every step)
    log_every: int = 1
    #: stop the run (after saving) at this step; for tests of interrupted runs (0: never)
    stop_after_steps: int = 0
    #: evaluate every N optimizer steps (0: only at the end); needs an eval set (data.eval_fraction / eval_source)
    eval_every: int = 0
    #: sequences per eval forward on each rank (0: training.micro_batch_size)
    eval_batch_size: int = 0


@dataclass
class ParallelConfig:
    #: auto: none for one process, fsdp2 for several (ddp for 4/8-bit bases); or none, ddp, fsdp2, zero2, zero3
    engine: str = "auto"
    #: FSDP2: keep sharded parameters (and optimizer state) on the CPU. zero2/zero3: offload the optimizer state
    #: (and, for zero3, the partitioned parameters) to the CPU
    cpu_offload: bool = False
    #: FSDP2: free the unsharded parameters after forward (re-gather in backward)
    reshard_after_forward: bool = True
    #: FSDP2: only rank 0 reads the base weights (on the CPU); the other ranks build the model on the meta device and
    #: receive their shards by broadcast, so a node holds one CPU copy of the model instead of one per process
    load_on_rank0: bool = True
    #: data-parallel processes that shard the base among themselves (FSDP2, ZeRO-3); the shard groups are then
    #: replicated over the rest. 0 = auto: the processes of one node (LOCAL_WORLD_SIZE / tp) when the job spans
    #: several nodes and a node holds several, else all of them. Smaller than the data-parallel world: FSDP2 runs
    #: HSDP (a 2-D mesh: replicate × shard) and zero3 ZeRO++ hierarchical partitioning (zero_hpz_partition_size).
    #: Must divide the data-parallel world and, across nodes, fit the node layout (a group never straddles nodes
    #: unless it spans them)
    shard_group: int = 0
    #: tensor-parallel degree: each block's linears split over this many processes of a node (1 = none); the mesh is
    #: dp × tp (dp = world / tp), tp innermost. Must divide the world size, the attention heads and the KV heads
    tp: int = 1
    #: DDP: bucket size in MiB
    ddp_bucket_mb: int = 25
    #: DeepSpeed engines (zero2/zero3): a user DeepSpeed JSON merged into the one generated from this config; keys
    #: that contradict it (micro-batch, accumulation, clipping, precision, stage) are an error naming both values
    deepspeed_config: str | None = None


@dataclass
class CheckpointConfig:
    #: save every N optimizer steps (0: only at the end when save_final is true)
    every_steps: int = 0
    #: keep the latest N complete checkpoints
    keep_last: int = 2
    #: auto (latest complete checkpoint in dir, else start fresh), none, or a checkpoint directory
    resume: str = "auto"
    #: default: <output.dir>/checkpoints
    dir: str | None = None
    #: also checkpoint the last step (needed to extend a finished run with a larger max_steps)
    save_final: bool = False
    #: also keep the adapter with the lowest eval loss in <output.dir>/adapter_best (needs an eval set)
    keep_best: bool = False


@dataclass
class OutputConfig:
    #: where the run writes metrics.jsonl, loss.png, adapter/, config.yaml, summary.json, checkpoints/
    dir: str = "outputs/quickstart"
    #: export the adapter in PEFT format to <dir>/adapter at the end
    save_adapter: bool = True
    #: write <dir>/loss.png at the end
    plot: bool = True
    #: tqdm progress bar on rank 0
    progress_bar: bool = True
    #: where metrics go (rank 0): any of jsonl (<dir>/metrics.jsonl), tensorboard (<dir>/tensorboard; needs the
    #: `tensorboard` extra), wandb (needs the `wandb` extra)
    loggers: str | list[str] = field(default_factory=lambda: ["jsonl"])
    #: wandb: project, run name (default: the output dir's name) and mode (offline needs no network or account)
    wandb_project: str = "dora_dist"
    #: wandb run name (default: the output dir's name)
    wandb_run_name: str | None = None
    #: wandb mode: offline needs no network or account
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    #: log DoRA's health (dora_dist/health.py): per layer group the magnitude change |m − m₀|/m₀, analyze's ΔM and
    #: ΔD, and the magnitude's effective share of the output (benchmarks/health_bench.py measures the cost)
    dora_health: bool = True
    #: steps between DoRA health measurements (0: every training.log_every steps); the last step is always measured
    dora_health_every: int = 10
    #: warn once (rank 0) when after this many steps (0: never) every layer's max |m − m₀|/m₀ is below
    #: dora_health_min_change or a group's effective share is below dora_health_min_share
    dora_health_warn_after: int = 50
    #: the health warning's threshold for "the magnitudes have not moved": every layer's max |m − m₀|/m₀ below it
    dora_health_min_change: float = 1e-4
    #: the health warning's threshold for the magnitude's effective share of the output (1: kept, 0: rounded away)
    dora_health_min_share: float = 0.5


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    dora: DoRAConfig = field(default_factory=DoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# --------------------------------------------------------------------------------------------------------
# Range checks (key -> predicate, message)
# --------------------------------------------------------------------------------------------------------
_POSITIVE = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.seq_len": (lambda v: v >= 2, "must be >= 2"),
    "data.max_samples": _NON_NEGATIVE,
    "data.synthetic_samples": _POSITIVE,
    "data.eval_fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "data.eval_max_samples": _NON_NEGATIVE,
    "training.max_steps": _NON_NEGATIVE,
    "training.epochs": _POSITIVE,
    "training.micro_batch_size": _POSITIVE,
    "training.grad_accum": _POSITIVE,
    "training.global_batch_size": _NON_NEGATIVE,
    "training.lr": _POSITIVE,
    "training.weight_decay": _NON_NEGATIVE,
    "training.adam_beta1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "training.adam_beta2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "training.adam_eps": _POSITIVE,
    "training.warmup_steps": _NON_NEGATIVE,
    "training.min_lr_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "training.max_grad_norm": _NON_NEGATIVE,
    "training.max_bad_steps": _POSITIVE,
    "training.seed": _NON_NEGATIVE,
    "training.log_every": _POSITIVE,
    "training.stop_after_steps": _NON_NEGATIVE,
    "training.eval_every": _NON_NEGATIVE,
    "training.eval_batch_size": _NON_NEGATIVE,
    "training.loss_chunk_tokens": _NON_NEGATIVE,
    "parallel.ddp_bucket_mb": _POSITIVE,
    "parallel.tp": _POSITIVE,
    "parallel.shard_group": _NON_NEGATIVE,
    "output.dora_health_every": _NON_NEGATIVE,
    "output.dora_health_warn_after": _NON_NEGATIVE,
    "output.dora_health_min_change": _NON_NEGATIVE,
    "output.dora_health_min_share": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "checkpoint.every_steps": _NON_NEGATIVE,
    "checkpoint.keep_last": _POSITIVE,
}


# --------------------------------------------------------------------------------------------------------
# Type coercion
# --------------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert `value` to the annotated type `tp`, raising ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass  # the next type of the union may fit; none fitting is the error below
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                pass
            else:
                if f.is_integer():
                    return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _section_from_dict(cls: type[_Section], data: Any, prefix: str) -> _Section:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in valid:
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{full}'; valid keys in {where}: {', '.join(valid)}")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _section_from_dict(tp, value, full)
        else:
            value = _coerce(full, value, tp)
            check = _RANGES.get(full)
            if check is not None and value is not None and not check[0](value):
                raise ConfigError(f"{full}: {check[1]}, got {value!r}")
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except SettingError as exc:  # a section that validates itself (DoRAConfig) names the field
        raise ConfigError(f"{prefix}.{exc.name} {exc.problem}") from exc


#: rules of a loaded config that need a layer above this leaf to judge a value (the engine registry, the trackers):
#: dora_dist.preflight registers them (it is imported with the package) and every config loaded here runs them
_LOAD_RULES: list[Callable[[Config], None]] = []


def register_load_rule(rule: Callable[[Config], None]) -> Callable[[Config], None]:
    """Run `rule(cfg)` on every config this module loads, after its own checks (a rule raises ConfigError)."""
    if rule not in _LOAD_RULES:
        _LOAD_RULES.append(rule)
    return rule


def _cross_checks(cfg: Config) -> None:
    tm = cfg.dora.target_modules
    if isinstance(tm, str) and tm != "all-linear":
        cfg.dora.target_modules = [tm]  # in a job config a single name is a suffix, as in a list
    if cfg.dora.adapter_dtype == "float16":
        raise ConfigError(
            "dora.adapter_dtype=float16: training keeps no loss scale, so float16 adapter gradients can underflow; "
            "use float32 or bfloat16"
        )
    if cfg.model.builds_from_scratch and "model_type" not in (cfg.model.config or {}):
        raise ConfigError("model.config: a from-scratch model config needs a 'model_type' key (e.g. llama)")
    _check_eval(cfg)
    if isinstance(cfg.output.loggers, str):
        cfg.output.loggers = [cfg.output.loggers]
    if cfg.checkpoint.resume not in ("auto", "none") and not cfg.checkpoint.resume:
        raise ConfigError("checkpoint.resume: expected 'auto', 'none' or a checkpoint directory")
    for rule in _LOAD_RULES:
        rule(cfg)


def _check_eval(cfg: Config) -> None:
    d = cfg.data
    if d.eval_fraction and d.eval_source:
        raise ConfigError(
            f"data.eval_fraction={d.eval_fraction} and data.eval_source={d.eval_source!r} both name an "
            "eval set; set one of them"
        )
    has_eval = bool(d.eval_fraction or d.eval_source)
    if not has_eval:
        for key, on in (
            ("training.eval_every", cfg.training.eval_every),
            ("checkpoint.keep_best", cfg.checkpoint.keep_best),
        ):
            if on:
                raise ConfigError(
                    f"{key}={on} needs an eval set: set data.eval_fraction (e.g. 0.05) or data.eval_source"
                )


def config_from_dict(data: dict[str, Any] | None) -> Config:
    cfg = _section_from_dict(Config, data or {}, "")
    _cross_checks(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------------
# Overrides and loading
# --------------------------------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Set dotted keys in a nested dict (`training.lr=1e-3`, `model.config.hidden_size=64`)."""
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[: i + 1])} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config {p} is a directory; give a YAML file (e.g. configs/quickstart.yaml)")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: {_yaml_problem(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p} is not a text (UTF-8) YAML file ({exc.reason} at byte {exc.start})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return data


def _yaml_problem(exc: Exception) -> str:
    """'line 3, column 1: <what the parser expected>' from a PyYAML error (its own text names '<unicode string>')."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = " ".join(str(getattr(exc, "problem", None) or "invalid YAML").split())
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"YAML syntax error at {where}{what}" + (f" ({' '.join(context.split())})" if context else "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    return config_from_dict(data)


#: `dora-dist train` without --config runs this job (the same as configs/quickstart.yaml): the built-in tiny Llama,
#: the synthetic corpus, DoRA r=8 on all linear layers, ~2 minutes on 2 CPU cores under torchrun.
QUICKSTART: dict[str, Any] = {
    "model": {"name_or_path": BUILTIN_NAME},
    "dora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
    "data": {"source": "synthetic", "format": "text", "seq_len": 128, "packing": True},
    "training": {
        "max_steps": 200,
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "lr": 5.0e-3,
        "warmup_steps": 10,
        "lr_schedule": "cosine",
        "min_lr_ratio": 0.1,
        "max_grad_norm": 1.0,
        "seed": 42,
        "precision": "fp32",
    },
    "parallel": {"engine": "auto"},
    "checkpoint": {"every_steps": 100, "keep_last": 2, "resume": "auto"},
    "output": {"dir": "outputs/quickstart"},
}


def load_job_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The CLI's loader: a YAML file, or the built-in quickstart job when no file is given."""
    if path:
        return load_config(path, overrides)
    import copy

    return config_from_dict(apply_overrides(copy.deepcopy(QUICKSTART), overrides))


def valid_keys() -> list[str]:
    """All dotted keys (for help texts)."""
    out = []
    for sec in fields(Config):
        for f in fields(sec.type if dataclasses.is_dataclass(sec.type) else typing.get_type_hints(Config)[sec.name]):
            out.append(f"{sec.name}.{f.name}")
    return out


def identity_keys() -> tuple[str, ...]:
    """The dotted keys that define a run (fields marked `metadata=IDENTITY`), in section and field order."""
    hints = typing.get_type_hints(Config)
    return tuple(
        f"{section.name}.{f.name}"
        for section in fields(Config)
        for f in fields(hints[section.name])
        if f.metadata.get("identity")
    )
