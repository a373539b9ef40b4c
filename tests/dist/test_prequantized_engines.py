"""Pre-quantized bitsandbytes checkpoints on 2 gloo ranks (issue 22, item 2): FSDP2 streams the stored packed rows
into its row-sharded 4-bit tensors (it crashed in models/lowmem_load.py: `shape (49152, 1), the model expects
(192, 512)`), the same bytes on every rank (nf4 + dq here) as quantizing the dense model on the fly; engine auto
(ddp for a 4-bit base; it picked fsdp2 and crashed the same way), zero2 and fsdp2 train it with the losses and
adapter of the on-the-fly run. Cases (tiny model, 3 steps): fsdp2 nf4+dq and fp4, auto/ddp nf4+dq, zero2 fp4+dq;
the four combinations on the one-process path and on FSDP2's streamed bytes are in tests/unit/test_prequantized.py
and tests/integration/test_prequantized_train.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

from netutil import run_workers  # noqa: E402
from prequant_fixture import save_prequantized  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prequantized_dist")
    cache = root / "cache"
    ckpts = {
        name: str(save_prequantized(cache, root / name, qt, dq))
        for name, qt, dq in (("nf4-dq", "nf4", True), ("fp4", "fp4", False), ("fp4-dq", "fp4", True))
    }
    out = root / "results.json"
    worker = __import__("pathlib").Path(__file__).with_name("prequant_worker.py")
    run_workers(
        worker,
        ["--cache", str(cache), "--ckpts", json.dumps(ckpts), "--workdir", str(root / "work"), "--out", str(out)],
        out,
        timeout=900,
    )
    return json.loads(out.read_text())


def _adapter(path):
    from dora_dist.adapters import read_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_adapter(path)[1]


@pytest.mark.parametrize(
    "case, engine",
    [("fsdp2-nf4-dq", "fsdp2"), ("fsdp2-fp4", "fsdp2"), ("auto-nf4-dq", "ddp"), ("zero2-fp4-dq", "zero2")],
)
def test_prequantized_trains_like_quantizing_on_the_fly(runs, case, engine):
    pre, fly = runs[case]["pre"], runs[case]["fly"]
    assert pre["engine"] == fly["engine"] == engine
    assert len(pre["losses"]) == 3
    assert pre["losses"] == fly["losses"]  # the same base bytes and the same numerics: equal, not close
    a, b = _adapter(pre["adapter"]), _adapter(fly["adapter"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fsdp2_streams_the_stored_bytes(runs):
    got = runs["fsdp2-nf4-dq"]["bytes"]
    assert got["equal_on_all_ranks"] and got["layers"] == 21  # 3 blocks x 7 linears
    # each rank holds its half of the rows, no more: per block q, o, down 192 + k, v 64 + gate, up 512 rows
    assert got["local_rows"] == [3 * (3 * 192 + 2 * 64 + 2 * 512) // 2] * 2
