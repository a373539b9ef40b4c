"""DoRALinear over dense bases (nn.Linear with/without bias, transformers Conv1D): parity with peft 0.21.

Parity: our layer and peft's `LoraConfig(use_dora=True)` layer sit on identical bases with identical A, B (non-zero)
and m (perturbed away from ‖W‖). Outputs and the gradients of A, B, m and the input agree to rtol 1e-5 (atol 1e-6
of the tensor's largest value) in fp32, in train and eval mode, with and without dropout. With dropout the RNG is
seeded identically before each forward so both layers draw the same mask (peft's base runs on the clean input, its
DoRA path on the dropped one).
"""

import pytest
import torch
from _dora_helpers import (
    ALPHA,
    DENSE_KINDS,
    IN,
    MODES,
    OUT,
    R,
    assert_parity,
    close,
    dequantized,
    kind_params,
    make_base,
    randomize_adapter,
    run_parity,
)
from torch import nn

from dora_dist import DoRALinear


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", kind_params(DENSE_KINDS))
def test_parity_with_peft(kind, mode):
    _, _, results = run_parity(kind, mode)
    assert_parity(results)


@pytest.mark.parametrize("kind", kind_params(DENSE_KINDS[:1] + DENSE_KINDS[2:]))
def test_parity_with_peft_rslora(kind):
    ours, theirs, results = run_parity(kind, "train_dropout", use_rslora=True)
    assert ours.scaling == pytest.approx(ALPHA / R**0.5)
    assert_parity(results)


@pytest.mark.parametrize("kind", kind_params(DENSE_KINDS))
def test_plain_lora_mode_matches_peft_lora(kind):
    ours, _, results = run_parity(kind, "train_dropout", use_dora=False)
    assert ours.magnitude is None
    assert_parity(results)


def test_dropout_masks_differ_between_steps_and_eval_is_deterministic():
    """Sanity for the parity set-up: dropout really is active in training and off in eval."""
    layer = DoRALinear(make_base(DENSE_KINDS[0]), r=R, alpha=ALPHA, dropout=0.25)
    randomize_adapter(layer)
    x = torch.randn(4, IN)
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert not torch.allclose(y1, y2)
    layer.eval()
    ref = DoRALinear(make_base(DENSE_KINDS[0]), r=R, alpha=ALPHA, dropout=0.0)
    ref.load_state_dict(layer.state_dict())
    ref.eval()
    torch.manual_seed(0)
    ya = layer(x)
    torch.manual_seed(1)
    yb = layer(x)
    assert torch.equal(ya, yb)
    close(ya, ref(x))


@pytest.mark.parametrize("kind", kind_params(DENSE_KINDS))
def test_dropout_formula(kind):
    """y = x·Wᵀ + b + (scale − 1)·x_d·Wᵀ + scale·s·x_d·Aᵀ·Bᵀ with x_d the dropped input (peft's DoRA dropout path)."""
    layer = DoRALinear(make_base(kind), r=R, alpha=ALPHA, dropout=0.5)
    randomize_adapter(layer)
    layer.train()
    x = torch.randn(5, IN, dtype=torch.float64)
    torch.manual_seed(3)
    y = layer(x.float()).double()
    torch.manual_seed(3)
    xd = nn.functional.dropout(x.float(), 0.5, training=True).double()
    W = dequantized(layer.base_layer).double()
    A, B, m, s = layer.lora_A.double(), layer.lora_B.double(), layer.magnitude.double(), layer.scaling
    scale = m / torch.linalg.norm(W + s * B @ A, dim=1)
    bias = layer.base_layer.bias.double() if layer.base_layer.bias is not None else 0
    ref = x @ W.t() + bias + (scale - 1) * (xd @ W.t()) + scale * s * (xd @ A.t() @ B.t())
    close(y, ref, rtol=1e-5, atol_frac=1e-6)


@pytest.mark.parametrize("kind", kind_params(DENSE_KINDS))
def test_init_is_identity_and_magnitude_is_row_norm(kind):
    base = make_base(kind)
    ref_base = make_base(kind)
    layer = DoRALinear(base, r=R, alpha=ALPHA)
    assert layer.lora_A.shape == (R, IN) and layer.lora_B.shape == (OUT, R) and layer.magnitude.shape == (OUT,)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    close(layer.magnitude, torch.linalg.norm(dequantized(ref_base), dim=1))
    x = torch.randn(3, IN)
    close(layer(x), ref_base(x))
    assert layer.fan_in_fan_out == (kind.kind == "conv1d")


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
@pytest.mark.parametrize("kind", kind_params(DENSE_KINDS))
def test_merge_unmerge_round_trip(kind, use_dora):
    layer = DoRALinear(make_base(kind), r=R, alpha=ALPHA, use_dora=use_dora)
    randomize_adapter(layer)
    layer.eval()
    x = torch.randn(6, IN)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        W = dequantized(layer.base_layer).double()
        merged_ref = W + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        if use_dora:
            merged_ref = merged_ref * (layer.magnitude.double() / torch.linalg.norm(merged_ref, dim=1))[:, None]
        layer.merge()
        assert layer.merged
        close(dequantized(layer.base_layer).double(), merged_ref, rtol=1e-5, atol_frac=1e-6)
        close(layer(x), y)
        layer.merge()  # idempotent
        close(layer(x), y)
        layer.unmerge()
        assert not layer.merged
        close(layer.base_layer.weight.detach(), w0, rtol=1e-5, atol_frac=1e-6)
        close(layer(x), y)


def test_weight_norm_cache_follows_base_changes():
    layer = DoRALinear(make_base(DENSE_KINDS[0]), r=R, alpha=ALPHA)
    randomize_adapter(layer)
    before = layer.weight_norm().clone()
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)
    layer.invalidate_cache()
    after = layer.weight_norm()
    close(after, layer.weight_norm(exact=True))
    assert not torch.allclose(before, after)


def test_float64_layer_runs_in_float64():
    base = nn.Linear(IN, OUT).double()
    layer = DoRALinear(base, r=R, alpha=ALPHA, adapter_dtype=torch.float64)
    y = layer(torch.randn(2, IN, dtype=torch.float64))
    assert y.dtype == torch.float64
    assert layer.weight_norm().dtype == torch.float64


def test_layer_freezes_its_base_so_backward_computes_no_base_weight_grad():
    base = torch.nn.Linear(16, 8)
    assert base.weight.requires_grad
    layer = DoRALinear(base, r=2, alpha=4)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    layer(torch.randn(3, 16)).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora_A.grad is not None and layer.magnitude.grad is not None
