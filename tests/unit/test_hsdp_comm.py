"""FSDP2 HSDP without processes. The planner's communication model (plan/comm.py) against the flat one: inside a shard
group of S ranks it is flat FSDP2 on S ranks; across groups only the reduce-scattered gradient shards travel.
(tests/dist/test_hsdp.py holds it equal to the bytes counted per mesh dimension in real 4-process runs.)"""

from __future__ import annotations

import pytest

from dora_dist.config import load_config
from dora_dist.parallel.mesh import MeshDims, resolve_dims
from dora_dist.plan.comm import bytes_by_dim, predict_collectives
from dora_dist.plan.model_spec import model_spec

BASE = ["parallel.engine=fsdp2", "model.config.intermediate_size=99", "training.micro_batch_size=1"]


@pytest.fixture(scope="module")
def cfg_spec(builtin_cache):
    cfg = load_config(None, [f"model.cache_dir={builtin_cache}", *BASE, "training.global_batch_size=8"])
    return cfg, model_spec(cfg)


def test_hsdp_is_flat_fsdp2_inside_the_group_plus_shard_all_reduce_across(cfg_spec):
    cfg, spec = cfg_spec
    hsdp = predict_collectives(cfg, spec, "fsdp2", 4, MeshDims(dp_replicate=2, dp_shard=2, nodes=2))
    by_dim = bytes_by_dim(hsdp)
    assert set(by_dim) == {"dp", "dp_shard", "dp_replicate"}
    # gas from 4 data-parallel ranks (global 8 / micro 1 / 4 = 2): flat 2 ranks would have gas 4, so compare the
    # per-micro-step all-gathers and the once-per-step gradient collectives
    flat2 = bytes_by_dim(predict_collectives(cfg, spec, "fsdp2", 2))["dp"]
    assert by_dim["dp_shard"]["all_gather"] * 2 == flat2["all_gather"]
    assert by_dim["dp_shard"]["reduce_scatter"] == flat2["reduce_scatter"]
    assert by_dim["dp_shard"]["all_reduce"] + by_dim["dp"]["all_reduce"] == flat2["all_reduce"]
    assert by_dim["dp"] == {**{k: 0 for k in by_dim["dp"]}, "all_reduce": 8}  # the step loss only
    assert by_dim["dp_replicate"]["all_reduce"] * 2 == by_dim["dp_shard"]["reduce_scatter"]
    assert sum(by_dim["dp_replicate"].values()) == by_dim["dp_replicate"]["all_reduce"]


def test_auto_shard_group_across_two_nodes_is_predicted(cfg_spec):
    cfg, spec = cfg_spec
    dims = resolve_dims(cfg, 4, 2, "fsdp2")
    assert dims.hybrid
    assert "dp_replicate" in bytes_by_dim(predict_collectives(cfg, spec, "fsdp2", 4, dims))


def test_unmodelled_meshes_still_refused(cfg_spec):
    cfg, spec = cfg_spec
    with pytest.raises(NotImplementedError):  # shard groups of one process: pure replication through FSDP2
        predict_collectives(cfg, spec, "fsdp2", 4, MeshDims(dp_replicate=4, dp_shard=1))
    with pytest.raises(NotImplementedError):  # zero2 has no hybrid mode to model
        predict_collectives(cfg, spec, "zero2", 4, MeshDims(dp_replicate=2, dp_shard=2))


@pytest.mark.parametrize(("rows", "group"), [(99, 2), (64, 4), (5, 4), (3, 4)])
def test_chunk_span_is_fully_shards_row_layout(rows, group):
    """The rows a rank holds inside its shard group (parallel/hsdp.py) are torch.chunk's, as fully_shard splits."""
    import torch

    from dora_dist.parallel.hsdp import chunk_span

    chunks = torch.chunk(torch.arange(rows), group)
    for rank in range(group):
        start, count = chunk_span(rows, group, rank)
        expect = chunks[rank] if rank < len(chunks) else torch.arange(0)
        assert torch.equal(torch.arange(start, start + count), expect)
