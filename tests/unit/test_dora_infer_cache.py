"""The eval/no-grad scale cache of DoRALinear: the same output as the uncached path, reused while nothing changes,
recomputed after any change of A, B, m or the base weight, and after train()/eval() or merge/unmerge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dora_dist.nn.dora_linear import DoRALinear


def layer(seed: int = 0, base=None) -> DoRALinear:
    torch.manual_seed(seed)
    lyr = DoRALinear(base or nn.Linear(24, 16).double(), r=4, alpha=8.0, adapter_dtype=torch.float64)
    with torch.no_grad():
        lyr.lora_B.normal_(0, 0.3)
        lyr.magnitude.mul_(1.5)
    return lyr.eval()


def uncached(lyr: DoRALinear, x: torch.Tensor) -> torch.Tensor:
    """y = x·W'ᵀ + b with W' = m ⊙ (W + sBA)/‖W + sBA‖ formed explicitly (float64)."""
    with torch.no_grad():
        w = lyr.base_layer.weight + lyr.scaling * lyr.lora_B @ lyr.lora_A
        w_prime = lyr.magnitude[:, None] * w / w.norm(dim=1, keepdim=True)
        return x @ w_prime.t() + lyr.base_layer.bias


def test_cached_equals_uncached_and_is_reused(monkeypatch):
    lyr, x = layer(), torch.randn(3, 24, dtype=torch.float64)
    calls = []
    real = DoRALinear.weight_norm  # every path computes ‖W + sBA‖ through it
    monkeypatch.setattr(DoRALinear, "weight_norm", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    with torch.no_grad():
        y1, y2 = lyr(x), lyr(x)
    with torch.inference_mode():
        y3 = lyr(x)
    assert len(calls) == 1  # computed once, reused twice
    torch.testing.assert_close(y1, uncached(lyr, x), rtol=1e-12, atol=1e-12)
    assert torch.equal(y1, y2) and torch.equal(y1, y3)
    with torch.enable_grad():  # eval with grad: never from the cache
        lyr(x)
    lyr.train()
    with torch.no_grad():  # training mode: never from the cache
        lyr(x)
    assert len(calls) == 3 and lyr._scale_cache is None  # one norm per uncached forward


@pytest.mark.parametrize("change", ["lora_A", "lora_B", "magnitude", "base", "base_swap", "train_eval", "merge"])
def test_cache_invalidated(change):
    lyr, x = layer(), torch.randn(3, 24, dtype=torch.float64)
    with torch.no_grad():
        lyr(x)
        assert lyr._scale_cache is not None
        if change in ("lora_A", "lora_B", "magnitude"):
            getattr(lyr, change).mul_(0.7)
        elif change == "base":
            lyr.base_layer.weight.add_(0.5)
            lyr.base_row_sq = None  # (‖W‖² is documented as cached: invalidate_cache)
        elif change == "base_swap":
            lyr.base_layer.weight = nn.Parameter(lyr.base_layer.weight * 2, requires_grad=False)
            lyr.base_row_sq = None
        elif change == "train_eval":
            lyr.train().eval()
            assert lyr._scale_cache is None
            lyr.magnitude.data = lyr.magnitude.data * 0.5  # .data swaps storage without a version bump
        elif change == "merge":
            lyr.merge()
            assert lyr._scale_cache is None
            lyr.unmerge()
            assert lyr._scale_cache is None
            lyr.magnitude.mul_(0.7)
        got = lyr(x)
    torch.testing.assert_close(got, uncached(lyr, x), rtol=1e-10, atol=1e-10)


def test_cached_4bit_base_matches_uncached():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    q = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    q = q.to("cpu")
    lyr = DoRALinear(q, r=4, alpha=8.0)
    with torch.no_grad():
        lyr.lora_B.normal_(0, 0.3)
    lyr.eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        y_cached, y_again = lyr(x), lyr(x)
        DoRALinear.cache_inference_scale = False
        try:
            y_plain = lyr(x)
        finally:
            DoRALinear.cache_inference_scale = True
    assert torch.equal(y_cached, y_again)
    torch.testing.assert_close(y_cached, y_plain, rtol=1e-6, atol=1e-6)
