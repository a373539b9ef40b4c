"""QDoRA in one process: the built-in model loaded in 4 bits (bitsandbytes NF4 on the CPU) trains, its loss falls,
and the adapter is saved."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

from dora_dist.config import load_config  # noqa: E402
from dora_dist.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # bitsandbytes' CPU 4-bit path: 15-30 s on 2 shared cores
def test_qdora_nf4_single_process_trains(builtin_cache, tmp_path):
    from dora_dist.adapters import read_adapter
    from dora_dist.train import train

    out = tmp_path / "run"
    summary = train(
        load_config(
            ROOT / "configs" / "quickstart.yaml",
            [
                "quantization.mode=nf4",
                "quantization.compute_dtype=float32",
                "training.max_steps=12",
                "training.warmup_steps=2",
                "data.synthetic_samples=300",
                "data.seq_len=64",
                "output.progress_bar=false",
                "output.plot=false",
                f"model.cache_dir={builtin_cache}",
                f"output.dir={out}",
                "checkpoint.every_steps=0",
            ],
        )
    )
    assert summary["engine"] == "none"
    loss = [r["loss"] for r in read_metrics(out)]
    assert len(loss) == 12
    assert sum(loss[-3:]) / 3 < loss[0] - 1.0, loss
    cfg, tensors = read_adapter(out / "adapter")
    assert cfg.use_dora and any(k.endswith("lora_magnitude_vector") for k in tensors)
