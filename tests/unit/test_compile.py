"""training.compile (dora_dist/compile.py): a DoRA layer traces as one graph (no graph break), and a Llama whose
decoder blocks are torch.compile'd trains with the eager losses and gradients.

Tolerance: inductor reassociates fp32 sums and fuses elementwise ops; each output of a block is a sum of O(hidden)
rounded products, so compiled and eager agree to ~hidden·2⁻²⁴ relative: 1e-5 on the loss, 1e-4 relative to the
largest entry on the gradients (they pass through two blocks' backward). The per-layer graph-break check needs no
compiler; the end-to-end check runs inductor's C++ backend and is skipped without a C++ compiler.
"""

import shutil

import pytest
import torch
from torch import nn

from dora_dist import DoRALinear

HAVE_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_dora", [True, False])
def test_dora_layer_has_no_graph_break(bias, use_dora):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(32, 24, bias=bias), r=4, alpha=8, use_dora=use_dora)
    x = torch.randn(2, 5, 32, requires_grad=True)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_for_engine_refuses_zero():
    from dora_dist.compile import compile_for_engine

    with pytest.raises(ValueError, match="zero3"):
        compile_for_engine(nn.Linear(2, 2), "zero3")


@pytest.mark.slow  # inductor compiles C++ (about a minute on 2 cores)
@pytest.mark.skipif(not HAVE_CXX, reason="inductor's CPU backend needs a C++ compiler (g++/clang++)")
def test_compiled_blocks_equal_eager():
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from dora_dist.adapters import DoRAConfig, apply_dora
    from dora_dist.compile import compile_decoder_blocks
    from dora_dist.losses import causal_lm_loss_sum

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    eager = apply_dora(LlamaForCausalLM(cfg), DoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    compiled = copy.deepcopy(eager)
    assert compile_decoder_blocks(compiled) == 2
    names = [n for n, _ in compiled.named_parameters()]
    assert names == [n for n, _ in eager.named_parameters()]  # no _orig_mod prefixes
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (eager, compiled):
        loss = causal_lm_loss_sum(model, ids, None, ids, chunk_tokens=8)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.slow  # inductor compiles C++
@pytest.mark.skipif(not HAVE_CXX, reason="inductor's CPU backend needs a C++ compiler (g++/clang++)")
@pytest.mark.parametrize("use_dora", [True, False])
def test_compiled_layer_equals_eager(use_dora):
    """One DoRA (or LoRA) layer through inductor equals eager, forward and gradients. torch 2.13's inductor folds
    `torch.add(base, x·Aᵀ·Bᵀ, alpha=s)` into the GEMM with wrong values on the CPU (seen on AVX2 and AVX512
    code paths); the layer writes base + s·lora instead, and this test holds it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(32, 64), r=4, alpha=8, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    x = torch.randn(24, 32, requires_grad=True)
    compiled = torch.compile(layer.forward)
    outs = []
    for fn in (layer.forward, compiled):
        x.grad = None
        layer.zero_grad()
        y = fn(x)
        y.pow(2).sum().backward()
        outs.append((y.detach(), x.grad.clone(), layer.lora_B.grad.clone()))
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
