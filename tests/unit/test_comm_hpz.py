"""The ZeRO-3 hpZ communication model (plan/comm.py) without processes: shard groups move bytes between mesh
dimensions but not their totals, and only the per-layer gathers move (tests/dist/test_zero_hpz.py holds the
model equal to the bytes counted on 2 nodes × 2)."""

from __future__ import annotations

import pytest

from dora_dist.config import load_config
from dora_dist.parallel.mesh import MeshDims, resolve_dims
from dora_dist.plan import comm
from dora_dist.plan.model_spec import model_spec


@pytest.fixture(scope="module")
def job():
    cfg = load_config(None, ["training.global_batch_size=16", "training.micro_batch_size=1", "parallel.engine=zero3"])
    return cfg, model_spec(cfg)


@pytest.mark.parametrize("threshold", [comm.ZERO3_PERSISTENCE_THRESHOLD, 1000, 0])
def test_hpz_moves_the_per_layer_gathers_into_the_shard_group(job, threshold, monkeypatch):
    cfg, spec = job
    monkeypatch.setattr(comm, "ZERO3_PERSISTENCE_THRESHOLD", threshold)
    flat = comm.predict_collectives(cfg, spec, "zero3", 8, MeshDims(dp_shard=8))
    dims = resolve_dims(cfg, 8, 4, "zero3")  # 2 nodes × 4: auto shard group = one node
    assert (dims.dp_replicate, dims.dp_shard) == (2, 4)
    hpz = comm.predict_collectives(cfg, spec, "zero3", 8, dims)
    assert comm.bytes_by_kind(hpz) == comm.bytes_by_kind(flat)  # same buffers, other groups
    by_dim = comm.bytes_by_dim(hpz)
    gas = comm.grad_accum(cfg, 8)
    big = [p for p in spec.params if p.numel > threshold]
    per_gather = {t: sum(comm._padded(p.numel, 8) * comm.param_itemsize(cfg, p) for p in big if p.trainable == t)
                  for t in (True, False)}  # fmt: skip
    assert by_dim.get("dp_shard", {}).get("all_gather", 0) == gas * per_gather[False] + (gas - 1) * per_gather[True]
    assert all(v == 0 for k, v in by_dim.get("dp_shard", {}).items() if k != "all_gather")  # gradients: all ranks
    assert by_dim["dp"]["reduce_scatter"] == comm.bytes_by_kind(flat)["reduce_scatter"]
