"""The job's mesh sizes (parallel/mesh.py) from the config and the launch, validated before any process group."""

from __future__ import annotations

import pytest

from dora_dist.config import load_config
from dora_dist.errors import ConfigError
from dora_dist.parallel.mesh import MeshDims, resolve_dims


def cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_one_node_shards_over_everyone():
    dims = resolve_dims(cfg("parallel.engine=fsdp2"), 4)
    assert dims == MeshDims(dp_replicate=1, dp_shard=4, tp=1, nodes=1)
    assert not dims.hybrid and dims.dp == 4 and dims.world == 4


def test_auto_shard_group_is_one_node_across_nodes():
    dims = resolve_dims(cfg("parallel.engine=fsdp2"), 4, local_world=2)
    assert (dims.dp_replicate, dims.dp_shard, dims.nodes) == (2, 2, 2) and dims.hybrid
    # nodes of one process: nothing to shard inside a node, so one flat group (not a replicated whole base)
    assert resolve_dims(cfg("parallel.engine=fsdp2"), 2, local_world=1).sizes() == (1, 2, 1)
    # an engine without hybrid sharding keeps one flat data-parallel group
    assert resolve_dims(cfg("parallel.engine=ddp"), 4, local_world=2).dp_shard == 4


def test_explicit_shard_group_and_tp():
    dims = resolve_dims(cfg("parallel.engine=fsdp2", "parallel.shard_group=2"), 8)
    assert dims.sizes() == (4, 2, 1)
    dims = resolve_dims(cfg("parallel.engine=fsdp2", "parallel.tp=2"), 8, local_world=4)
    assert dims.sizes() == (2, 2, 2)  # one node's 2 data-parallel ranks shard, tp=2 inside
    assert dims.describe() == "dp_replicate=2 × dp_shard=2 × tp=2"


@pytest.mark.parametrize(
    ("overrides", "world", "local", "needle"),
    [
        (["parallel.engine=fsdp2", "parallel.shard_group=3"], 4, None, "shard_group=3 does not divide"),
        (["parallel.engine=fsdp2", "parallel.shard_group=4"], 8, 3, "not a whole number of nodes"),
        (["parallel.engine=fsdp2", "parallel.shard_group=3"], 12, 4, "does not fit the node layout"),
        (["parallel.engine=ddp", "parallel.shard_group=2"], 4, None, "engines that do: fsdp2, zero3"),
        (["parallel.engine=fsdp2", "parallel.tp=3"], 4, None, "parallel.tp=3 does not divide the world size 4"),
        (["parallel.engine=fsdp2", "parallel.tp=4"], 8, 2, "must stay inside one node"),
        (["parallel.engine=zero2", "parallel.tp=2"], 4, None, "engines that can: ddp, fsdp2"),
    ],
)
def test_bad_layouts_are_one_line_errors(overrides, world, local, needle):
    with pytest.raises(ConfigError) as err:
        resolve_dims(cfg(*overrides), world, local)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_preflight_refuses_a_bad_shard_group_before_any_process_group(monkeypatch):
    from dora_dist.preflight import check_mesh

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="node layout"):
        check_mesh(cfg("parallel.engine=fsdp2", "parallel.shard_group=3"), 6 * 2)
