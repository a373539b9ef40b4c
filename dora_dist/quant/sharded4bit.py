"""A 4-bit weight that FSDP2 shards by output rows and all-gathers packed (QDoRA under FSDP2).

bitsandbytes stores a 4-bit weight as a flat byte array (two codes per byte) plus one absmax per block of
`blocksize` consecutive elements of the *flattened* weight, optionally double-quantized (absmax itself stored as
uint8 codes with one fp32 scale per 256 blocks, plus a global offset). Neither the flat blocks nor the 256-block
groups respect row boundaries, so slicing bnb's tensors at an arbitrary row breaks them, which is why a
`Params4bit` under `fully_shard` fails.

`Sharded4bitTensor` re-lays the *same* quantized state out by rows. Row i gets one record of bytes (one row of a
single (out, row_bytes) uint8 tensor, so every row range is self-contained and FSDP2 sees one buffer):

    scales2  K2 float32   nested only: the second-level fp32 absmax of the 256-block groups row i touches
    scales   K1 uint8 (double-quant codes) | float32   the first-level absmax slots of the blocks row i touches
    rowmeta  2 int32      [phase of row i inside its first block, index of that block inside its 256-group]
    packed   in/2 uint8   the bnb codes of row i, unchanged (bnb packs the high nibble first)

A block that straddles two rows has its absmax stored in both rows' slots (likewise a 256-group), so no block
straddles a shard boundary whatever the row split; when `in % blocksize == 0` (every LLM linear) there is no
duplication and K1 = in/blocksize. Overhead over bnb: ≤ one slot + 8 bytes + alignment per row of in/2 bytes
(≈ 0.53 bytes per weight for blocksize 64 with double quant, vs 2 for bf16). Dequantization is
`lut[code] * absmax` in fp32, the absmax being `code2[q] * absmax2 + offset` in fp32 when nested, then one cast:
the same operations in the same order as bitsandbytes, so the values are bit-identical to
`bitsandbytes.functional.dequantize_4bit` (tested for nf4/fp4, ± double quant, fp32/bf16/fp16).

FSDP2 integration (torch.distributed.fsdp.fully_shard, the tensor-subclass all-gather extensions):
- `fully_shard` splits the tensor with `torch.chunk(dim=0)`: the row records are split along the rows (even
  sharding: `out % world_size == 0`, true for LLM linears; an uneven split raises a clear error).
- `fsdp_pre_all_gather` hands FSDP the local row records (one uint8 tensor, no copy): the all-gather moves the
  packed bytes and scales only.
- `fsdp_post_all_gather` dequantizes the gathered rows into a plain dense (out, in) tensor of FSDP's param dtype
  (row chunk by row chunk, so the fp32 temporary stays small), which is what the forward/backward matmul uses; FSDP
  frees it (and the gathered bytes) at reshard, and re-dequantizes in place (`out=`) on the next all-gather.
Outside forward the parameter is a DTensor whose local tensor is this subclass holding only the rank's rows, so
row norms (DoRA's ‖W‖² and magnitude init) are computed from the local packed shard with no communication.

No dependency on torchao; bitsandbytes is needed only to quantize a dense weight or convert a bnb layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dora_dist.quant.decode4bit import FP4_CODE, NF4_CODE, code_book  # noqa: F401 (re-exported)
from dora_dist.quant.sharded4bit_ops import OPS as _OPS

aten = torch.ops.aten

DQ_GROUP = 256  # bitsandbytes' blocksize for the second (double) quantization of the absmax values
DEQUANT_CHUNK_ELEMENTS = 1 << 20  # values per dequantization chunk on the CPU (~13 bytes of temporaries each)
DEQUANT_CHUNK_ELEMENTS_CUDA = 1 << 23  # fewer, larger kernels on GPUs (~100 MiB of temporaries)


# ------------------------------------------------------------------------------------------------------------
# row layout
# ------------------------------------------------------------------------------------------------------------
def row_layout(
    out_features: int, in_features: int, blocksize: int, nested: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Per-row block geometry of bnb's flat layout: (first block b0, phase p1, blocks per row nb, K1, K2)."""
    if in_features % 2:
        raise ValueError(f"Sharded4bitTensor needs an even in_features (two codes per byte per row), got {in_features}")
    i = torch.arange(out_features, dtype=torch.int64, device="cpu")  # geometry only: always on the CPU
    start = i * in_features
    b0 = start // blocksize
    p1 = start - b0 * blocksize
    nb = (start + in_features - 1) // blocksize - b0 + 1
    k1 = int(nb.max()) if out_features else 1
    if nested:
        q = b0 % DQ_GROUP
        k2 = int(((q + nb - 1) // DQ_GROUP + 1).max()) if out_features else 1
    else:
        q = torch.zeros_like(b0)
        k2 = 0
    return b0, p1, nb, q, k1, k2


class _Meta:
    """Non-tensor state shared by all shards of one weight (replicated, never sharded)."""

    __slots__ = (
        "quant_type",
        "blocksize",
        "nested",
        "offset",
        "code2",
        "k1",
        "k2",
        "n_in",
        "o_s2",
        "o_s1",
        "o_rm",
        "o_pk",
        "row_bytes",
    )

    def __init__(
        self,
        quant_type: str,
        blocksize: int,
        nested: bool,
        offset: float | None,
        code2: torch.Tensor | None,
        k1: int,
        k2: int,
        n_in: int,
    ) -> None:
        self.quant_type, self.blocksize, self.nested = quant_type, int(blocksize), bool(nested)
        self.offset = float(offset) if offset is not None else 0.0  # an fp32 value, exact as a Python float
        self.code2 = code2  # (256,) fp32 code book of the double quantization, or None
        self.k1, self.k2, self.n_in = int(k1), int(k2), int(n_in)
        # One row record of bytes: [scales2 fp32 | scales (fp32, or uint8 codes if nested) | rowmeta int32 x2 |
        # packed codes], 4-byte aligned, so every field is a strided view of one (rows, row_bytes) uint8 tensor
        # and FSDP2 all-gathers a single buffer.
        self.o_s2 = 0
        self.o_s1 = 4 * self.k2 if self.nested else 0
        self.o_rm = _align4(self.o_s1 + (self.k1 if self.nested else 4 * self.k1))
        self.o_pk = self.o_rm + 8
        self.row_bytes = _align4(self.o_pk + self.n_in // 2)

    def to(self, device: torch.device | str | None) -> _Meta:
        code2 = self.code2.to(device) if self.code2 is not None else None
        return _Meta(self.quant_type, self.blocksize, self.nested, self.offset, code2, self.k1, self.k2, self.n_in)

    def same_format(self, other: _Meta) -> bool:
        return (self.quant_type, self.blocksize, self.nested, self.k1, self.k2, self.n_in) == (
            other.quant_type,
            other.blocksize,
            other.nested,
            other.k1,
            other.k2,
            other.n_in,
        )


def _align4(n: int) -> int:
    return (n + 3) // 4 * 4


class Sharded4bitTensor(torch.Tensor):
    """A frozen (rows, in) 4-bit weight in bitsandbytes' numerics, laid out so any row range is self-contained."""

    @staticmethod
    def __new__(
        cls, qdata: torch.Tensor, meta: _Meta, shape: Sequence[int], dtype: torch.dtype, requires_grad: bool = False
    ) -> Sharded4bitTensor:
        shape = torch.Size(shape)
        stride = (shape[1], 1) if len(shape) == 2 else (1,)
        return torch.Tensor._make_wrapper_subclass(  # an instance of cls
            cls, shape, stride, 0, dtype=dtype, device=qdata.device, requires_grad=requires_grad
        )

    def __init__(
        self,
        qdata: torch.Tensor,
        meta: _Meta,
        shape: Sequence[int],
        dtype: torch.dtype,
        requires_grad: bool = False,
    ) -> None:
        if qdata.dim() != 2 or qdata.shape[1] != meta.row_bytes or qdata.dtype != torch.uint8:
            raise ValueError(
                f"bad 4-bit row records {tuple(qdata.shape)} {qdata.dtype}, expected (rows, {meta.row_bytes}) uint8"
            )
        self.qdata, self.meta = qdata, meta  # (rows, row_bytes) uint8: the only tensor FSDP2 sees and gathers

    # --- the fields, as views of the row records ---------------------------------------------------------
    def _field(self, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        return self.qdata[:, offset : offset + nbytes].view(dtype)

    @property
    def packed(self) -> torch.Tensor:
        return self._field(self.meta.o_pk, self.meta.n_in // 2, torch.uint8)

    @property
    def scales(self) -> torch.Tensor:
        m = self.meta
        return self._field(m.o_s1, m.k1, torch.uint8) if m.nested else self._field(m.o_s1, 4 * m.k1, torch.float32)

    @property
    def scales2(self) -> torch.Tensor | None:
        m = self.meta
        return self._field(m.o_s2, 4 * m.k2, torch.float32) if m.nested else None

    @property
    def rowmeta(self) -> torch.Tensor:
        return self._field(self.meta.o_rm, 8, torch.int32)

    @classmethod
    def assemble(
        cls,
        packed: torch.Tensor,
        scales: torch.Tensor,
        scales2: torch.Tensor | None,
        rowmeta: torch.Tensor,
        meta: _Meta,
        shape: Sequence[int],
        dtype: torch.dtype,
    ) -> Sharded4bitTensor:
        """Pack the fields into row records."""
        qdata = torch.zeros(packed.shape[0], meta.row_bytes, dtype=torch.uint8, device=packed.device)
        t = cls(qdata, meta, shape, dtype)
        t.packed.copy_(packed)
        t.scales.copy_(scales)
        if meta.nested:
            t.scales2.copy_(scales2)  # type: ignore[union-attr, arg-type]  # both present exactly when nested
        t.rowmeta.copy_(rowmeta)
        return t

    # --- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_bnb(
        cls,
        packed: torch.Tensor,
        quant_state: Any,
        dtype: torch.dtype | None = None,
        rows: tuple[int, int] | None = None,
    ) -> Sharded4bitTensor:
        """Re-lay out a bitsandbytes 4-bit state (packed bytes + QuantState) by rows. Exact: no re-quantization.

        rows=(r0, r1) keeps only those rows of the (out, in) weight; `packed` may then hold just their bytes
        ((r1 - r0)·in/2 of them) while the quant_state describes the whole weight (its absmax is small).
        """
        out_f, in_f = int(quant_state.shape[0]), int(quant_state.shape[1])
        bs, nested = int(quant_state.blocksize), bool(quant_state.nested)
        dtype = dtype or quant_state.dtype
        device = packed.device
        r0, r1 = rows if rows is not None else (0, out_f)
        b0, p1, nb, q, k1, k2 = row_layout(out_f, in_f, bs, nested)
        b0, p1, nb, q = (t[r0:r1].to(device) for t in (b0, p1, nb, q))
        flat = packed.reshape(-1).view(torch.uint8)
        if flat.numel() * 2 < out_f * in_f:  # only the kept rows' bytes were given
            rows_t = flat[: (r1 - r0) * in_f // 2]
        else:
            rows_t = flat[r0 * in_f // 2 : r1 * in_f // 2]
        packed_rows = rows_t.reshape(r1 - r0, in_f // 2).clone()
        out_f = r1 - r0
        absmax = quant_state.absmax.reshape(-1)
        slot = torch.arange(k1, device=device)
        idx1 = (b0[:, None] + slot[None, :]).clamp_max(absmax.numel() - 1)
        valid1 = slot[None, :] < nb[:, None]
        scales = torch.where(valid1, absmax[idx1], torch.zeros((), dtype=absmax.dtype, device=device))
        scales2, code2, offset = None, None, None
        if nested:
            absmax2 = quant_state.state2.absmax.reshape(-1).float()
            g0 = b0 // DQ_GROUP
            ng = (q + nb - 1) // DQ_GROUP + 1
            slot2 = torch.arange(k2, device=device)
            idx2 = (g0[:, None] + slot2[None, :]).clamp_max(absmax2.numel() - 1)
            scales2 = torch.where(slot2[None, :] < ng[:, None], absmax2[idx2], torch.zeros((), device=device))
            code2 = quant_state.state2.code.float().to(device)
            offset = float(quant_state.offset)
        else:
            scales = scales.float()
        rowmeta = torch.stack([p1, q], dim=1).to(torch.int32)
        meta = _Meta(quant_state.quant_type, bs, nested, offset, code2, k1, k2, in_f)
        return cls.assemble(packed_rows, scales, scales2, rowmeta, meta, (out_f, in_f), dtype)

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: torch.dtype | None = None,
    ) -> Sharded4bitTensor:
        """Quantize a dense (out, in) weight exactly as bitsandbytes.functional.quantize_4bit does."""
        packed, qs = quantize_4bit_bnb(weight, quant_type, blocksize, double_quant)
        return cls.from_bnb(packed, qs, dtype or weight.dtype)

    @classmethod
    def from_linear4bit(cls, module: nn.Module, dtype: torch.dtype | None = None) -> Sharded4bitTensor:
        """From a bitsandbytes Linear4bit (its packed weight and quant_state)."""
        linear4bit: Any = module  # bitsandbytes' Linear4bit and Params4bit carry no type information
        weight = linear4bit.weight
        qs = weight.quant_state
        if qs is None:
            raise ValueError("the Linear4bit weight is not quantized yet (no quant_state)")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("this Linear4bit was repacked for bitsandbytes' CPU kernel; convert it before inference")
        return cls.from_bnb(weight.data, qs, dtype or linear4bit.compute_dtype or qs.dtype)

    @classmethod
    def empty(
        cls,
        out_features: int,
        in_features: int,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> Sharded4bitTensor:
        """Uninitialised storage with the right inner shapes (e.g. on the meta device, filled later by copy_)."""
        _, _, _, _, k1, k2 = row_layout(out_features, in_features, blocksize, double_quant)
        meta = _Meta(quant_type, blocksize, double_quant, 0.0, None, k1, k2, in_features)
        qdata = torch.empty(out_features, meta.row_bytes, dtype=torch.uint8, device=device)
        return cls(qdata, meta, (out_features, in_features), dtype)

    # --- tensor subclass protocol ----------------------------------------------------------------------
    def __tensor_flatten__(self) -> tuple[list[str], tuple[_Meta, torch.Size, torch.dtype]]:
        return ["qdata"], (self.meta, self.shape, self.dtype)

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], ctx: tuple[_Meta, torch.Size, torch.dtype], outer_size: Any, outer_stride: Any
    ) -> Sharded4bitTensor:
        meta, shape, dtype = ctx
        return Sharded4bitTensor(inner["qdata"], meta, shape, dtype)

    def _with(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        dtype: torch.dtype | None = None,
        meta: _Meta | None = None,
    ) -> Sharded4bitTensor:
        """Apply fn to the row records (an op that keeps the row structure)."""
        qdata = fn(self.qdata)
        return Sharded4bitTensor(qdata, meta or self.meta, (qdata.shape[0], self.shape[1]), dtype or self.dtype)

    def __repr__(self) -> str:  # type: ignore[override]  # torch's has a keyword-only tensor_contents
        m = self.meta
        return (
            f"Sharded4bitTensor(shape={tuple(self.shape)}, dtype={self.dtype}, {m.quant_type}, "
            f"blocksize={m.blocksize}, double_quant={m.nested}, device={self.device})"
        )

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, Sharded4bitTensor) and not isinstance(x, Sharded4bitTensor):
                out = Linear4bitFunction.apply(x, w)  # type: ignore[no-untyped-call]  # torch's own
                return out + bias.to(out.dtype) if bias is not None else out
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]  # torch declares it without func
        cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        handler = _OPS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"Sharded4bitTensor does not support {func}; dequantize first (t.dequantize()) for dense math"
            )
        return handler(func, *args, **kwargs)

    # --- FSDP2 all-gather extensions ----------------------------------------------------------------------
    def fsdp_pre_all_gather(
        self, mesh: Any, outer_size: Any, outer_stride: Any, module: Any, mp_policy: Any
    ) -> tuple[tuple[torch.Tensor], tuple[_Meta, torch.Size]]:
        """What FSDP2 all-gathers: the packed bytes and scales of the local rows (no dequantization)."""
        world = mesh.size()
        if outer_size[0] % world:  # same answer on every rank: no rank is left waiting in the collective
            raise ValueError(
                f"a 4-bit weight of shape {tuple(outer_size)} cannot be sharded evenly over {world} "
                "ranks; FSDP2 sharding of Sharded4bitTensor needs out_features divisible by the world size "
                "(by parallel.shard_group under HSDP)"
            )
        return (self.qdata,), (self.meta, torch.Size(outer_size))

    @torch.no_grad()
    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: tuple[_Meta, torch.Size],
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor]] | None:
        """Dequantize the gathered rows into a dense (out, in) tensor of the param dtype (in place when `out`)."""
        meta, outer_size = metadata
        (qdata,) = all_gather_outputs
        full = Sharded4bitTensor(qdata.view(-1, meta.row_bytes), meta.to(qdata.device), outer_size, param_dtype)
        if out is not None:
            full.dequantize(param_dtype, out=out.data if isinstance(out, nn.Parameter) else out)
            return None
        dense = full.dequantize(param_dtype)
        return dense, (dense,)

    # --- numerics ----------------------------------------------------------------------------------------
    def absmax_rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """fp32 first-level absmax slots of rows [start, stop), double quantization undone as bnb does."""
        stop = self.shape[0] if stop is None else stop
        scales = self.scales[start:stop]
        meta = self.meta
        if not meta.nested:
            return scales.float()
        code2 = meta.code2.to(scales.device) if meta.code2 is not None else None
        if code2 is None:
            raise ValueError("double-quant code book missing (tensor was created empty and never filled)")
        q = self.rowmeta[start:stop, 1].long()
        slot = torch.arange(meta.k1, device=scales.device)
        g = torch.div(q[:, None] + slot[None, :], DQ_GROUP, rounding_mode="floor")
        scales2: Any = self.scales2  # present: nested
        absmax2 = torch.gather(scales2[start:stop], 1, g.clamp_max(meta.k2 - 1))
        absmax = code2[scales.long()] * absmax2  # bnb dequantize_blockwise: code[q] * absmax2 (fp32)
        return absmax + torch.tensor(meta.offset, dtype=torch.float32, device=absmax.device)  # then += offset

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) as a dense (stop-start, in) tensor of dtype (default: fp32)."""
        dtype = dtype or torch.float32
        meta = self.meta
        n_in, bs = self.shape[1], meta.blocksize
        packed = self.packed[start:stop]
        codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(-1).to(torch.int32)
        vals = code_book(meta.quant_type, packed.device).index_select(0, codes).view(packed.shape[0], n_in)
        absmax = self.absmax_rows(start, stop)
        if n_in % bs == 0:  # every row starts a block: a plain reshape
            out = (vals.view(-1, meta.k1, bs) * absmax.view(-1, meta.k1, 1)).view(-1, n_in)
        else:
            p1 = self.rowmeta[start:stop, 0].long()
            j = torch.arange(n_in, device=packed.device)
            slot = torch.div(p1[:, None] + j[None, :], bs, rounding_mode="floor")
            out = vals * torch.gather(absmax, 1, slot)
        return out.to(dtype)

    def rows_per_chunk(self) -> int:
        budget = DEQUANT_CHUNK_ELEMENTS_CUDA if self.qdata.is_cuda else DEQUANT_CHUNK_ELEMENTS
        return max(1, min(self.shape[0], budget // max(1, self.shape[1])))

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight (dtype defaults to this tensor's dtype), built row chunk by row chunk."""
        dtype = dtype or self.dtype
        if out is None:
            out = torch.empty(tuple(self.shape), dtype=dtype, device=self.packed.device)
        step = self.rows_per_chunk()
        for s in range(0, self.shape[0], step):
            e = min(s + step, self.shape[0])
            out[s:e] = self.dequantize_rows(s, e, out.dtype)
        return out

    def packed_nbytes(self) -> int:
        """Bytes held by this (local) tensor's inner storage."""
        return self.qdata.numel()


# ------------------------------------------------------------------------------------------------------------
# matmul that keeps the weight packed for backward
# ------------------------------------------------------------------------------------------------------------
class Linear4bitFunction(torch.autograd.Function):
    """y = x·Wᵀ with W dequantized on the fly; backward dequantizes again instead of saving the dense W."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: Sharded4bitTensor) -> torch.Tensor:
        ctx.w = w
        return nn.functional.linear(x, w.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.w.dequantize(grad.dtype), None


# ------------------------------------------------------------------------------------------------------------
# quantization (bitsandbytes' own routine; the result is then re-laid out by rows)
# ------------------------------------------------------------------------------------------------------------
def quantize_4bit_bnb(
    weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, Any]:
    """bitsandbytes.functional.quantize_4bit on the weight (needs bitsandbytes). Returns (packed, QuantState)."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:  # pragma: no cover - environment dependent
        raise ImportError("quantizing to 4-bit needs bitsandbytes: pip install 'dora_dist[quant]'") from exc
    w = weight.detach()
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        w = w.float()
    return bnbf.quantize_4bit(
        w.contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
