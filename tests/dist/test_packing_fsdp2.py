"""Packed documents stay apart under FSDP2 (2 gloo processes): each document's logits and loss packed with any
neighbour equal the document alone, for text, prompt/completion and chat data (issue 22)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.dist, pytest.mark.slow]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _packing_helpers import TOLERANCE  # noqa: E402
from netutil import run_workers  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from dora_dist.config import load_config
    from dora_dist.models.builtin import ensure_builtin_model

    cache = str(tmp_path_factory.mktemp("cache"))
    ensure_builtin_model(load_config(None, [f"model.cache_dir={cache}"]))  # built once, before the ranks read it
    work = tmp_path_factory.mktemp("packing")
    out = work / "results.json"
    run_workers(
        Path(__file__).with_name("engine_worker.py"),
        ["--workdir", str(work), "--cache", cache, "--out", str(out), "--part", "packing"],
        out,
    )
    return json.loads(out.read_text())


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "chat"])
def test_fsdp2_packed_document_equals_alone(results, fmt):
    assert results["world_size"] == 2
    errors = results["packing"][fmt]
    assert set(errors) == {"logits", "loss", "batch_loss"}
    assert max(errors.values()) <= TOLERANCE[torch.float32], errors
