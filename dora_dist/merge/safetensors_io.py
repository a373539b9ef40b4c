"""A base checkpoint's safetensors read one tensor at a time, and shards written one tensor at a time.

Reading opens the tensor's file with `safe_open` for that one tensor and closes it again, so no more than one
tensor (and the pages of it the OS maps) is held. Writing needs no shard buffer: every output tensor's dtype and
shape is known before any is computed, so the safetensors header (offsets included) is written first and each
tensor's bytes are appended as it is produced. The layout (which key goes to which shard file, and the
`model.safetensors.index.json`) follows the base's.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from dora_dist.errors import InputNotFoundError, ModelError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: safetensors dtype names <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class Checkpoint:
    """The safetensors files of a model directory: key -> (file, dtype, shape), read from the headers only."""

    def __init__(self, directory: Path):
        self.dir = directory
        index = directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"--base: {index} is not a valid safetensors index ({exc})") from exc
            self.files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in self.files if not (directory / f).is_file()]
            if missing:
                raise InputNotFoundError(
                    f"--base: {directory} is missing shard(s) {missing[:3]} named by {INDEX_NAME}; download the "
                    "model again (an interrupted download leaves shards out)"
                )
        elif (directory / SINGLE_NAME).is_file():
            self.files = [SINGLE_NAME]
        else:
            found = "pytorch_model.bin" if any(directory.glob("pytorch_model*.bin")) else None
            why = f"only {found} (a pickle)" if found else "no model.safetensors"
            raise ModelError(
                f"--base: {directory} has {why}; merging reads safetensors weights (save the base with "
                "save_pretrained(..., safe_serialization=True))"
            )
        from safetensors import SafetensorError, safe_open

        self.tensors: dict[str, TensorInfo] = {}
        for name in self.files:
            try:
                with safe_open(str(directory / name), framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        dtype = ST_DTYPES.get(sl.get_dtype())
                        if dtype is None:
                            raise ModelError(f"--base: {name}: tensor {key!r} has unsupported dtype {sl.get_dtype()}")
                        self.tensors[key] = TensorInfo(name, dtype, tuple(sl.get_shape()))
            except SafetensorError as exc:
                raise ModelError(f"--base: {directory / name} is not a readable safetensors file ({exc})") from exc

    @property
    def sharded(self) -> bool:
        return (self.dir / INDEX_NAME).is_file()

    def read(self, key: str) -> torch.Tensor:
        """One tensor, as stored (its own memory: the file is closed again)."""
        from safetensors import safe_open

        with safe_open(str(self.dir / self.tensors[key].file), framework="pt") as f:
            return f.get_tensor(key)

    def read_many(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        return {k: self.read(k) for k in keys}

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass(frozen=True)
class OutTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def header_bytes(entries: list[OutTensor], metadata: dict[str, str]) -> bytes:
    """The safetensors header (8-byte length + JSON padded to 8 bytes) for tensors stored in this order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.key] = {
            "dtype": ST_NAMES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_shard(
    path: Path, entries: list[OutTensor], produce: Callable[[OutTensor], torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write one safetensors file, asking `produce` for each tensor in turn and holding none after it is written."""
    with open(path, "wb") as f:
        f.write(header_bytes(entries, metadata))
        for e in entries:
            t = produce(e)
            if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                raise RuntimeError(f"{e.key}: produced {t.dtype} {tuple(t.shape)}, planned {e.dtype} {e.shape}")
            data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))  # type: ignore[arg-type]  # numpy arrays are buffers; its stub says otherwise
            del t, data


def write_index(directory: Path, shards: dict[str, list[OutTensor]]) -> None:
    """model.safetensors.index.json for the written shards (transformers' layout)."""
    weight_map = {e.key: name for name, entries in shards.items() for e in entries}
    total = sum(e.nbytes for entries in shards.values() for e in entries)
    body = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(body, indent=2) + "\n")


def planned_bytes(shards: dict[str, list[OutTensor]]) -> int:
    """Bytes the shards will take on disk (headers included, generously)."""
    return sum(e.nbytes + 256 + len(e.key) for entries in shards.values() for e in entries) + 4096 * len(shards)
