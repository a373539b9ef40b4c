"""Reading checkpoints without running code from them.

`checkpoint.resume=<dir>` may point anywhere, so a checkpoint is untrusted input: unpickling a crafted file runs
arbitrary code. Our own files hold no pickle at all (the RNG state is JSON; the trainer state goes through torch's
weights-only loader). Files written by libraries that pickle (DCP's `.metadata`, DeepSpeed's `*.pt`) are checked
before the library reads them: every global they reference must be on an allow-list of plain data types, so the
library's own unpickling of a file that passed cannot construct anything else.
"""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file references code it has no business referencing; it is not loaded."""


# --- RNG state as JSON -------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG the trainer draws from, as JSON-serialisable lists of integers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, mt_state, gauss = random.getstate()
    state = {
        "torch": torch.random.get_rng_state().tolist(),
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, mt_state, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(kind), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save_rng_state(path: Path) -> None:
    path.write_text(json.dumps(rng_state()))


def load_rng_state(path: Path) -> None:
    try:
        state = json.loads(path.read_text())
        set_rng_state(state)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a valid RNG state file: {exc}") from exc


# --- allow-listed unpickling ---------------------------------------------------------------------------------
_DATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_PLAIN_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}


def _is_torch_constant(module: str, name: str) -> bool:
    """torch.float32, torch.strided, torch.contiguous_format: dtypes, layouts and memory formats (values, no code)."""
    if module != "torch":
        return False
    value = getattr(torch, name, None)
    return isinstance(value, (torch.dtype, torch.layout, torch.memory_format))


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module in _DATA_MODULES or (module, name) in _PLAIN_GLOBALS or _is_torch_constant(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source} references {module}.{name}, which a checkpoint never needs: refusing to load it (a "
            "crafted checkpoint can run code when unpickled). Resume only from checkpoints this project wrote."
        )


def verify_dcp_metadata(directory: str | Path) -> None:
    """Check a torch.distributed.checkpoint directory's pickled `.metadata` before DCP unpickles it."""
    path = Path(directory) / ".metadata"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no DCP metadata (.metadata): not a complete checkpoint")
    with path.open("rb") as f:
        try:
            _AllowListUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # truncated or not a pickle at all
            raise ValueError(f"{path} is not a readable checkpoint metadata file: {exc}") from exc


def verify_torch_file(path: str | Path, allowed: Sequence[Any] = ()) -> None:
    """Check a torch.save file with torch's weights-only unpickler (plus `allowed` globals, e.g. a library's
    plain-data classes) before a library that loads it with weights_only=False does."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} holds objects a checkpoint never needs, so it is not loaded (a crafted checkpoint can run code "
            f"when unpickled). Resume only from checkpoints this project wrote. Detail: {exc}"
        ) from exc
