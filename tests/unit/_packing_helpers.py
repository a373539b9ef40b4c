"""Shared by tests/unit/test_packing.py and tests/dist/engine_worker.py (FSDP2): a document's logits and loss packed
with neighbours against the same document alone, through the data path training uses (pack_documents, collate,
packed_forward_kwargs, causal_lm_loss_sum)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dora_dist.data import IGNORE_INDEX, TokenizedDataset
from dora_dist.data.packing import pack_documents
from dora_dist.losses import causal_lm_loss_sum, packed_forward_kwargs

#: Bound on |packed − alone| relative to max|logits| (or to the loss), from the unit roundoff u of the dtype: a
#: logit is a chain of 3 decoder layers of dot products of length ≤ 512 (tiny Llama), each with a worst-case error
#: γ_n ≈ n·u of its Σ|terms|; 1e-4 (fp32, u = 6e-8) and 1e-12 (fp64, u = 1.1e-16) sit at that order. A leak
#: between documents moves logits by O(1) (issue 22: 2.97).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-12}


def tiny_dora_model(cache: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """The built-in tiny Llama with DoRA on every linear layer, lora_B random (the adapters act), eval mode."""
    from transformers import AutoModelForCausalLM

    from dora_dist import DoRAConfig, apply_dora, dora_layers
    from dora_dist.config import load_config
    from dora_dist.models import load_tokenizer
    from dora_dist.models.builtin import ensure_builtin_model

    cfg = load_config(None, [f"model.cache_dir={cache}"])
    model = AutoModelForCausalLM.from_pretrained(ensure_builtin_model(cfg), dtype=dtype, attn_implementation=attn)
    adapter_dtype = {torch.float32: "float32", torch.float64: "float64"}[dtype]
    apply_dora(model, DoRAConfig(r=4, alpha=8, target_modules="all-linear", adapter_dtype=adapter_dtype))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in dora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return model.eval(), load_tokenizer(cfg)


def encoded_examples(tokenizer, fmt: str, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """n synthetic examples of a format, encoded as training encodes them."""
    from dora_dist.config import load_config
    from dora_dist.data import synthetic
    from dora_dist.data.tokenize import encode_example

    gen = {
        "text": lambda k: synthetic.text_examples(k, seed=seed, lines_per_example=1),
        "prompt_completion": lambda k: synthetic.prompt_completion_pairs(k, seed=seed),
        "chat": lambda k: synthetic.chat_examples(k, seed=seed),
    }[fmt]
    dcfg = load_config(None, [f"data.format={fmt}"]).data
    return [encode_example(row, fmt, tokenizer, dcfg) for row in gen(n)]


def _dataset(blocks, doc_lengths) -> TokenizedDataset:
    labels = [b[1] for b in blocks]
    return TokenizedDataset([b[0] for b in blocks], labels, [0] * len(blocks), "text", 0, doc_lengths)


def _row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits[:-1].to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def isolation_errors(model, examples, targets: list[int], neighbours: list[int]) -> dict[str, float]:
    """Each target packed with each neighbour (one block per pair, all pairs of a target in one padded batch), vs
    the target alone: max |Δ logits| / max |logits|, max relative Δ of the target's loss, and the relative Δ of the
    whole batch's training loss (chunked, causal_lm_loss_sum) against the sum of its documents' losses alone."""
    alone_logits, alone_loss = {}, {}
    for i in set(targets) | set(neighbours):
        ids, labels = examples[i]
        single = TokenizedDataset([ids], [labels], [0], "text", 0).collate([0])
        logits = model(**packed_forward_kwargs(model, single)).logits[0]
        alone_logits[i], alone_loss[i] = logits, _row_loss(logits, single["labels"][0])
    logit_err = loss_err = batch_err = 0.0
    scale = max(float(v.abs().max()) for v in alone_logits.values())
    for t in targets:
        blocks, lengths, spans = [], [], []
        for n in neighbours:
            seq_len = len(examples[n][0]) + len(examples[t][0])
            block, doc_lengths, _ = pack_documents([examples[n], examples[t]], seq_len)
            blocks += block
            lengths += doc_lengths
            first = len(examples[t][0]) > len(examples[n][0])  # best-fit decreasing: the longer one first
            start = 0 if first else len(examples[n][0])
            spans.append((start, start + len(examples[t][0])))
        batch = _dataset(blocks, lengths).collate(list(range(len(blocks))))
        logits = model(**packed_forward_kwargs(model, batch)).logits
        for row, (a, b) in enumerate(spans):
            logit_err = max(logit_err, float((logits[row, a:b] - alone_logits[t]).abs().max()) / scale)
            labels = torch.full_like(batch["labels"][row], IGNORE_INDEX)
            labels[a:b] = batch["labels"][row, a:b]
            loss = _row_loss(logits[row], labels)
            loss_err = max(loss_err, abs(float(loss - alone_loss[t])) / abs(float(alone_loss[t])))
        total = causal_lm_loss_sum(
            model, batch["input_ids"], None, batch["labels"], chunk_tokens=37, position_ids=batch["position_ids"]
        )
        expected = sum(float(alone_loss[n] + alone_loss[t]) for n in neighbours)
        batch_err = max(batch_err, abs(float(total) - expected) / expected)
    return {"logits": logit_err, "loss": loss_err, "batch_loss": batch_err}
