"""Sequence classification with a small BERT-style encoder: DoRA on the attention projections, the classifier head
trained in full (modules_to_save), the adapter saved in PEFT format and reloaded by dora_dist and by peft.

Everything is made here, offline: a generated corpus of short reviews ("the soup was not very good"), an encoder
built from a config and pretrained on it as a masked language model, then adapted to classify sentiment, where
"not" flips the polarity, so the encoder must compose words, not just spot them.
Compared: training the new head alone (a linear probe of the frozen encoder) and DoRA + the head.

    python examples/encoder_classify.py            # about 1-2 minutes on 2 CPU cores
    python examples/encoder_classify.py --quick    # the test suite's mode
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from torch import nn

from dora_dist import DoRAConfig, apply_dora, load_adapter, save_adapter

TOPICS = {
    "film": ["movie", "film", "plot", "acting", "script", "director", "soundtrack", "ending"],
    "food": ["soup", "pasta", "service", "dessert", "waiter", "menu", "coffee", "pizza"],
    "sport": ["match", "team", "coach", "goal", "referee", "stadium", "season", "striker"],
}
POSITIVE = ["good", "great", "excellent", "wonderful", "superb", "lovely", "brilliant", "fine"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "poor", "dreadful", "weak", "bland"]
FILLER = {
    "det": ["the", "this", "that", "our"],
    "verb": ["was", "is", "seemed", "felt"],
    "adv": ["very", "really", "quite", "rather", "so"],
    "tail": ["overall", "today", "again", "honestly"],
}
SPECIALS = ["[PAD]", "[CLS]", "[UNK]", "[MASK]"]
TARGETS = ["query", "key", "value", "attention.output.dense"]


def vocabulary() -> dict[str, int]:
    words = [w for ws in TOPICS.values() for w in ws] + POSITIVE + NEGATIVE + ["not"]
    words += [w for ws in FILLER.values() for w in ws]
    return {w: i for i, w in enumerate(SPECIALS + sorted(set(words)))}


def make_corpus(n: int, seed: int) -> list[tuple[str, int, int]]:
    """(sentence, topic id, sentiment) triples; sentiment = adjective polarity, flipped by 'not'."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    out = []
    for _ in range(n):
        topic = rng.randrange(len(topics))
        positive = rng.random() < 0.5
        negated = rng.random() < 0.5
        words = [rng.choice(FILLER["det"]), rng.choice(TOPICS[topics[topic]]), rng.choice(FILLER["verb"])]
        if negated:
            words.append("not")
        if rng.random() < 0.5:
            words.append(rng.choice(FILLER["adv"]))
        words.append(rng.choice(POSITIVE if positive else NEGATIVE))
        if rng.random() < 0.3:
            words.append(rng.choice(FILLER["tail"]))
        out.append((" ".join(words), topic, int(positive != negated)))
    return out


def encode(corpus: list[tuple[str, int, int]], vocab: dict[str, int], max_len: int = 12):
    ids = torch.zeros(len(corpus), max_len, dtype=torch.long)
    for i, (text, _, _) in enumerate(corpus):
        toks = [vocab["[CLS]"]] + [vocab.get(w, vocab["[UNK]"]) for w in text.split()]
        ids[i, : len(toks)] = torch.tensor(toks[:max_len])
    topic = torch.tensor([c[1] for c in corpus])
    sentiment = torch.tensor([c[2] for c in corpus])
    return ids, (ids != 0).long(), topic, sentiment


def encoder_config(vocab_size: int, num_labels: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=num_labels,
    )


def fit(model: nn.Module, ids, mask, labels, epochs: int, lr: float, seed: int, batch: int = 32) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(ids), generator=g).split(batch):
            loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def logits_of(model: nn.Module, ids, mask) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids, attention_mask=mask).logits


def accuracy(model: nn.Module, ids, mask, labels) -> float:
    return float((logits_of(model, ids, mask).argmax(-1) == labels).float().mean())


def pretrain_base(out: Path, vocab: dict[str, int], train, args) -> Path:
    """Stage 1: masked-language-model pretraining of the encoder on the corpus (15% of the words masked), saved
    with a fresh 2-way classification head as the base model of stage 2."""
    from transformers import BertForMaskedLM, BertForSequenceClassification

    ids, mask, _, _ = train
    torch.manual_seed(args.seed)
    mlm = BertForMaskedLM(encoder_config(len(vocab), 2))
    opt = torch.optim.AdamW(mlm.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    mlm.train()
    for _ in range(args.pretrain_epochs):
        for idx in torch.randperm(len(ids), generator=g).split(32):
            x = ids[idx].clone()
            chosen = (torch.rand(x.shape, generator=g) < 0.15) & (x > vocab["[UNK]"])
            labels = torch.where(chosen, x, torch.full_like(x, -100))
            x[chosen] = vocab["[MASK]"]
            loss = mlm(input_ids=x, attention_mask=mask[idx], labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.manual_seed(args.seed + 1)
    base = BertForSequenceClassification(encoder_config(len(vocab), 2))
    missing = base.bert.load_state_dict(mlm.bert.state_dict(), strict=False).missing_keys
    assert all(k.startswith("pooler.") for k in missing), missing  # the MLM model has no pooler
    base.save_pretrained(out / "base")
    return out / "base"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller corpus, fewer epochs (used by the tests)")
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/examples/encoder_classify")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.pretrain_epochs, args.epochs = 1200, 3, 4
    import warnings

    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    torch.set_num_threads(1)  # tiny matmuls: more threads only add synchronisation
    t0 = time.perf_counter()
    out = Path(args.out)
    vocab = vocabulary()
    train = encode(make_corpus(args.train_size, seed=args.seed), vocab)
    test = encode(make_corpus(600, seed=10_000 + args.seed), vocab)
    t_ids, t_mask, _, t_sent = test
    base_dir = pretrain_base(out, vocab, train, args)

    def fresh():
        return BertForSequenceClassification.from_pretrained(base_dir)

    results: dict = {"args": vars(args)}
    base = fresh()
    results["base_sentiment_acc"] = accuracy(base, t_ids, t_mask, t_sent)

    # head only: the new classifier on the frozen encoder
    probe = fresh()
    probe.requires_grad_(False)
    probe.classifier.requires_grad_(True)
    fit(probe, train[0], train[1], train[3], args.epochs, args.lr, args.seed)
    results["head_only"] = {
        "acc": accuracy(probe, t_ids, t_mask, t_sent),
        "trainable": sum(p.numel() for p in probe.parameters() if p.requires_grad),
    }

    # DoRA on the attention projections + the classifier trained in full
    cfg = DoRAConfig(r=args.rank, alpha=2 * args.rank, target_modules=TARGETS, modules_to_save=["classifier"])
    torch.manual_seed(args.seed)
    model = apply_dora(fresh(), cfg)
    fit(model, train[0], train[1], train[3], args.epochs, args.lr, args.seed)
    results["dora"] = {
        "acc": accuracy(model, t_ids, t_mask, t_sent),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }
    y = logits_of(model, t_ids, t_mask)
    adapter_dir = save_adapter(model, out / "adapter")

    ours = logits_of(load_adapter(fresh(), adapter_dir), t_ids, t_mask)
    results["reload_max_abs_diff"] = float((ours - y).abs().max())
    try:
        from peft import PeftModel

        peft_logits = logits_of(PeftModel.from_pretrained(fresh(), str(adapter_dir)), t_ids, t_mask)
        results["peft_max_abs_diff"] = float((peft_logits - y).abs().max())
    except ImportError:
        results["peft_max_abs_diff"] = None
    results["logit_scale"] = float(y.abs().max())
    results["seconds"] = time.perf_counter() - t0

    print(f"sentiment of generated reviews, MLM-pretrained encoder ({args.train_size} train, 600 test)")
    print(f"  base with a new head:      acc {results['base_sentiment_acc']:.3f}")
    print(
        f"  head only (linear probe):  acc {results['head_only']['acc']:.3f}   trainable "
        f"{results['head_only']['trainable']:,}"
    )
    print(
        f"  DoRA r={args.rank} + head:          acc {results['dora']['acc']:.3f}   trainable "
        f"{results['dora']['trainable']:,} of {results['dora']['total']:,}"
    )
    print(
        f"  reloaded adapter: max |Δlogit| ours {results['reload_max_abs_diff']:.2e}, peft "
        f"{results['peft_max_abs_diff']:.2e} (logits up to {results['logit_scale']:.2f})"
    )
    print(f"({results['seconds']:.1f} s)")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
