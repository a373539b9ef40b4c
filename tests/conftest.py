"""Shared test setup: GPU-only tests are skipped when CUDA is absent; the built-in model and tokenizer are built once
per session (training the tokenizer and saving the model takes ~6.5 s, and some 20 modules need them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory) -> Path:
    """A `model.cache_dir` holding the built-in tiny Llama and its tokenizer, built once per session. Runs only read
    it (the model directory is written once, atomically), so modules and processes can share it."""
    from dora_dist.config import load_config
    from dora_dist.models.builtin import ensure_builtin_model

    cache = tmp_path_factory.getbasetemp() / "dora_dist_cache"
    ensure_builtin_model(load_config(None, [f"model.cache_dir={cache}"]))
    return cache
