"""One tensor-parallel rank's part of a bitsandbytes 4-bit weight, taken from the packed codes without re-quantizing.

bitsandbytes quantizes the row-major flattened (out, in) weight in blocks of `blocksize` consecutive values (one
absmax each, two codes per byte). A rank's part is therefore exact whenever its boundaries fall on block edges:

- column-wise (output rows [r0, r1) split): the codes and absmax of elements [r0·in, r1·in), which needs
  (out/tp)·in to be a whole number of blocks;
- row-wise (input columns [c0, c1) split): per row, the codes and absmax of columns [c0, c1), which needs in/tp to be
  a whole number of blocks (then every row is whole blocks too).

A double-quantized absmax is dequantized to fp32 first (what bitsandbytes' own dequantize does before it scales the
codes), and the local QuantState is not nested: the local dequantized weight equals the matching slice of the full
one bit for bit, so DoRA's norms over it (and their partial sums over tp) are those of the unsplit layer.
"""

from __future__ import annotations

from copy import copy
from typing import Any

import torch

from dora_dist.quant.bnb import BnB4bitWeight, _bnb, dequantize_absmax
from dora_dist.quant.decode4bit import packed_bytes


def split_width_problem(
    name: str, kind: str, out_features: int, in_features: int, tp: int, blocksize: int
) -> str | None:
    """Why `tp` cannot split the 4-bit layer `name` (out × in, blocks of `blocksize`) in whole quantization blocks,
    or None. `kind`: "colwise" (rows split) or "rowwise" (columns split)."""
    if kind == "colwise":
        rows = out_features // tp
        if (rows * in_features) % blocksize:
            return (
                f"parallel.tp={tp} cannot split the 4-bit layer {name} column-wise: each rank's {rows} rows × "
                f"{in_features} inputs are not whole quantization blocks of {blocksize}; use another parallel.tp or "
                "a dense base"
            )
        return None
    cols = in_features // tp
    if cols % blocksize:
        return (
            f"parallel.tp={tp} cannot split the 4-bit layer {name} row-wise: its input width {in_features} gives "
            f"{cols} columns per rank, not a multiple of the quantization block size {blocksize}; use a parallel.tp "
            f"that leaves a multiple of {blocksize} columns per rank, or a dense base"
        )
    return None


@torch.no_grad()
def split_packed(
    packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], blocksize: int, kind: str, rank: int, tp: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(local flat uint8 codes, local fp32 absmax, local shape) of rank `rank` of `tp`. `packed`: the flat uint8
    codes of the whole weight; `absmax`: its fp32 per-block scales (double quantization undone). Raises ValueError
    where the split does not fall on block edges (callers check split_width_problem first)."""
    out_f, in_f = shape
    if kind == "colwise":
        rows = out_f // tp
        e0, e1 = rank * rows * in_f, (rank + 1) * rows * in_f
        if e0 % blocksize or (e1 % blocksize and e1 != out_f * in_f):
            raise ValueError(f"rows [{rank * rows}, {(rank + 1) * rows}) are not whole 4-bit blocks of {blocksize}")
        return packed[e0 // 2 : e1 // 2].clone(), absmax[e0 // blocksize : -(-e1 // blocksize)].clone(), (rows, in_f)
    cols = in_f // tp
    if cols % blocksize:
        raise ValueError(f"{cols} columns per rank are not whole 4-bit blocks of {blocksize}")
    c0, c1 = rank * cols, (rank + 1) * cols
    codes = packed.view(out_f, in_f // 2)[:, c0 // 2 : c1 // 2].reshape(-1)
    scales = absmax.view(out_f, in_f // blocksize)[:, c0 // blocksize : c1 // blocksize].reshape(-1)
    return codes.clone(), scales.clone(), (out_f, cols)


@torch.no_grad()
def split_linear4bit(name: str, source: BnB4bitWeight, kind: str, rank: int, tp: int) -> None:
    """Replace the weight of `source`'s Linear4bit by this rank's part (a Params4bit with a non-nested QuantState),
    in place; the bias is left to the caller. Raises ValueError naming the layer where the width does not split."""
    module: Any = source.module
    qs = source.quant_state()  # a CPU-repacked weight is unpacked first
    out_f, in_f = int(qs.shape[0]), int(qs.shape[1])
    problem = split_width_problem(name, kind, out_f, in_f, tp, qs.blocksize)
    if problem:
        raise ValueError(problem)
    codes, scales, local_shape = split_packed(
        packed_bytes(module.weight.data), dequantize_absmax(qs), (out_f, in_f), qs.blocksize, kind, rank, tp
    )
    local_state = copy(qs)
    local_state.absmax, local_state.shape = scales, torch.Size(local_shape)
    local_state.nested, local_state.state2, local_state.offset = False, None, None
    weight = _bnb().nn.Params4bit(
        codes.view(-1, 1),
        requires_grad=False,
        quant_state=local_state,
        blocksize=qs.blocksize,
        compress_statistics=False,
        quant_type=qs.quant_type,
        quant_storage=torch.uint8,
        module=module,
        bnb_quantized=True,
    )
    module.weight = weight
    module.out_features, module.in_features = local_shape
