"""The chunked lm_head + cross-entropy (dora_dist/losses.py) equals the plain whole-logits loss.

Tolerances: both sides are fp32 sums of the same per-token terms in a different order (logsumexp per chunk vs
log_softmax over all rows); the relative difference of a sum of n positive fp32 terms is bounded by ~n·2⁻²⁴, so
1e-6 relative holds for the few hundred tokens here. Gradients are the same products (softmax − one-hot)·W formed
chunk by chunk: 1e-5 relative to the largest entry. The float64 check compares with a float64 reference at 1e-12.
"""

import pytest
import torch
import torch.nn.functional as F

from dora_dist.losses import (
    ChunkedLinearCrossEntropy,
    causal_lm_loss_sum,
    chunkable_head,
    linear_cross_entropy_sum,
    plain_causal_lm_loss_sum,
)


def _tiny_llama(tied: bool, vocab: int = 97, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def _batch(vocab: int, b: int = 3, t: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that carries no loss
    labels[2, -3:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    return ids, mask, labels


def _close(a, b, rtol, atol_frac=0.0):
    a, b = a.detach().double(), b.detach().double()
    atol = atol_frac * b.abs().max().item()
    assert torch.allclose(a, b, rtol=rtol, atol=atol), (a - b).abs().max().item()


@pytest.mark.parametrize("chunk", [1, 5, 7, 1000])
def test_function_float64_matches_reference(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(31, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(31, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 31, (13,), generator=g)
    labels[[2, 9]] = -100
    ours = ChunkedLinearCrossEntropy.apply(h, w, bias, labels, chunk, -100)
    # the function accumulates its loss in fp32 by design; the reference is exact
    ref = F.cross_entropy(F.linear(h, w, bias), labels, ignore_index=-100, reduction="sum")
    _close(ours, ref, rtol=1e-6)
    go = torch.tensor(0.7, dtype=torch.float64)
    grads = torch.autograd.grad(ours, (h, w, bias), go)
    refs = torch.autograd.grad(ref, (h, w, bias), go)
    for a, b in zip(grads, refs, strict=True):
        _close(a, b, rtol=1e-6, atol_frac=1e-6)  # fp32 loss path; the gradients are float64 products


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk", [1, 8, 4096])
def test_model_loss_and_grads_equal_plain(tied, chunk):
    from dora_dist.adapters import DoRAConfig, apply_dora

    model = apply_dora(_tiny_llama(tied), DoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids, mask, labels = _batch(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    assert chunkable_head(model) is model.lm_head
    ref = plain_causal_lm_loss_sum(model, ids, mask, labels)
    ref_grads = torch.autograd.grad(ref, params)
    ours = causal_lm_loss_sum(model, ids, mask, labels, chunk_tokens=chunk)
    grads = torch.autograd.grad(ours, params)
    _close(ours, ref, rtol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        _close(a, b, rtol=1e-5, atol_frac=1e-5)
    # the head's plain forward is untouched outside a loss request
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (*ids.shape, model.config.vocab_size)


def test_trainable_tied_head_gets_the_same_gradient():
    model = _tiny_llama(tied=True)
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # tied: the embedding's gradient has two sources
    ids, mask, labels = _batch(model.config.vocab_size)
    (ref_g,) = torch.autograd.grad(plain_causal_lm_loss_sum(model, ids, mask, labels), [model.lm_head.weight])
    (our_g,) = torch.autograd.grad(causal_lm_loss_sum(model, ids, mask, labels, chunk_tokens=5), [model.lm_head.weight])
    _close(our_g, ref_g, rtol=1e-5, atol_frac=1e-5)


def test_bf16_model_matches_plain_bf16_loss():
    """Same bf16 matmuls, fp32 softmax on both sides: equal to fp32 rounding of the per-token terms."""
    model = _tiny_llama(tied=False, dtype=torch.bfloat16)
    ids, mask, labels = _batch(model.config.vocab_size)
    ref = plain_causal_lm_loss_sum(model, ids, mask, labels)
    ours = causal_lm_loss_sum(model, ids, mask, labels, chunk_tokens=4)
    assert ours.dtype == torch.float32
    _close(ours, ref, rtol=1e-6)


def test_chunk_zero_is_the_plain_loss_and_softcapped_models_fall_back():
    model = _tiny_llama(tied=False)
    ids, mask, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(
            causal_lm_loss_sum(model, ids, mask, labels, chunk_tokens=0),
            plain_causal_lm_loss_sum(model, ids, mask, labels),
        )
    model.config.final_logit_softcapping = 30.0
    assert chunkable_head(model) is None


def test_peak_memory_is_per_chunk():
    """The largest temporary is one chunk's (chunk × vocab) fp32 logits, not the whole (tokens × vocab)."""
    vocab, hidden, tokens, chunk = 4096, 16, 512, 32
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    from torch.profiler import ProfilerActivity, profile

    def peak(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        largest = 0
        for e in prof.events():
            largest = max(largest, e.cpu_memory_usage)
        return largest

    full = tokens * vocab * 4
    biggest = peak(lambda: linear_cross_entropy_sum(h, w, labels, chunk_tokens=chunk).backward())
    assert biggest <= 2 * chunk * vocab * 4 < full
    biggest_plain = peak(lambda: F.cross_entropy(F.linear(h, w).float(), labels, reduction="sum").backward())
    assert biggest_plain >= full
