"""`dora-dist generate`: text from a base model + a trained adapter, through transformers' `generate`.

    dora-dist generate --adapter outputs/quickstart/adapter --prompt "17 + 5 ="
    dora-dist generate --adapter DIR --prompts prompts.txt --temperature 0.8 --top-p 0.9 --seed 1
    dora-dist generate --adapter DIR --prompt "..." --merge            # fold W' into the weights first
    dora-dist generate --adapter DIR --prompt "..." --load-in-4bit     # NF4 base (QDoRA inference)

The base is --base, else the adapter's `base_model_name_or_path`. The adapter's training config (saved beside it
as training_config.yaml, or the run's config.yaml one level up) supplies the base dtype and the quantization, so
an adapter trained on a 4-bit base is run on the same 4-bit base. Prompts go through the tokenizer's chat
template when it has one (--no-chat-template: plain text, encoded as in training). Bad input (no adapter, a base
the adapter does not fit, an empty prompt) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dora_dist.errors import UserError, one_line

TRAINING_CONFIG = "training_config.yaml"  # written next to the adapter by the trainer


class GenerateError(UserError, ValueError):
    """Bad input to `dora-dist generate` (reported as one line, exit code 2)."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text with a base model + adapter (greedy or sampling)")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format, e.g. <output.dir>/adapter)")
    p.add_argument("--base", default=None, help="base model path or hub id (default: the adapter's base)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", default=None, help="one prompt")
    src.add_argument(
        "--prompts", default=None, help="a file: one prompt per line (.txt) or {'prompt': ...} per line (.jsonl)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights first")
    p.add_argument("--load-in-4bit", action="store_true", help="load the base in NF4 (bitsandbytes)")
    p.add_argument(
        "--no-chat-template", action="store_true", help="plain-text prompts even if the tokenizer has a chat template"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------
def training_config(adapter_dir: Path) -> dict:
    """The adapter's training config as a dict ({} when the adapter came from elsewhere)."""
    import yaml

    for path in (adapter_dir / TRAINING_CONFIG, adapter_dir.parent / "config.yaml"):
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            if isinstance(data, dict) and "model" in data:
                return data
    return {}


def job_config_for(adapter_dir: Path, base: str | None, load_in_4bit: bool, device: str):
    """A job Config describing how to load the base: the training config's model/quantization sections, with the
    base and the device given here."""
    from dora_dist.config import config_from_dict

    cfg_file = adapter_dir / "adapter_config.json"
    base = base or json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise GenerateError(f"{cfg_file} names no base model; pass --base")
    trained = training_config(adapter_dir)
    data: dict[str, Any] = {
        "model": dict(trained.get("model") or {}),
        "quantization": dict(trained.get("quantization") or {}),
        "training": {"precision": (trained.get("training") or {}).get("precision", "fp32"), "device": device},
    }
    data["model"].update(name_or_path=base, config=None)
    if load_in_4bit and data["quantization"].get("mode", "none") not in ("nf4", "fp4"):
        data["quantization"] = {"mode": "nf4", "compute_dtype": "float32" if device == "cpu" else "bfloat16"}
    return config_from_dict(data)


def load_for_generation(
    adapter: str, base: str | None = None, load_in_4bit: bool = False, merge: bool = False, device: str = "auto"
):
    """(model in eval mode, tokenizer) with the adapter applied (or merged). Raises GenerateError for bad input."""
    import torch

    from dora_dist import models
    from dora_dist.adapters import load_adapter, merge_and_unload
    from dora_dist.models.load_plan import LoadPlan

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise GenerateError(f"{adapter_dir} is not an adapter directory (no adapter_config.json)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = job_config_for(adapter_dir, base, load_in_4bit, device)
    base_name = cfg.model.name_or_path
    try:
        model = models.load_model(cfg, None, LoadPlan("direct", torch.device(device)))
    except (OSError, ValueError) as exc:
        raise GenerateError(f"cannot load the base model {base_name!r}: {one_line(exc)}") from exc
    try:
        load_adapter(model, adapter_dir, allow_lora=True)
    except ValueError as exc:
        raise GenerateError(
            f"the adapter in {adapter_dir} does not fit the base {base_name!r}: {one_line(exc)}"
        ) from exc
    if merge:
        # W' is formed in fp32 and rounded once into the base's dtype. A 16-bit merged weight cannot hold a
        # magnitude change below its half-ulp on rows whose s·B·A is as small (DoRALinear.merge); unmerged, the
        # scale stays fp32, so --merge trades that for speed.
        model = merge_and_unload(model)
    model.config.use_cache = True
    model.requires_grad_(False)
    model.eval()
    tok_src = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else models.resolve_model_path(cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------
# Prompts and generation
# --------------------------------------------------------------------------------------------------------
def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    if prompt is not None:
        if not prompt.strip():
            raise GenerateError("--prompt is empty")
        return [prompt]
    path = Path(prompts_file)
    if not path.is_file():
        raise GenerateError(f"--prompts: file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                line = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise GenerateError(f"{path}:{n}: expected a JSON object with a 'prompt' field ({exc})") from exc
            if not isinstance(line, str) or not line.strip():
                raise GenerateError(f"{path}:{n}: the prompt is empty")
        out.append(line)
    if not out:
        raise GenerateError(f"--prompts: {path} holds no prompt")
    return out


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Chat template (one user turn + the generation prompt) when `chat` and the tokenizer has one; else the
    plain text encoded as in training (BOS + text, no EOS)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    from dora_dist.data.tokenize import _bos

    return _bos(tokenizer) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """The generation arguments, checked before anything is loaded."""
    import math

    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise GenerateError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerateError(f"--top-p must be in (0, 1], got {top_p}")


def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = True,
) -> list[str]:
    """One completion per prompt (new text only). Greedy when temperature == 0."""
    import torch
    from transformers import set_seed

    check_sampling(max_new_tokens, temperature, top_p)
    set_seed(seed)
    device = next(model.parameters()).device
    sample = temperature > 0
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # greedy: unset the model's sampling defaults (generation_config) so transformers does not warn
        kwargs.update(temperature=None, top_p=None, top_k=None)
    outs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([encode_prompt(tokenizer, prompt, chat)], device=device)
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            outs.append(tokenizer.decode(seq[0, ids.shape[1] :], skip_special_tokens=True))
    return outs


def run(args: argparse.Namespace) -> int:
    """The `dora-dist generate` command; returns the exit code."""
    from dora_dist.console import quiet_third_party

    check_sampling(args.max_new_tokens, args.temperature, args.top_p)  # before any loading: fails in a second
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise GenerateError(f"--adapter: {args.adapter} is not an adapter directory (no adapter_config.json)")
    quiet_third_party()
    prompts = read_prompts(args.prompt, args.prompts)  # a UserError is reported by the CLI (one line, exit 2)
    model, tokenizer = load_for_generation(args.adapter, args.base, args.load_in_4bit, args.merge, args.device)
    outs = generate(
        model,
        tokenizer,
        prompts,
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.seed,
        chat=not args.no_chat_template,
    )
    for i, (prompt, text) in enumerate(zip(prompts, outs, strict=True)):
        if len(prompts) > 1:
            print(f"=== [{i + 1}/{len(prompts)}] {prompt}")
        print(text, flush=True)
    return 0
