"""The DoRA paper's Figure 2, offline: how full fine-tuning, LoRA and DoRA change the magnitude and the direction of
the query/value weights over training.

The encoder and the sentiment task of `encoder_classify.py` (MLM-pretrained small BERT, generated reviews). Each
method trains from the same base and saves a checkpoint every few steps: full fine-tunes as model directories,
LoRA and DoRA as PEFT adapters. `dora-dist analyze` (dora_dist.analysis) then measures ΔM and ΔD per layer and
checkpoint, writes a scatter per method and the correlation of ΔD with ΔM. The paper reports a positive slope for
full fine-tuning and LoRA and a negative one for DoRA; this prints what these runs give.

    python examples/weight_decomposition.py            # about 2 minutes on 2 CPU cores
    python examples/weight_decomposition.py --quick    # the test suite's mode
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import encoder_classify as enc  # noqa: E402

from dora_dist import DoRAConfig, apply_dora, save_adapter  # noqa: E402
from dora_dist.analysis import analyze  # noqa: E402


def train_with_checkpoints(method: str, base_dir: Path, train, args, out: Path) -> list[Path]:
    """Train one method, saving every args.every steps; returns the checkpoint directories."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(args.seed)
    model = BertForSequenceClassification.from_pretrained(base_dir)
    if method == "full":
        lr = args.lr_full
    else:
        model = apply_dora(
            model,
            DoRAConfig(
                r=args.rank,
                alpha=2 * args.rank,
                target_modules=["query", "value"],
                modules_to_save=["classifier"],
                use_dora=method == "dora",
            ),
        )
        lr = args.lr
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    ids, mask, _, labels = train
    g = torch.Generator().manual_seed(args.seed)
    saved, step = [], 0
    model.train()
    while step < args.steps:
        for idx in torch.randperm(len(ids), generator=g).split(32):
            loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % args.every == 0:
                d = out / method / f"step-{step:04d}"
                save_adapter(model, d) if method != "full" else model.save_pretrained(d)
                saved.append(d)
            if step >= args.steps:
                break
    model.eval()
    return saved


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and checkpoints (used by the tests)")
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--every", type=int, default=40)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/examples/weight_decomposition")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.pretrain_epochs, args.steps, args.every = 600, 2, 30, 10
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(args.out)
    vocab = enc.vocabulary()
    train = enc.encode(enc.make_corpus(args.train_size, seed=args.seed), vocab)
    base_dir = enc.pretrain_base(out, vocab, train, args)
    tuned = []
    for method in ("full", "lora", "dora"):
        tuned += [f"{method}={d}" for d in train_with_checkpoints(method, base_dir, train, args, out)]
    result = analyze(base_dir, tuned, out / "analysis", layers=r"\.(query|value)$")
    result["seconds"] = time.perf_counter() - t0
    (out / "analysis" / "changes.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'analysis'} ({result['seconds']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
