"""QDoRA from Python, without the trainer: a 4-bit (NF4) base, apply_dora, a plain training loop, save, merge.

The base is a small Llama built from a config and saved locally (no download), loaded back through transformers
with bitsandbytes 4-bit quantization (it runs on the CPU). The loop teaches it arithmetic progressions modulo its
vocabulary. Then the adapter is saved in PEFT format and merged into a dense model, whose logits are compared with
the 4-bit model + adapter.

    python examples/qdora_from_python.py            # about 1 minute on 2 CPU cores
    python examples/qdora_from_python.py --quick    # the test suite's mode
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dora_dist import DoRAConfig, apply_dora, dora_layers, merge_and_unload, save_adapter


def make_base(directory: Path, vocab: int, layers: int, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


def load_4bit(directory: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=q, device_map={"": "cpu"}, dtype=torch.float32
    )


def progressions(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    step = torch.randint(1, 7, (n, 1), generator=g)
    return (start + step * torch.arange(length)) % vocab


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (used by the tests)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/examples/qdora_from_python")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 25
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(args.out)
    base_dir = make_base(out / "base", args.vocab, args.layers, args.seed)

    # 1. a 4-bit base and DoRA on every linear layer but the head
    model = load_4bit(base_dir)
    n_4bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    torch.manual_seed(args.seed)
    model = apply_dora(model, DoRAConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # 2. a plain loop: AdamW on the adapter parameters only
    data = progressions(args.steps * 16, 24, args.vocab, args.seed)
    test = progressions(64, 24, args.vocab, args.seed + 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    with torch.no_grad():
        test_before = float(model.eval()(input_ids=test, labels=test).loss)
    model.train()
    losses = []
    for step in range(args.steps):
        batch = data[step * 16 : (step + 1) * 16]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=test).logits
        test_after = float(model(input_ids=test, labels=test).loss)

    # 3. save the adapter (PEFT format), then 4. merge into a dense model and save it
    save_adapter(model, out / "adapter", base_model_name_or_path=str(base_dir))
    n_layers = sum(1 for _ in dora_layers(model))
    merged = merge_and_unload(model)
    with torch.no_grad():
        merged_logits = merged(input_ids=test).logits
    merged.save_pretrained(out / "merged")
    diff = float((merged_logits - logits).abs().max())
    result = {
        "args": vars(args),
        "linear4bit_layers": n_4bit,
        "dora_layers": n_layers,
        "trainable": trainable,
        "loss_first": losses[0],
        "loss_last": sum(losses[-5:]) / len(losses[-5:]),
        "losses": losses,
        "test_loss_before": test_before,
        "test_loss_after": test_after,
        "merge_max_abs_diff": diff,
        "logit_scale": float(logits.abs().max()),
        "seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"NF4 base: {n_4bit} Linear4bit layers, DoRA on {n_layers}, {trainable:,} trainable parameters")
    print(
        f"train loss {losses[0]:.3f} -> {result['loss_last']:.3f} (mean of last 5) in {args.steps} steps; "
        f"held-out loss {test_before:.3f} -> {test_after:.3f}"
    )
    print(f"merged dense model vs 4-bit + adapter: max |Δlogit| {diff:.2e} (logits up to {result['logit_scale']:.1f})")
    print(f"wrote {out / 'adapter'} and {out / 'merged'} ({result['seconds']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
