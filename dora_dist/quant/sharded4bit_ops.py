"""The aten operations a Sharded4bitTensor supports: the row-wise reshapes, copies and moves FSDP2 performs on a
sharded parameter (split/chunk into row shards, slicing, views of the flat handle, device moves, pinning), each
keeping the packed row records intact. Anything else raises and asks for an explicit dequantize().

Import through dora_dist.quant.sharded4bit, which imports this module once its tensor class exists; this module
never imports it back (handlers take the class from their arguments).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:  # the tensor class imports this table; handlers get their class from their arguments
    from dora_dist.quant.sharded4bit import Sharded4bitTensor

aten = torch.ops.aten

# ------------------------------------------------------------------------------------------------------------
# dispatch table
# ------------------------------------------------------------------------------------------------------------
OPS: dict[Any, Any] = {}


_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def _implements(*ops: Any) -> Callable[[_Handler], _Handler]:
    def deco(fn: _Handler) -> _Handler:
        for op in ops:
            OPS[op] = fn
        return fn

    return deco


def _rows_arg(t: Sharded4bitTensor, size: Any) -> int:
    size = list(size)
    if len(size) != 2 or size[1] != t.shape[1]:
        raise NotImplementedError(f"Sharded4bitTensor only resizes along rows: {tuple(t.shape)} -> {tuple(size)}")
    return size[0]


@_implements(aten.detach.default, aten.alias.default)
def _detach(func: Any, t: Sharded4bitTensor, *args: Any, **kwargs: Any) -> Any:
    return t._with(lambda x: func(x))


@_implements(aten.clone.default)
def _clone(func: Any, t: Sharded4bitTensor, *args: Any, **kwargs: Any) -> Any:
    return t._with(lambda x: x.clone())


@_implements(aten.split.Tensor)
def _split(func: Any, t: Sharded4bitTensor, split_size: Any, dim: Any = 0) -> Any:
    if dim != 0:
        raise NotImplementedError("Sharded4bitTensor splits only along the output rows (dim 0)")
    rows = t.shape[0]
    if rows % split_size:
        raise ValueError(
            f"a 4-bit weight with {rows} rows cannot be split evenly into chunks of {split_size} rows; FSDP2 "
            "sharding of Sharded4bitTensor needs out_features divisible by the world size"
        )
    return [type(t)(part, t.meta, (part.shape[0], t.shape[1]), t.dtype) for part in func(t.qdata, split_size, 0)]


@_implements(aten.slice.Tensor)
def _slice(func: Any, t: Sharded4bitTensor, dim: Any = 0, start: Any = None, end: Any = None, step: Any = 1) -> Any:
    if step != 1:
        raise NotImplementedError("Sharded4bitTensor slicing with a step")
    if dim == 1 or dim == -1:
        if (start in (None, 0)) and (end is None or end >= t.shape[1]):
            return t._with(lambda x: x)
        raise NotImplementedError("Sharded4bitTensor slices only whole rows")
    return t._with(lambda x: func(x, 0, start, end, 1))


@_implements(aten.new_zeros.default, aten.new_empty.default)
def _new_rows(func: Any, t: Sharded4bitTensor, size: Any, **kwargs: Any) -> Any:
    rows = _rows_arg(t, size)
    device = kwargs.get("device") or t.device
    return t._with(lambda x: torch.zeros((rows, x.shape[1]), dtype=x.dtype, device=device), meta=t.meta.to(device))


@_implements(aten.empty_like.default, aten.zeros_like.default)
def _empty_like(func: Any, t: Sharded4bitTensor, **kwargs: Any) -> Any:
    device = kwargs.get("device") or t.device
    dtype = kwargs.get("dtype") or t.dtype
    return t._with(lambda x: func(x, device=device), dtype=dtype, meta=t.meta.to(device))


@_implements(aten.copy_.default)
def _copy(func: Any, dst: Sharded4bitTensor, src: Any, non_blocking: Any = False) -> Any:
    if type(src) is not type(dst):
        raise NotImplementedError("copy_ into a Sharded4bitTensor needs a Sharded4bitTensor source (quantize first)")
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"copy_ shape mismatch {tuple(src.shape)} vs {tuple(dst.shape)}")
    if not src.meta.same_format(dst.meta):
        raise ValueError("copy_ between 4-bit tensors of different formats")
    dst.qdata.copy_(src.qdata, non_blocking=non_blocking)
    # The quantization constants (double-quant offset and code book) travel with the data.
    dst.meta = src.meta.to(dst.packed.device)
    return dst


@_implements(aten.view.default, aten._unsafe_view.default)
def _view(func: Any, t: Sharded4bitTensor, size: Any) -> Any:
    size = list(size)
    if size == [-1] or size == [t.numel()]:
        # FSDP keeps a flat "view" of the padded shard; for a packed tensor it is only a handle (same inner data).
        return _flat_handle(t)
    if len(size) == 2 and size[1] in (-1, t.shape[1]) and size[0] in (-1, t.shape[0]):
        return t._with(lambda x: x)
    raise NotImplementedError(f"Sharded4bitTensor.view{tuple(size)}")


def _flat_handle(t: Sharded4bitTensor) -> Sharded4bitTensor:
    # Keep the 2-D shape: FSDP only stores this and compares storage pointers for plain tensors.
    return t._with(lambda x: x)


@_implements(aten.as_strided.default)
def _as_strided(func: Any, t: Sharded4bitTensor, size: Any, stride: Any, storage_offset: Any = 0) -> Any:
    if tuple(size) != tuple(t.shape):
        raise NotImplementedError(f"Sharded4bitTensor.as_strided to a different size {tuple(size)}")
    return t._with(lambda x: x)


@_implements(aten._to_copy.default)
def _to_copy(func: Any, t: Sharded4bitTensor, **kwargs: Any) -> Any:
    device = kwargs.get("device") or t.device
    dtype = kwargs.get("dtype") or t.dtype
    if not dtype.is_floating_point:
        raise NotImplementedError(f"Sharded4bitTensor.to({dtype})")
    # A dtype change only changes the dtype the weight dequantizes to (the codes stay 4-bit).
    nb = kwargs.get("non_blocking", False)
    return t._with(lambda x: x.to(device, non_blocking=nb), dtype=dtype, meta=t.meta.to(device))


@_implements(aten.is_pinned.default)
def _is_pinned(func: Any, t: Sharded4bitTensor, *args: Any) -> Any:
    return t.qdata.is_pinned()


@_implements(aten._pin_memory.default)
def _pin(func: Any, t: Sharded4bitTensor, *args: Any) -> Any:
    return t._with(lambda x: x.pin_memory())


@_implements(aten.is_same_size.default)
def _same_size(func: Any, a: Any, b: Any) -> Any:
    return tuple(a.shape) == tuple(b.shape)


def _wait(func: Any, t: Sharded4bitTensor) -> Any:
    return t._with(lambda x: func(x))


if hasattr(torch.ops, "_c10d_functional") and hasattr(torch.ops._c10d_functional, "wait_tensor"):
    OPS[torch.ops._c10d_functional.wait_tensor.default] = _wait
