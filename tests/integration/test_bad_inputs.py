"""Bad input, case by case: each is one clear line on stderr naming the problem, exit code 2, no traceback, and
nothing written (no output directory at all for a training run, no --out for a merge).

CASES is the one list. Each case runs in-process through the real entry point (`dora-dist ...` = cli.main, or
`python -m dora_dist.train` = train.main) and records its message; the last test renders the table of every case
into docs/errors.md and fails when the file differs (regenerate with DORA_DIST_WRITE_ERRORS_DOC=1).

To add a case: append a Case(area, name, argv, expect) to CASES (argv gets the `Assets` of prepared files; add a
file to `Assets` when a case needs one), then regenerate the doc. The subprocess launches (torchrun, the deepspeed
launcher) are in test_bad_inputs_launch.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "errors.md"
PREFIX = "dora_dist: error: "

QUICK = [
    "training.max_steps=1",
    "data.synthetic_samples=50",
    "data.seq_len=32",
    "output.progress_bar=false",
    "output.plot=false",
]


@dataclass
class Assets:
    """Files the cases point at, made once per module under one temporary directory (`<tmp>` in the doc)."""

    tmp: Path
    cache: Path
    builtin: Path  # the built-in tiny Llama (model + tokenizer)
    files: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str:
        return str(self.files[name])

    def train(self, *overrides: str) -> list[str]:
        """`train` argv of a quick run writing into <tmp>/run (which must not exist afterwards)."""
        return ["train", *QUICK, f"model.cache_dir={self.cache}", f"output.dir={self.tmp / 'run'}", *overrides]


@dataclass(frozen=True)
class Case:
    area: str
    name: str
    argv: Callable[[Assets], list[str]]
    expect: tuple[str, ...]  # substrings of the (normalised) message
    entry: str = "cli"  # cli: dora_dist.cli.main; train: dora_dist.train.main
    block: tuple[str, ...] = ()  # packages made unimportable for the case (sys.modules[name] = None)
    env: tuple[tuple[str, str], ...] = ()
    gpus: int | None = None  # pretend this many CUDA GPUs are visible (0: none) for the case
    library_text: str = ""  # regex of a library's own words in the message: '…' in the doc (they
    # change with the library's version, the case does not)
    chdir: bool = False  # run in <tmp> (for relative paths)

    @property
    def id(self) -> str:
        return f"{self.area}: {self.name}"


CASES: list[Case] = [
    # --- config --------------------------------------------------------------------------------------------------
    Case(
        "config",
        "unknown key",
        lambda a: a.train("training.lrr=1e-3"),
        ("unknown config key 'training.lrr'", "valid keys in section 'training'"),
    ),
    Case(
        "config",
        "wrong type",
        lambda a: a.train("training.micro_batch_size=two"),
        ("training.micro_batch_size", "expected an integer", "'two'"),
    ),
    Case("config", "value out of range", lambda a: a.train("training.lr=-1"), ("training.lr", "must be > 0")),
    Case(
        "config",
        "config file not found",
        lambda a: ["train", "--config", str(a.tmp / "nope.yaml")],
        ("config file not found", "nope.yaml"),
    ),
    Case(
        "config",
        "r larger than a layer's smaller side",
        lambda a: a.train("dora.r=96"),
        ("dora.r=96", "smaller side of", "use dora.r <= 64"),
    ),
    Case(
        "config",
        "target modules that match nothing",
        lambda a: a.train("dora.target_modules=[q_proj,zz_proj]"),
        ("dora.target_modules", "zz_proj", "q_proj"),
    ),
    Case(
        "config",
        "engine not installed (deepspeed missing)",
        lambda a: a.train("parallel.engine=zero2"),
        ("parallel.engine=zero2", "'deepspeed'", "not installed"),
        block=("deepspeed",),
    ),
    Case(
        "config",
        "engine not usable here (ddp in one process)",
        lambda a: a.train("parallel.engine=ddp"),
        ("parallel.engine=ddp needs several processes", "torchrun"),
    ),
    Case(
        "config",
        "world size that does not divide the batch",
        lambda a: ["train", "--check", *a.train("training.global_batch_size=6", "training.micro_batch_size=1")[1:]],
        ("training.global_batch_size=6", "× 4 = 4"),
        env=(("WORLD_SIZE", "4"),),
        entry="train",
    ),
    Case(
        "config",
        "a user DeepSpeed JSON whose hpZ size contradicts parallel.shard_group",
        lambda a: [
            "train",
            "--check",
            *a.train(
                "parallel.engine=zero3",
                "parallel.shard_group=2",
                "training.micro_batch_size=1",
                f"parallel.deepspeed_config={a['ds_hpz']}",
            )[1:],
        ],
        ("'zero_optimization.zero_hpz_partition_size' is 4", "gives 2 (from parallel.shard_group)"),
        env=(("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "2")),
        entry="train",
    ),
    Case(
        "config",
        "a shard group that does not divide the world (HSDP)",
        lambda a: ["train", "--check", *a.train("parallel.engine=fsdp2", "parallel.shard_group=3")[1:]],
        ("parallel.shard_group=3", "does not divide the 4"),
        env=(("WORLD_SIZE", "4"),),
        entry="train",
    ),
    Case(
        "config",
        "parallel.tp that does not divide the attention heads",
        lambda a: ["train", "--check", *a.train("parallel.engine=fsdp2", "parallel.tp=4")[1:]],
        ("parallel.tp=4 does not divide the model's num_attention_heads=6",),
        env=(("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "4")),
        entry="train",
    ),
    Case(
        "config",
        "a shard group that straddles nodes (HSDP)",
        lambda a: [
            "train",
            "--check",
            *a.train(
                "parallel.engine=fsdp2",
                "parallel.shard_group=6",
                "training.global_batch_size=24",
                "training.micro_batch_size=1",
            )[1:],
        ],
        ("parallel.shard_group=6", "node layout"),
        env=(("WORLD_SIZE", "12"), ("LOCAL_WORLD_SIZE", "4")),
        entry="train",
    ),
    Case(
        "config",
        "parallel.tp that does not divide the KV heads",
        lambda a: ["train", "--check", *a.train("parallel.engine=fsdp2", "parallel.tp=3")[1:]],
        ("parallel.tp=3 does not divide the model's num_key_value_heads=2",),
        env=(("WORLD_SIZE", "6"), ("LOCAL_WORLD_SIZE", "6")),
        entry="train",
    ),
    Case(
        "config",
        "a shard group with an engine that has no hybrid sharding",
        lambda a: ["train", "--check", *a.train("parallel.engine=ddp", "parallel.shard_group=2")[1:]],
        ("parallel.shard_group=2", "engines that do: fsdp2"),
        env=(("WORLD_SIZE", "4"),),
        entry="train",
    ),
    Case(
        "config",
        "parallel.tp that does not divide the world size",
        lambda a: ["train", "--check", *a.train("parallel.engine=fsdp2", "parallel.tp=4")[1:]],
        ("parallel.tp=4 does not divide the world size 6",),
        env=(("WORLD_SIZE", "6"), ("LOCAL_WORLD_SIZE", "6")),
        entry="train",
    ),
    Case(
        "config",
        "parallel.tp with an engine that cannot compose with it",
        lambda a: ["train", "--check", *a.train("parallel.engine=zero2", "parallel.tp=2")[1:]],
        ("parallel.tp=2 with parallel.engine=zero2", "engines that can: ddp, fsdp2"),
        env=(("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "4")),
        entry="train",
    ),
    Case(
        "config",
        "parallel.tp over a 4-bit base whose width is not whole quantization blocks per rank",
        lambda a: ["train", "--check", *a.train("parallel.engine=ddp", "parallel.tp=2", "quantization.mode=nf4")[1:]],
        ("4-bit layer layers.*.self_attn.o_proj row-wise", "input width 192 gives 96 columns per rank", "64"),
        env=(("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "4")),
        entry="train",
    ),
    Case(
        "config",
        "parallel.tp over a 4-bit base with fsdp2",
        lambda a: ["train", "--check", *a.train("parallel.engine=fsdp2", "parallel.tp=2", "quantization.mode=nf4")[1:]],
        ("parallel.tp=2 with quantization.mode=nf4 runs on parallel.engine=ddp only", "not fsdp2"),
        env=(("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "4")),
        entry="train",
    ),
    Case(
        "config",
        "nccl (training.device=cuda) without a GPU",
        lambda a: a.train("training.device=cuda"),
        ("training.device=cuda", "no CUDA GPU"),
        gpus=0,
    ),
    Case(
        "config",
        "nccl with more processes than GPUs on the node",
        lambda a: ["train", "--check", *a.train()[1:]],
        ("4 processes on this node but 2 CUDA GPU", "one GPU per"),
        entry="train",
        gpus=2,
        env=(("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "4")),
    ),
    Case(
        "config",
        "YAML syntax error in the config file",
        lambda a: ["train", "--config", a["bad_yaml"]],
        ("bad.yaml: YAML syntax error at line 3, column 1", "expected ',' or ']'"),
    ),
    Case(
        "config",
        "--config names a directory",
        lambda a: ["train", "--config", str(a.tmp)],
        ("is a directory", "give a YAML file"),
    ),
    Case(
        "config",
        "an override without '='",
        lambda a: a.train("training.lr"),
        ("override 'training.lr' is not of the form section.key=value",),
    ),
    Case(
        "config",
        "output.dir is an existing file",
        lambda a: ["train", "--check", *a.train(f"output.dir={a['a_file']}")[1:]],
        ("output.dir=<tmp>/a_file.txt is an existing file, not a directory",),
        entry="train",
    ),
    Case(
        "config",
        "output.dir below a file",
        lambda a: a.train(f"output.dir={a['a_file']}/run"),
        ("output.dir=<tmp>/a_file.txt/run cannot be created: <tmp>/a_file.txt is a file",),
    ),
    Case("plan", "--nodes 0", lambda a: ["plan", "--nodes", "0"], ("--nodes must be >= 1, got 0",)),
    Case(
        "plan",
        "a global batch the cluster does not split (the trainer's rule)",
        lambda a: ["plan", "--config", str(ROOT / "configs" / "llama3.1-8b-fsdp2-8gpu.yaml"), "--gpus-per-node", "3"],
        ("training.global_batch_size=64 is not a multiple of", "2 × 3 = 6"),
    ),
    Case("plan", "--mfu outside (0, 1]", lambda a: ["plan", "--mfu", "40"], ("--mfu must be in (0, 1]",)),
    Case(
        "config",
        "zero3 with a 4-bit base",
        lambda a: a.train("parallel.engine=zero3", "quantization.mode=nf4"),
        ("parallel.engine=zero3", "quantization.mode=nf4", "zero2"),
    ),
    Case(
        "config",
        "fsdp2 with an 8-bit base",
        lambda a: a.train("parallel.engine=fsdp2", "quantization.mode=int8"),
        ("parallel.engine=fsdp2", "quantization.mode=int8", "ddp or zero2"),
    ),
    # --- data ------------------------------------------------------------------------------------------------------
    Case(
        "data",
        "missing file",
        lambda a: a.train(f"data.source={a.tmp / 'missing.jsonl'}"),
        ("data.source", "not found", "missing.jsonl"),
    ),
    Case(
        "data",
        "a mistyped local folder (its parent exists)",
        lambda a: a.train("data.source=mydata/train"),
        ("data.source: file or directory not found: mydata/train", "mydata/ exists here", "local path"),
        chdir=True,
    ),
    Case(
        "data",
        "a hub dataset, offline and not in the cache",
        lambda a: a.train("data.source=nobody/no-such-data"),
        (
            "taken for a Hugging Face hub dataset id",
            "offline mode is on",
            "not in the local cache",
            "./nobody/no-such-data",
        ),
        env=(("HF_HUB_OFFLINE", "1"),),
    ),
    Case(
        "data",
        "a field of the wrong type (named by its line)",
        lambda a: a.train(f"data.source={a['null_text']}"),
        ("data field 'text' must be a string in the example at line 4 of <tmp>/null_text.jsonl", "NoneType"),
    ),
    Case(
        "data",
        "unreadable format",
        lambda a: a.train(f"data.source={a['garbage']}"),
        ("data.source: cannot read", "garbage.jsonl", "as json"),
        library_text=r"(?<=as json \().*(?=\); check)",
    ),
    Case(
        "data",
        "missing field",
        lambda a: a.train(f"data.source={a['no_field']}", "data.format=prompt_completion"),
        ("data.format=prompt_completion", "'completion'", "columns"),
    ),
    Case("data", "empty data set", lambda a: a.train(f"data.source={a['empty']}"), ("empty.jsonl", "empty")),
    Case(
        "data",
        "every sequence over seq_len",
        lambda a: a.train(f"data.source={a['long']}"),
        ("every training example is longer than data.seq_len=32", "raise data.seq_len"),
    ),
    Case(
        "data",
        "chat data, tokenizer without a chat template",
        lambda a: a.train(f"data.source={a['chat']}", "data.format=chat", f"model.tokenizer={a['no_template']}"),
        ("data.format=chat", "no_template", "chat template"),
    ),
    Case(
        "data",
        "a prompt longer than seq_len",
        lambda a: a.train(f"data.source={a['long_prompt']}", "data.format=prompt_completion"),
        ("training example at line 3 of <tmp>/long_prompt.jsonl", "prompt is 90 tokens", "data.seq_len=32"),
    ),
    # --- model -----------------------------------------------------------------------------------------------------
    Case(
        "model",
        "missing path",
        lambda a: a.train(f"model.name_or_path={a.tmp / 'no_model'}"),
        ("model.name_or_path", "no such directory", "no_model"),
    ),
    Case(
        "model",
        "a hub model id, offline and not in the cache",
        lambda a: a.train("model.name_or_path=nobody/no-model"),
        ("model.name_or_path='nobody/no-model'", "taken for a Hugging Face hub model id", "offline mode is on"),
        env=(("HF_HUB_OFFLINE", "1"),),
    ),
    Case(
        "model",
        "a model without the target modules",
        lambda a: a.train(
            f"model.name_or_path={a['gpt2']}", f"model.tokenizer={a.builtin}", "dora.target_modules=[q_proj,v_proj]"
        ),
        ("dora.target_modules", "GPT2LMHeadModel", "c_attn"),
    ),
    Case(
        "model",
        "4-bit without bitsandbytes",
        lambda a: a.train("quantization.mode=nf4"),
        ("quantization.mode=nf4 needs bitsandbytes", "pip install"),
        block=("bitsandbytes",),
    ),
    Case(
        "model",
        "a quantization section contradicting a pre-quantized checkpoint",
        lambda a: a.train(f"model.name_or_path={a['prequantized']}", "quantization.mode=fp4"),
        (
            "pre-quantized bitsandbytes checkpoint",
            "quantization.mode=fp4 vs the checkpoint's bnb_4bit_quant_type=nf4",
            "Remove the quantization section",
        ),
    ),
    Case(
        "model",
        "trust_remote_code needed but off",
        lambda a: a.train(f"model.name_or_path={a['custom_code']}"),
        ("auto_map", "model.trust_remote_code=true"),
    ),
    # --- adapters (dora-dist merge / generate) ---------------------------------------------------------------------
    Case(
        "adapters",
        "wrong shapes",
        lambda a: ["merge", "--adapter", a["bad_shape"], "--out", str(a.tmp / "merged")],
        ("lora_B.weight", "has shape (192, 3)", "expects (192, 4)"),
    ),
    Case(
        "adapters",
        "adapter of another base model",
        lambda a: ["merge", "--adapter", a["adapter"], "--base", a["gpt2"], "--out", str(a.tmp / "merged")],
        ("modules this model (GPT2LMHeadModel) lacks", "another base model"),
    ),
    Case(
        "adapters",
        "a pickle instead of safetensors",
        lambda a: ["merge", "--adapter", a["pickle"], "--out", str(a.tmp / "merged")],
        ("adapter_model.bin is a pickle", "safetensors"),
    ),
    Case(
        "adapters",
        "a LoRA adapter where DoRA is expected",
        lambda a: ["generate", "--adapter", a["lora_as_dora"], "--prompt", "1 + 1 ="],
        ("plain LoRA adapter", "use_dora=true"),
    ),
    Case(
        "adapters",
        "merge --out is the adapter directory",
        lambda a: ["merge", "--adapter", a["adapter"], "--out", a["adapter"]],
        ("--out <tmp>/adapter is the adapter directory", "give another --out"),
    ),
    Case(
        "adapters",
        "merge --out inside the base model directory",
        lambda a: ["merge", "--adapter", a["adapter"], "--out", str(a.builtin / "merged")],
        ("is inside the base model directory", "give another --out"),
    ),
    Case(
        "adapters",
        "merge of a base with a shard missing",
        lambda a: ["merge", "--adapter", a["adapter"], "--base", a["missing_shard"], "--out", str(a.tmp / "merged")],
        ("missing shard(s)", "model.safetensors.index.json"),
    ),
    Case(
        "adapters",
        "merge --out is an existing file",
        lambda a: ["merge", "--adapter", a["adapter"], "--out", a["a_file"]],
        ("is an existing file",),
    ),
    Case(
        "adapters",
        "generate --max-new-tokens 0 (checked before loading)",
        lambda a: ["generate", "--adapter", a["adapter"], "--prompt", "1 + 1 =", "--max-new-tokens", "0"],
        ("--max-new-tokens must be >= 1, got 0",),
    ),
    Case(
        "adapters",
        "generate --top-p outside (0, 1]",
        lambda a: ["generate", "--adapter", a["adapter"], "--prompt", "1 + 1 =", "--top-p", "1.5"],
        ("--top-p must be in (0, 1], got 1.5",),
    ),
    Case(
        "adapters",
        "analyze --base that is not a model directory",
        lambda a: ["analyze", "--base", str(a.tmp / "no_model"), "--tuned", a["adapter"]],
        ("--base: '<tmp>/no_model' is not a model directory", "builtin:tiny-llama"),
    ),
    # --- resume ----------------------------------------------------------------------------------------------------
    Case(
        "resume",
        "checkpoint.resume=<dir> that is not a checkpoint",
        lambda a: a.train(f"checkpoint.resume={a['not_a_checkpoint']}"),
        ("checkpoint.resume", "not_a_checkpoint", "not a complete checkpoint"),
    ),
    Case(
        "resume",
        "resume with a changed config (another dora.r)",
        lambda a: a.train(f"output.dir={a['stopped']}", "training.max_steps=3", "dora.r=4"),
        ("cannot resume from", "step_00000001", "another job", "dora.r: 8 -> 4"),
    ),
    Case(
        "resume",
        "every checkpoint damaged (resume=auto)",
        lambda a: a.train(f"output.dir={a['damaged']}", "training.max_steps=3"),
        ("every checkpoint under", "is damaged", "truncated"),
        library_text=r"(?<=has )\d+ bytes, \d+(?= were)",
    ),
    Case(
        "resume",
        "a finished run of another job in output.dir",
        lambda a: a.train(f"output.dir={a['finished']}", "dora.r=4"),
        ("holds a finished run of another job", "dora.r: 8 -> 4", "choose another output.dir"),
    ),
]


# --------------------------------------------------------------------------------------------------------------------
# Assets
# --------------------------------------------------------------------------------------------------------------------
def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _runs(a: Assets) -> None:
    """A finished run, a run stopped after its step-1 checkpoint, and a copy of it with that checkpoint damaged."""
    from dora_dist.config import load_job_config
    from dora_dist.train import train

    def run(name: str, *overrides: str) -> None:
        args = a.train(f"output.dir={a.tmp / name}", "checkpoint.every_steps=1", *overrides)[1:]
        train(load_job_config(None, args))
        a.files[name] = a.tmp / name

    run("finished")
    run("stopped", "training.max_steps=3", "training.stop_after_steps=1")
    shutil.copytree(a.tmp / "stopped", a.tmp / "damaged")
    a.files["damaged"] = a.tmp / "damaged"
    shard = max((a.tmp / "damaged" / "checkpoints" / "step_00000001").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _adapters(a: Assets) -> None:
    """A DoRA adapter of the built-in model and its broken variants."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from dora_dist import DoRAConfig, apply_dora, save_adapter

    model = apply_dora(
        AutoModelForCausalLM.from_pretrained(a.builtin), DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    )
    good = save_adapter(model, a.tmp / "adapter", base_model_name_or_path=str(a.builtin))
    a.files["adapter"] = good
    for name in ("bad_shape", "pickle", "lora_as_dora"):
        shutil.copytree(good, a.tmp / name)
        a.files[name] = a.tmp / name
    weights = "adapter_model.safetensors"
    tensors = load_file(str(good / weights))
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    save_file({**tensors, key: torch.zeros(tensors[key].shape[0], 3)}, str(a.tmp / "bad_shape" / weights))
    (a.tmp / "pickle" / weights).unlink()
    torch.save(tensors, a.tmp / "pickle" / "adapter_model.bin")
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, str(a.tmp / "lora_as_dora" / weights))
    a.files["missing_shard"] = a.tmp / "missing_shard"  # the base in shards, one of them lost
    AutoModelForCausalLM.from_pretrained(a.builtin).save_pretrained(a.files["missing_shard"], max_shard_size="1MB")
    sorted(a.files["missing_shard"].glob("model-*.safetensors"))[1].unlink()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    from transformers import GPT2Config, GPT2LMHeadModel

    from dora_dist.config import load_job_config
    from dora_dist.models import ensure_builtin_model

    tmp = tmp_path_factory.mktemp("bad_inputs")
    cache = tmp_path_factory.getbasetemp() / "dora_dist_cache"  # shared with test_bad_inputs_launch.py
    builtin = ensure_builtin_model(load_job_config(None, [f"model.cache_dir={cache}"]))
    a = Assets(tmp, cache, builtin)
    f = a.files
    f["garbage"] = tmp / "garbage.jsonl"
    f["garbage"].write_text('this is not json\n{"text": \n')
    f["ds_hpz"] = tmp / "ds_hpz.json"
    f["ds_hpz"].write_text(json.dumps({"zero_optimization": {"zero_hpz_partition_size": 4}}))
    f["no_field"] = _jsonl(tmp / "no_field.jsonl", [{"prompt": "1 + 1 =", "answer": " 2"}] * 4)
    f["empty"] = tmp / "empty.jsonl"
    f["empty"].write_text("")
    f["long"] = _jsonl(tmp / "long.jsonl", [{"text": " ".join(["red green blue"] * 30)}] * 6)
    f["chat"] = _jsonl(
        tmp / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "1 + 1 ="}, {"role": "assistant", "content": "2 ."}]}] * 6,
    )
    f["long_prompt"] = _jsonl(
        tmp / "long_prompt.jsonl",
        [{"prompt": "1 + 1 =", "completion": " 2 ."}] * 2
        + [{"prompt": " ".join(["copy : red"] * 30), "completion": " red ."}]
        + [{"prompt": "2 + 2 =", "completion": " 4 ."}] * 3,
    )
    f["bad_yaml"] = tmp / "bad.yaml"
    f["bad_yaml"].write_text("training:\n  lr: [1e-3\n")
    f["a_file"] = tmp / "a_file.txt"
    f["a_file"].write_text("not a directory\n")
    (tmp / "mydata").mkdir()
    f["null_text"] = tmp / "null_text.jsonl"
    f["null_text"].write_text('{"text": "1 + 1 = 2 ."}\n\n{"text": "2 + 2 = 4 ."}\n{"text": null}\n')
    f["no_template"] = tmp / "no_template"
    f["no_template"].mkdir()
    for name in os.listdir(builtin):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(builtin / name, f["no_template"] / name)
    tok_cfg = f["no_template"] / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({k: v for k, v in json.loads(tok_cfg.read_text()).items() if k != "chat_template"}))
    f["gpt2"] = tmp / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(
        f["gpt2"]
    )
    f["custom_code"] = tmp / "custom_code"
    f["custom_code"].mkdir()
    (f["custom_code"] / "config.json").write_text(
        json.dumps(
            {
                "model_type": "dora_custom_lm",
                "auto_map": {
                    "AutoConfig": "configuration_custom.CustomConfig",
                    "AutoModelForCausalLM": "modeling_custom.CustomLM",
                },
            }
        )
    )
    # a pre-quantized checkpoint as preflight sees it: config.json with bitsandbytes' quantization_config
    f["prequantized"] = tmp / "prequantized"
    f["prequantized"].mkdir()
    config = json.loads((builtin / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
    }
    (f["prequantized"] / "config.json").write_text(json.dumps(config))
    f["not_a_checkpoint"] = tmp / "not_a_checkpoint"
    f["not_a_checkpoint"].mkdir()
    (f["not_a_checkpoint"] / "notes.txt").write_text("not a checkpoint\n")
    _adapters(a)
    _runs(a)
    return a


# --------------------------------------------------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------------------------------------------------
def normalise(text: str, a: Assets) -> str:
    """Machine-independent text: temporary paths as <tmp>, the cache as <cache>, no object addresses."""
    text = text.replace(str(a.builtin), "<builtin-model>").replace(str(a.cache), "<cache>").replace(str(a.tmp), "<tmp>")
    text = text.replace(str(ROOT), "<repo>")
    return re.sub(r"0x[0-9a-fA-F]+", "0x…", text)


MESSAGES: dict[str, str] = {}  # case id -> normalised message, filled by test_bad_input (read by the doc test)


def run_case(case: Case, a: Assets, monkeypatch, capfd) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the case's command, run in this process."""
    from dora_dist import cli, train

    for package in case.block:
        monkeypatch.setitem(sys.modules, package, None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DORA_DIST_DEBUG", raising=False)
    if case.chdir:
        monkeypatch.chdir(a.tmp)
    if case.gpus is not None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: case.gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: case.gpus)
    argv = case.argv(a)
    capfd.readouterr()
    rc = train.main(argv[1:]) if case.entry == "train" else cli.main(argv)
    out, err = capfd.readouterr()
    return rc, out, err


def check_failure(case: Case, a: Assets, rc: int, out: str, err: str) -> str:
    """The assertions every case shares; returns the normalised message."""
    assert rc == 2, (case.id, rc, out[-2000:], err[-3000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err + out, (case.id, err[-3000:])
    assert 1 <= len(lines) <= 2, (case.id, lines)  # the message and nothing else
    assert sum(line.startswith(PREFIX) for line in lines) == 1, (case.id, lines)
    message = normalise(" ".join(lines)[len(PREFIX) :], a)
    for needle in case.expect:
        assert needle in message, (case.id, needle, message)
    assert not (a.tmp / "run").exists(), f"{case.id}: the run wrote {sorted(os.listdir(a.tmp / 'run'))}"
    assert not (a.tmp / "merged").exists(), f"{case.id}: merge wrote its output"
    return message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, assets, monkeypatch, capfd):
    rc, out, err = run_case(case, assets, monkeypatch, capfd)
    MESSAGES[case.id] = check_failure(case, assets, rc, out, err)


def test_debug_shows_the_traceback(assets, monkeypatch, capfd):
    """--debug (and DORA_DIST_DEBUG=1) keep the one-line message and add the traceback; still exit code 2."""
    from dora_dist import cli

    argv = assets.train(f"data.source={assets['garbage']}")
    assert cli.main(argv[:1] + ["--debug"] + argv[1:]) == 2
    err = capfd.readouterr().err
    assert "Traceback" in err and "DataError" in err and err.count(PREFIX) == 1
    monkeypatch.setenv("DORA_DIST_DEBUG", "1")
    assert cli.main(["merge", "--adapter", assets["pickle"], "--out", str(assets.tmp / "merged")]) == 2
    err = capfd.readouterr().err
    assert "Traceback" in err and "AdapterError" in err and err.count(PREFIX) == 1


def test_rank_0_prints_at_once_the_others_after_the_launchers_grace(assets, monkeypatch, capfd):
    """Rank 0 reports at once. Another rank waits first (the launcher ends it when rank 0 failed too, see
    test_bad_inputs_launch.py) and reports, marked with its rank, only when it is still alive afterwards."""
    from dora_dist import errors, train

    waits = []
    monkeypatch.setattr(errors, "_wait_for_the_launcher", lambda seconds, code: waits.append((seconds, code)))
    monkeypatch.setenv("RANK", "0")
    assert train.main(["--check", "training.lr=-1"]) == 2
    assert capfd.readouterr().err.splitlines() == [PREFIX + "training.lr: must be > 0, got -1.0"] and waits == []
    monkeypatch.setenv("RANK", "1")
    assert train.main(["--check", "training.lr=-1"]) == 2
    assert capfd.readouterr().err.splitlines() == [PREFIX + "(rank 1) training.lr: must be > 0, got -1.0"]
    assert waits == [(errors.OTHER_RANK_GRACE_S, 2)]


def test_a_bug_is_not_reported_as_bad_input(assets, monkeypatch):
    """Only UserErrors become one-line messages: any other exception (a bug) keeps its traceback."""
    from dora_dist import cli, data

    def broken(*args, **kwargs):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(data, "load_raw", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(assets.train())


# --------------------------------------------------------------------------------------------------------------------
# docs/errors.md
# --------------------------------------------------------------------------------------------------------------------
DOC_HEAD = """# Bad input: what each error says

Every error caused by the input (config, command-line arguments, data, model, adapters, resume) is one line on stderr,
`dora_dist: error: <message>`, printed once (by rank 0 under torchrun or the deepspeed launcher), with exit code 2
on every rank and nothing written to the output directory. `--debug` (or `DORA_DIST_DEBUG=1`) adds the traceback.
Any other exception is a bug and keeps its traceback. What the config and the machine can tell (engine, GPU,
batch split, packages, local paths, resume directory) is checked before any process group, tokenizer or model work
(`dora_dist/preflight.py`); `python -m dora_dist.train --check ...` runs only those checks.

Under launchers (tested in `tests/integration/test_bad_inputs_launch.py`):

- `launch/torchrun.sh`, `multinode.sh`, `slurm.sh` and `deepspeed.sh` run `--check` for the job's world size first,
  so a config error is the one line and exit code 2, and no launcher starts.
- Under a bare `torchrun`, a rank that exits with 2 makes torchrun's agent print its own `ChildFailedError` report
  (a traceback of `torch/distributed/run.py`, with no frame of dora_dist's); the deepspeed launcher prints one
  `[ERROR]` log line.
- Rank 0 prints at once; any other rank first waits 10 s (`errors.OTHER_RANK_GRACE_S`), during which the launcher
  stops it when rank 0 failed too. An input only one non-zero rank meets (a file only its node cannot read) is
  printed by that rank, marked `(rank N)`, after the wait; the ranks waiting for it in a collective are stopped by
  the launcher (gloo may first print its own "Connection closed by peer" traceback), so nothing hangs.

This file is generated by `tests/integration/test_bad_inputs.py` from its list of cases, and the test fails when it
differs from what the code prints. Regenerate it with:

    DORA_DIST_WRITE_ERRORS_DOC=1 python -m pytest -q tests/integration/test_bad_inputs.py

Paths are shown as `<tmp>` (the test's temporary directory), `<cache>` (model.cache_dir) and `<builtin-model>`
(the built-in tiny Llama in the cache). Command: `dora-dist ...` (or `python -m dora_dist.train ...`), plus the
quick-run overrides `{quick}`.

| area | case | command (arguments beyond the quick run) | message |
|---|---|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(messages: dict[str, str], a: Assets) -> str:
    quick = " ".join(QUICK + ["model.cache_dir=<cache>", "output.dir=<tmp>/run"])
    rows = []
    skip = set(QUICK) | {f"model.cache_dir={a.cache}", f"output.dir={a.tmp / 'run'}"}
    for case in CASES:
        argv = [x for x in case.argv(a) if x not in skip]
        prog = "python -m dora_dist.train" if case.entry == "train" else "dora-dist"
        command = prog + " " + shlex.join(argv[1:] if case.entry == "train" else argv)
        extra = (
            [f"{k}={v}" for k, v in case.env]
            + [f"without {p}" for p in case.block]
            + ([f"{case.gpus} GPU(s) visible"] if case.gpus is not None else [])
            + (["run in <tmp>"] if case.chdir else [])
        )
        if extra:
            command += f" ({', '.join(extra)})"
        message = re.sub(case.library_text, "…", messages[case.id]) if case.library_text else messages[case.id]
        rows.append(f"| {case.area} | {_cell(case.name)} | `{_cell(normalise(command, a))}` | {_cell(message)} |")
    return DOC_HEAD.format(quick=quick) + "\n".join(rows) + "\n"


def test_errors_doc_matches_the_cases(assets, monkeypatch, capfd):
    """docs/errors.md is the table of CASES with the messages the code prints now (cases not yet run in this
    session are run here)."""
    for case in CASES:
        if case.id not in MESSAGES:
            with monkeypatch.context() as m:
                rc, out, err = run_case(case, assets, m, capfd)
            MESSAGES[case.id] = check_failure(case, assets, rc, out, err)
    text = render(MESSAGES, assets)
    if os.environ.get("DORA_DIST_WRITE_ERRORS_DOC") == "1":
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, (
        "docs/errors.md is out of date: regenerate with DORA_DIST_WRITE_ERRORS_DOC=1 (see its header)"
    )
