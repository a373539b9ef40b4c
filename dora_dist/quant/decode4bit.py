"""bitsandbytes' 4-bit format decoded in plain torch, the same on every CPU and GPU.

bitsandbytes quantizes a 4-bit weight over the *flattened* (out·in) values: one absmax per block of `blocksize`
consecutive values, two 4-bit codes per byte (high nibble first), the value being code_book[code] · absmax. Its
kernels do not all decode that format alike: on CPUs where torch reports the "AVX512" capability, bitsandbytes
0.50's native CPU dequantize assumes that every row starts a new block, so for `in_features % blocksize != 0` it
returns other values than the ones that were quantized (tested: every element can be off). With in_features a
multiple of the block size (every linear layer of a real LLM) all its kernels agree with this decode.

This module is the project's reference decode. `BnB4bitWeight` uses bitsandbytes' fast kernels only where they
agree with it (`bnb_decode_is_exact`) and this decode otherwise, so the DoRA norm is always taken over the weight
the forward multiplies by, whatever the CPU.

Also here: undoing bitsandbytes' in-place CPU repacking (`Linear4bit.forward` in eval mode on AVX512-BF16 CPUs
re-lays the codes out for its gemv kernel and casts the absmax to bf16).
"""

from __future__ import annotations

import torch
from torch import nn

# bitsandbytes' 4-bit code books (bitsandbytes.functional.get_4bit_type), exact fp32 values.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
FP4_CODE = (
    0.0,
    0.0052083334885537624,
    0.6666666865348816,
    1.0,
    0.3333333432674408,
    0.5,
    0.1666666716337204,
    0.25,
    0.0,
    -0.0052083334885537624,
    -0.6666666865348816,
    -1.0,
    -0.3333333432674408,
    -0.5,
    -0.1666666716337204,
    -0.25,
)
CPU_REPACK_BLOCK_N = 32  # rows per tile in bitsandbytes' CPU repacked layout (_convert_weight_packed_for_cpu)


def code_book(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32, device=device)


def bnb_decode_is_exact(in_features: int, blocksize: int) -> bool:
    """Whether every bitsandbytes 4-bit dequantize kernel gives the reference values for this shape: true when
    no quantization block straddles two rows."""
    return in_features % blocksize == 0


def packed_bytes(data: torch.Tensor) -> torch.Tensor:
    """The packed 4-bit codes as a flat uint8 tensor, whatever `quant_storage` dtype bitsandbytes stored them in
    (bfloat16 storage is the FSDP-QLoRA convention: the same bytes, two bytes per element)."""
    flat = data.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def decode_elements(
    packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, start: int, stop: int
) -> torch.Tensor:
    """fp32 values [start, stop) of the flattened weight. `packed`: flat uint8 codes of the whole weight; `absmax`:
    fp32 per-block scales of the whole weight (double quantization already undone). `start` must be even."""
    if start % 2:
        raise ValueError(f"4-bit decode must start on a byte boundary (an even element), got {start}")
    data = packed[start // 2 : (stop + 1) // 2]
    codes = torch.stack([data >> 4, data & 0xF], dim=-1).reshape(-1)[: stop - start].long()
    values = code_book(quant_type, packed.device)[codes]
    blocks = torch.arange(start, stop, device=packed.device) // blocksize
    return values * absmax[blocks].float()


def unpack_cpu_repacked(param: nn.Parameter) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight in place, losslessly with respect to the repacked state.

    The repacked layout tiles the codes for bitsandbytes' AVX512-BF16 gemv and stores the absmax transposed in bf16.
    bitsandbytes' own inverse re-quantizes the absmax (and leaves it transposed when there was no double quant), so
    the values change again; here the codes go back to the flat layout and the absmax becomes the fp32 copy of the
    bf16 values the repacked kernel multiplied by: the decoded weight is exactly the one that kernel used.
    """
    qs = param.quant_state  # type: ignore[attr-defined]  # a bitsandbytes Params4bit
    out_f, in_f = int(qs.shape[0]), int(qs.shape[1])
    tiles = param.data.view(torch.uint8).reshape(-1, CPU_REPACK_BLOCK_N)
    nibbles = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # (tiles, 64): low half, high half
    codes = nibbles.reshape(out_f // CPU_REPACK_BLOCK_N, in_f // 2, CPU_REPACK_BLOCK_N, 2)
    codes = codes.transpose(1, 2).reshape(-1)  # flat (out·in,) codes, row-major
    flat = (codes[0::2] << 4) | codes[1::2]
    storage = getattr(qs, "original_storage_type", None) or torch.uint8
    qshape = tuple(getattr(qs, "original_qshape", None) or (flat.numel(), 1))
    param.data = flat.reshape(qshape).view(storage) if storage != torch.uint8 else flat.reshape(qshape)
    qs.absmax = qs.absmax.t().reshape(-1).float()  # (in/bs, out) bf16 -> flat fp32
    qs.nested, qs.state2, qs.offset = False, None, None
    qs.dtype = getattr(qs, "original_dtype", None) or qs.dtype
    qs.packing_format_for_cpu = False
