"""quant/split4bit.py: a tensor-parallel rank's part of a bitsandbytes 4-bit weight, cut from the packed codes.

Exact by construction (no re-quantization): the local dequantized weight equals the matching rows / columns of the
full dequantized weight bit for bit (torch.equal), with and without double quantization, NF4 and FP4, also where
blocks straddle rows (in_features=96, column-wise: the reference decode path). Widths that do not split into whole
blocks are refused in one line naming the layer and the width."""

from __future__ import annotations

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from dora_dist.quant.bnb import BnB4bitWeight  # noqa: E402
from dora_dist.quant.split4bit import split_linear4bit, split_width_problem  # noqa: E402


def _linear4bit(out_f: int, in_f: int, quant_type: str, nested: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    m = bnb.nn.Linear4bit(
        in_f, out_f, bias=False, compute_dtype=torch.float32, compress_statistics=nested, quant_type=quant_type
    )
    m.load_state_dict({"weight": torch.randn(out_f, in_f) / in_f**0.5})
    m = m.to("cpu")  # bitsandbytes quantizes here
    assert m.weight.quant_state.nested == nested
    return m


CASES = [
    ("colwise", 96, 128, 2),
    ("colwise", 8, 96, 2),  # blocks straddle rows; each rank's 4 × 96 values are 6 whole blocks
    ("rowwise", 96, 256, 2),
    ("rowwise", 32, 512, 4),
]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize(("kind", "out_f", "in_f", "tp"), CASES)
def test_local_dequantized_weight_is_the_slice_of_the_full_one(kind, out_f, in_f, tp, quant_type, nested):
    full_module = _linear4bit(out_f, in_f, quant_type, nested)
    full = BnB4bitWeight(full_module).dense(torch.float32)
    parts = []
    for rank in range(tp):
        module = copy.deepcopy(full_module)
        source = BnB4bitWeight(module)
        split_linear4bit("layers.0.proj", source, kind, rank, tp)
        local = source.dense(torch.float32)
        parts.append(local)
        want = full.chunk(tp, dim=0 if kind == "colwise" else 1)[rank]
        assert torch.equal(local, want), f"rank {rank}"
        assert (source.out_features, source.in_features) == tuple(want.shape)
        assert (module.out_features, module.in_features) == tuple(want.shape)
        assert not module.weight.quant_state.nested
        # the forward's matmul uses the local weight, whatever kernel decodes it
        x = torch.randn(3, want.shape[1])
        torch.testing.assert_close(source.matmul(x), x @ want.t(), rtol=1e-6, atol=1e-6)
        assert torch.equal(source.row_sq_norms(), want.pow(2).sum(dim=1))
    assert torch.equal(torch.cat(parts, dim=0 if kind == "colwise" else 1), full)


@pytest.mark.parametrize(
    ("kind", "out_f", "in_f", "tp", "needle"),
    [
        ("rowwise", 64, 192, 2, "input width 192 gives 96 columns per rank"),
        ("colwise", 6, 96, 2, "3 rows × 96 inputs"),
    ],
)
def test_width_not_in_whole_blocks_is_one_line_naming_layer_and_width(kind, out_f, in_f, tp, needle):
    msg = split_width_problem("model.layers.0.self_attn.o_proj", kind, out_f, in_f, tp, 64)
    assert msg is not None and "model.layers.0.self_attn.o_proj" in msg and needle in msg and "\n" not in msg
    module = _linear4bit(out_f, in_f, "nf4", True)
    with pytest.raises(ValueError, match="o_proj"):
        split_linear4bit("model.layers.0.self_attn.o_proj", BnB4bitWeight(module), kind, 0, tp)
    assert split_width_problem("x", kind, out_f, in_f * 2, tp, 64) is None
