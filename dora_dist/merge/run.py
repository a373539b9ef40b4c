"""`dora-dist merge`: base + adapter -> a merged model directory, streamed one tensor at a time.

    dora-dist merge --adapter DIR [--base PATH|HUB_ID] --out DIR [--dtype auto|bfloat16|...]
                    [--onto trained|original] [--verify]

Peak memory is O(the largest tensor) whatever the model size (the tensor, its merged copy and fp32 row chunks;
the shard being read is memory-mapped). The output is written to a temporary directory beside --out and renamed
into place at the end, so an interrupted merge leaves nothing behind. An adapter trained on a 4-bit base (QDoRA)
is merged against the dequantized 4-bit weights it was trained with (`--onto original`: the original weights).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dora_dist.errors import ConfigError, InputNotFoundError, UserError
from dora_dist.merge.plan import MergePlan, build_plan
from dora_dist.merge.safetensors_io import planned_bytes, write_index, write_shard

#: files copied from the base (tokenizer files from the adapter directory when it has them)
CONFIG_FILES = ("generation_config.json",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
#: models up to this size also get the end-to-end logits comparisons (they load whole models)
E2E_MAX_BYTES = 2 << 30
PROMPTS = ("17 + 5 =", "count from 3 : 3 4 5", "The capital of France is")


class MergeError(UserError, ValueError):
    """Bad input to `dora-dist merge` (one line, exit code 2)."""


def check_out_dir(out: Path, adapter_dir: Path, base_dir: Path | None = None) -> None:
    """--out must not be (inside) the adapter or base directory, an existing file, or a directory of other files."""
    target = out.resolve()
    for what, d in (("adapter", adapter_dir), ("base model", base_dir)):
        if d is None:
            continue
        d = d.resolve()
        if target == d or d in target.parents:
            raise ConfigError(
                f"--out {out} is {'the' if target == d else 'inside the'} {what} directory "
                f"{d if what == 'base model' else adapter_dir}: the merged model would be mixed with the {what}'s "
                "files; give another --out (e.g. a sibling 'merged' directory)"
            )
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {out} is an existing file; give a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise ConfigError(
            f"--out {out} is a non-empty directory that holds no model (no config.json); give a new or empty "
            "directory (a previous merge's output is replaced)"
        )


def resolve_base_dir(base: str, cache_dir: str | None) -> Path:
    """A local directory, the built-in model, or a hub id (checked with dora_dist.hub, then fetched to the hub
    cache: its safetensors, configs and tokenizer files)."""
    from dora_dist.hub import check_hub_model, offline
    from dora_dist.models import resolve_base

    if base.startswith("builtin:"):
        return Path(resolve_base(base, cache_dir))
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputNotFoundError(f"--base: {base} is not a model directory (no config.json)")
        return path
    if base.startswith(("/", "./", "../", "~")) or base.count("/") != 1:
        raise InputNotFoundError(f"--base: no such directory: {base}; give a local model directory or a hub id")
    check_hub_model(base, "--base")
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json", "tokenizer.model", "merges.txt", "*.jinja"]
    return Path(snapshot_download(base, allow_patterns=patterns, local_files_only=offline("model")))


def output_config(plan: MergePlan, dtype_name: str) -> dict:
    """The base's config.json for the merged model: dense (no quantization_config), untied when a tied module
    was trained in full, and naming the output dtype."""
    config = json.loads((plan.base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    if plan.untie:
        for c in (config, config.get("text_config")):
            if isinstance(c, dict) and (c is config or "tie_word_embeddings" in c):
                c["tie_word_embeddings"] = False
    weights = [e for es in plan.shards.values() for e in es if e.dtype.is_floating_point]
    if weights:
        name = str(max(weights, key=lambda e: e.nbytes).dtype).replace("torch.", "")
        config["dtype"] = name if dtype_name == "auto" else dtype_name
        config.pop("torch_dtype", None)
    return config


def write_model(plan: MergePlan, tmp: Path, adapter_dir: Path, dtype_name: str) -> None:
    from tqdm.auto import tqdm

    from dora_dist.merge.tensors import produce

    total = sum(len(es) for es in plan.shards.values())
    with tqdm(total=total, unit="tensor", desc="merging", disable=None) as bar:
        for name, entries in plan.shards.items():

            def make(e, bar=bar):
                t = produce(plan, e.key, e.dtype)
                bar.update(1)
                return t

            write_shard(tmp / name, entries, make, {"format": "pt"})
    if plan.checkpoint.sharded:
        write_index(tmp, plan.shards)
    (tmp / "config.json").write_text(json.dumps(output_config(plan, dtype_name), indent=2) + "\n")
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else plan.base_dir
    for name in CONFIG_FILES:
        if (plan.base_dir / name).is_file():
            shutil.copyfile(plan.base_dir / name, tmp / name)
    for name in TOKENIZER_FILES:
        if (tok_src / name).is_file():
            shutil.copyfile(tok_src / name, tmp / name)


@contextlib.contextmanager
def freed_tensors_return_to_the_os():
    """Within the block, serve every allocation over 128 KiB from its own mmap (glibc), so a freed tensor goes back
    to the OS.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which tensors of that
    size come from the heap, which a stream of tensors of changing sizes fragments and grows: measured, that
    doubled the peak of a merge. A fixed threshold keeps the peak at the tensors alive at one time. Afterwards the
    threshold is left at 32 MiB, where glibc's own adjustment ends up after large frees. Elsewhere than glibc this
    does nothing."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        mallopt = None
    m_mmap_threshold = -3
    if mallopt is not None:
        mallopt(m_mmap_threshold, 128 * 1024)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(m_mmap_threshold, 32 * 1024 * 1024)


def check_disk(out: Path, plan: MergePlan) -> None:
    need = planned_bytes(plan.shards)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise MergeError(
            f"--out {out}: not enough disk space on {out.parent}: the merged model needs {need / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free; free space or give --out on another disk"
        )


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place (a previous merge's output is replaced)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def merge(
    adapter: str,
    out: str,
    base: str | None = None,
    dtype: str = "auto",
    onto: str = "trained",
    verify: bool = False,
) -> Path:
    """Stream-merge the adapter into its base and write the merged model to `out`; returns `out`."""
    from dora_dist.console import quiet_third_party
    from dora_dist.errors import AdapterError
    from dora_dist.generate import training_config

    adapter_dir, out_dir = Path(adapter), Path(out)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise InputNotFoundError(f"--adapter: {adapter_dir} is not an adapter directory (no adapter_config.json)")
    check_out_dir(out_dir, adapter_dir)
    try:
        base = base or json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    except ValueError as exc:
        raise AdapterError(f"{cfg_file} is not valid JSON: {exc}") from exc
    if not base:
        raise AdapterError(f"{cfg_file} names no base model (base_model_name_or_path); pass --base")
    training = training_config(adapter_dir)
    quiet_third_party()
    base_dir = resolve_base_dir(base, (training.get("model") or {}).get("cache_dir"))
    check_out_dir(out_dir, adapter_dir, base_dir)
    plan = build_plan(base_dir, adapter_dir, training, onto, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_disk(out_dir, plan)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.merging-", dir=out_dir.parent))
    lines = []
    try:
        with freed_tensors_return_to_the_os():
            write_model(plan, tmp, adapter_dir, dtype)
        if verify:
            from tqdm.auto import tqdm

            from dora_dist.merge.verify import verify_written

            n = sum(len(es) for es in plan.shards.values())
            with tqdm(total=n, unit="tensor", desc="verifying", disable=None) as bar, freed_tensors_return_to_the_os():
                v = verify_written(plan, tmp, bar)
            lines.append(
                f"[dora_dist] verified: {v['adapted']} merged weights within the rounding bound (worst "
                f"{v['worst_ratio']:.2g} of it), {v['dequantized']} dequantized 4-bit weights within their rounding, "
                f"{v['copied']} other tensors equal to the base's / adapter's"
            )
            if plan.checkpoint.total_bytes() <= E2E_MAX_BYTES:
                diff, effect = unmerged_logits_difference(plan, tmp)
                lines.append(
                    f"[dora_dist] logits on {len(PROMPTS)} prompts, float32: max |merged − (base + adapter)| = "
                    f"{diff:.3g} (the adapter itself moves them by up to {effect:.3g})"
                )
        if plan.quant is not None and not plan.quant.prequantized:
            lines.extend(quantized_report(plan, tmp))
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    what = "" if plan.quant is None else f" (onto its {plan.quant.quant_type} 4-bit weights, as trained)"
    print(f"[dora_dist] merged {adapter_dir} into {base}{what} -> {out_dir}")
    for line in lines:
        print(line)
    return out_dir


def quantized_report(plan: MergePlan, tmp: Path) -> list[str]:
    """How far merging onto the 4-bit weights (written) is from merging onto the original ones: per weight, and
    in logits on a few prompts for a model small enough to load twice."""
    from dora_dist.merge.verify import onto_original_difference

    rel = onto_original_difference(plan, tmp)
    lines = [
        f"[dora_dist] 4-bit vs original weights: merged weights differ by up to {rel:.3g} (relative, Frobenius); "
        "--onto original merges into the original weights instead"
    ]
    if plan.checkpoint.total_bytes() > E2E_MAX_BYTES:
        lines.append("[dora_dist] logits comparison skipped: the model is too large to load twice")
        return lines
    diff, effect = logits_difference(plan, tmp)
    lines.append(
        f"[dora_dist] logits on {len(PROMPTS)} prompts: max |merged onto 4-bit − merged onto original| = {diff:.4g} "
        f"(the adapter itself moves them by up to {effect:.4g})"
    )
    return lines


@torch.no_grad()
def logits_difference(plan: MergePlan, written: Path) -> tuple[float, float]:
    """(max |Δlogits| between the written merge and the merge onto the original weights, max |Δlogits| the
    adapter makes on the original base), float32, on PROMPTS."""
    from transformers import AutoModelForCausalLM

    from dora_dist.adapters import merge_and_unload
    from dora_dist.adapters.peft_format import load_adapter

    merged = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32).eval()
    ids = prompt_ids(written, merged.config.get_text_config().vocab_size)
    got = merged(input_ids=ids).logits
    del merged
    base = AutoModelForCausalLM.from_pretrained(plan.base_dir, dtype=torch.float32).eval()
    plain = base(input_ids=ids).logits
    adapter_dir = plan.adapter_dir
    original = merge_and_unload(load_adapter(base, adapter_dir, allow_lora=True)).eval()
    want = original(input_ids=ids).logits
    return float((got - want).abs().max()), float((want - plain).abs().max())


@torch.no_grad()
def unmerged_logits_difference(plan: MergePlan, written: Path) -> tuple[float, float]:
    """(max |Δlogits| between the written merge and the base + adapter unmerged, as trained (the 4-bit base for
    QDoRA), max |Δlogits| the adapter makes), float32 compute, on PROMPTS."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from dora_dist.adapters.peft_format import load_adapter

    merged = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32).eval()
    ids = prompt_ids(written, merged.config.get_text_config().vocab_size)
    got = merged(input_ids=ids).logits
    del merged
    kwargs: dict = {"dtype": torch.float32}
    q = plan.quant
    if q is not None:
        kwargs.update(dtype=q.load_dtype, device_map={"": "cpu"})
        if not q.prequantized:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=q.quant_type,
                bnb_4bit_use_double_quant=q.double_quant,
                bnb_4bit_compute_dtype=q.compute_dtype,
                bnb_4bit_quant_storage=q.quant_storage,
            )
    base = AutoModelForCausalLM.from_pretrained(plan.base_dir, **kwargs).eval()
    plain = base(input_ids=ids).logits.float()
    want = load_adapter(base, plan.adapter_dir, allow_lora=True).eval()(input_ids=ids).logits.float()
    return float((got - want).abs().max()), float((want - plain).abs().max())


def prompt_ids(model_dir: Path, vocab_size: int) -> torch.Tensor:
    """PROMPTS tokenized (padded with the first token), or fixed random ids when there is no usable tokenizer."""
    rows: list[list[int]] = []
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        rows = [list(tok(p)["input_ids"]) for p in PROMPTS]
    except Exception:  # noqa: BLE001 (no tokenizer files, or one transformers cannot build: random ids below)
        rows = []
    if not rows or not all(rows) or max(max(r) for r in rows) >= vocab_size:
        return torch.randint(0, vocab_size, (len(PROMPTS), 8), generator=torch.Generator().manual_seed(0))
    width = max(len(r) for r in rows)
    return torch.tensor([r + [r[0]] * (width - len(r)) for r in rows])
