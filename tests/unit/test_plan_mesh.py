"""dora_dist.plan on meshes beyond flat data parallelism (issues 23, 24): memory per rank of HSDP, hpZ and tensor
parallelism against formulas written out from the model's sizes, which link each mesh dimension's collectives
cross, the engine table's HSDP / tp rows and the recommendation, and bad shard_group / tp through `dora-dist plan`."""

from __future__ import annotations

from math import ceil
from pathlib import Path

import pytest

from dora_dist.cli import main as cli
from dora_dist.config import load_config
from dora_dist.parallel.mesh import MeshDims
from dora_dist.plan.choose import candidates, layouts, recommend
from dora_dist.plan.comm import Collective
from dora_dist.plan.hardware import GB, make_cluster
from dora_dist.plan.links import bytes_by_link, comm_time, dim_link
from dora_dist.plan.memory import activation_bytes_per_token, estimate_memory
from dora_dist.plan.model_spec import model_spec
from dora_dist.plan.project import project

ROOT = Path(__file__).resolve().parents[2]
CFG_8B = ROOT / "configs" / "llama3.1-8b-fsdp2-8gpu.yaml"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("DORA_DIST_CACHE", str(tmp_path_factory.getbasetemp() / "plan_cache"))


@pytest.fixture(scope="module")
def tiny():
    """The built-in tiny Llama (h 192, MLP 512, 6 heads, 2 KV heads of 32, 3 blocks), DoRA r=8 on all linears,
    fp32 base and adapters."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    return cfg, model_spec(cfg)


# ---- memory per rank -------------------------------------------------------------------------------------------


def test_hsdp_shards_base_and_optimizer_over_the_group_not_the_world(tiny):
    cfg, spec = tiny
    hsdp = estimate_memory(cfg, spec, "fsdp2", 4, dims=MeshDims(dp_replicate=2, dp_shard=2, nodes=2))
    frozen = [p for p in spec.params if not p.trainable]
    train = [p for p in spec.params if p.trainable]
    n_train = sum(p.numel for p in train)
    # fp32 everywhere: 4 bytes per element, everything split over the shard group of 2 (not the world of 4)
    assert hsdp.device["base"] == pytest.approx(sum(p.numel for p in frozen) * 4 / 2)
    assert hsdp.device["adapters"] == pytest.approx(sum(ceil(p.numel / 2) for p in train) * 4)
    assert hsdp.device["grads"] == pytest.approx(n_train * 4 / 2)
    assert hsdp.device["optimizer"] == pytest.approx(2 * n_train * 4 / 2)
    flat4 = estimate_memory(cfg, spec, "fsdp2", 4)
    assert flat4.device["base"] == pytest.approx(hsdp.device["base"] / 2)


def test_hpz_adds_the_secondary_partition_to_zero3(tiny):
    cfg, spec = tiny
    flat = estimate_memory(cfg, spec, "zero3", 4)
    hpz = estimate_memory(cfg, spec, "zero3", 4, dims=MeshDims(dp_replicate=2, dp_shard=2, nodes=2))
    for comp in ("base", "adapters", "grads", "optimizer", "gathered", "activations"):  # primary partition: world
        assert hpz.device[comp] == pytest.approx(flat.device[comp]), comp
    # the secondary partition: every non-persistent (> 1e5 elements) parameter over the group of 2, fp32 compute
    big = [p for p in spec.params if p.numel > 100_000]
    assert big  # the embedding (832 × 192) at least
    assert hpz.device["secondary"] == sum(ceil(p.numel / 2) * 4 for p in big)
    assert "secondary" not in flat.device


def test_tensor_parallel_splits_the_linears_and_their_adapters(tiny):
    cfg, spec = tiny
    h, i, kv, r, n = spec.hidden, spec.intermediate, spec.n_kv_heads * spec.head_dim, cfg.dora.r, spec.n_blocks
    tp = 2
    mem = estimate_memory(cfg, spec, "ddp", 2, dims=MeshDims(dp_shard=1, tp=tp))
    # block linears (q, o: h×h; k, v: kv×h; gate, up, down: i×h) split by tp; norms, embeddings, head whole
    split = n * (2 * h * h + 2 * kv * h + 3 * i * h)
    whole = spec.numel(trainable=False) - split
    assert mem.device["base"] == pytest.approx((split / tp + whole) * 4)
    # column-wise (q, k, v, gate, up; out = h, kv, kv, i, i): lora_A (r × h) whole, lora_B and magnitude split;
    # row-wise (o: in h; down: in i; out h): lora_A split, lora_B (h × r) and magnitude whole
    col = sum(r * h + (r * out + out) / tp for out in (h, kv, kv, i, i))
    row = sum(r * fin / tp + h * r + h for fin in (h, i))
    assert mem.device["adapters"] == pytest.approx(n * (col + row) * 4)
    assert mem.device["optimizer"] == pytest.approx(2 * n * (col + row) * 4)


def test_tensor_parallel_activations_split_only_the_split_layers(tiny):
    cfg, spec = tiny
    h, r, b = spec.hidden, cfg.dora.r, 4
    for sp in (False, True):
        a1, a2, a4 = (activation_bytes_per_token(cfg, spec, t, sequence_parallel=sp) for t in (1, 2, 4))
        # act(tp) = whole + split / tp: the split part halves from 1 to 2 and again from 2 to 4
        assert a1 - a2 == pytest.approx(2 * (a2 - a4))
        # what stays whole per token (fp32 adapters and compute, so inputs are shared): the attention and MLP
        # inputs (the column-wise linears' input), x·Aᵀ of the 7 adapted linears, DoRA's saved outputs of o and
        # down (row-wise: whole after their reduction); the two norms' fp32 inputs unless sequence-parallel
        whole = 2 * b * h + 7 * b * r + 2 * b * h + (0 if sp else 2 * 4 * h)
        assert 2 * a2 - a1 == pytest.approx(whole)


# ---- links ---------------------------------------------------------------------------------------------------


def test_each_dimension_runs_on_its_link():
    eth = make_cluster("h100-80gb", 2, 8, inter_node="ethernet")
    ib = make_cluster("h100-80gb", 2, 8, inter_node="infiniband")
    hsdp = MeshDims(dp_replicate=2, dp_shard=8, nodes=2)
    assert not dim_link(hsdp, "dp_shard", eth).inter_node and dim_link(hsdp, "dp_shard", eth).link.name == "nvlink"
    rep = dim_link(hsdp, "dp_replicate", eth)
    # 8 replicate groups (one rank per node each) share the node's 100 GbE link; a NIC per GPU is not shared
    assert rep.inter_node and rep.share == pytest.approx(1 / 8) and rep.bandwidth == pytest.approx(10 * GB / 8)
    assert dim_link(hsdp, "dp_replicate", ib).share == 1.0
    flat = MeshDims(dp_shard=16, nodes=2)
    assert dim_link(flat, "dp", eth).inter_node and dim_link(flat, "dp", eth).share == 1.0
    assert dim_link(flat, "dp_shard", eth).inter_node  # a shard group of whole nodes crosses
    tp_mesh = MeshDims(dp_replicate=2, dp_shard=4, tp=2, nodes=2)
    assert not dim_link(tp_mesh, "tp", eth).inter_node
    assert not dim_link(tp_mesh, "dp_shard", eth).inter_node  # 4 × tp 2 = one node
    assert dim_link(tp_mesh, "dp", eth).inter_node and dim_link(tp_mesh, "dp", eth).share == pytest.approx(4 / 8)
    one = make_cluster("h100-80gb", 1, 8)
    assert not dim_link(MeshDims(dp_shard=8), "dp", one).inter_node


def test_time_charges_each_collective_on_its_link():
    eth = make_cluster("h100-80gb", 2, 8, inter_node="ethernet")
    dims = MeshDims(dp_replicate=2, dp_shard=8, nodes=2)
    inside = Collective("all_gather", 8 * 10**9, 1, False, "base", "dp_shard")
    across = Collective("all_reduce", 10**9, 1, False, "adapter gradients", "dp_replicate")
    _, no, _ = comm_time([inside, across], eth, dims)
    nvlink, ethernet = eth.intra, eth.inter
    expect_inside = 8e9 * 7 / 8 / nvlink.bandwidth + nvlink.latency_s
    expect_across = 1e9 * 2 * (1 / 2) / (ethernet.bandwidth / 8) + ethernet.latency_s
    assert no == pytest.approx(expect_inside + expect_across)
    assert bytes_by_link([inside, across], eth, dims) == {"intra_node": 8 * 10**9, "inter_node": 10**9}


def test_hsdp_keeps_the_base_inside_the_node():
    cfg = load_config(CFG_8B)
    eth = make_cluster("h100-80gb", 2, 8, inter_node="ethernet")
    hsdp = project(cfg, eth, "fsdp2", dims=MeshDims(dp_replicate=2, dp_shard=8, nodes=2))
    flat = project(cfg, eth, "fsdp2", dims=MeshDims(dp_shard=16, nodes=2))
    by_dim = {d: sum(b.values()) for d, b in hsdp.dim_bytes.items()}
    assert hsdp.link_bytes["intra_node"] == by_dim["dp_shard"]
    assert hsdp.link_bytes["inter_node"] == by_dim["dp_replicate"] + by_dim.get("dp", 0)
    # only the adapters' gradient shards (and the loss) cross: under 1% of what the flat mesh sends over the link
    assert hsdp.link_bytes["inter_node"] < 0.01 * flat.link_bytes["inter_node"]
    assert flat.link_bytes["intra_node"] == 0
    assert hsdp.step_s < flat.step_s


# ---- the engine table and the recommendation ------------------------------------------------------------------


def test_recommends_hsdp_for_8b_on_two_ethernet_nodes_when_ddp_does_not_fit(capsys):
    # 4 × 8 K tokens per micro-batch on 40 GiB cards: DDP's whole bf16 base does not fit, sharding inside a node does
    over = ["data.seq_len=8192", "training.micro_batch_size=4", "training.global_batch_size=0"]
    cfg = load_config(CFG_8B, over)
    eth = make_cluster("a100-40gb", 2, 8, inter_node="ethernet")
    projs = candidates(cfg, eth, model_spec(cfg))
    labels = {p.label: p for p in projs}
    assert "fsdp2 HSDP 2×8" in labels and "fsdp2" in labels
    assert not labels["ddp"].fits
    best, why = recommend(projs, eth)
    assert best is not None and best.label == "fsdp2 HSDP 2×8", why
    assert "across nodes only" in why and "flat fsdp2 moves" in why and "ethernet" in why
    rc = cli(
        ["plan", "--config", str(CFG_8B), "--nodes", "2", "--gpus-per-node", "8", "--gpu", "a100-40gb"]
        + ["--inter-node", "ethernet", *over]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "fsdp2 HSDP 2×8" in out and "inter-node" in out
    assert "recommended: fsdp2 HSDP 2×8" in out and "between nodes" in out


def test_tp_layouts_offered_within_a_node(tiny):
    cfg, spec = tiny
    # 6 heads, 2 KV heads: tp = 2 splits them; 4 and 8 do not
    node = make_cluster("h100-80gb", 1, 8)
    tps = {d.tp for d in layouts(cfg, node, spec, "fsdp2")}
    assert tps == {1, 2}
    assert {d.tp for d in layouts(cfg, node, spec, "zero3")} == {1}  # cannot compose with tp
    two = make_cluster("h100-80gb", 2, 8)
    fsdp2 = layouts(cfg, two, spec, "fsdp2")
    assert MeshDims(dp_replicate=2, dp_shard=8, nodes=2) in fsdp2  # HSDP across the nodes
    assert MeshDims(dp_replicate=2, dp_shard=4, tp=2, nodes=2) in fsdp2  # tp inside, one node's shard group


def test_tp_layouts_over_a_4bit_base_only_where_the_trainer_runs_them():
    """tp over an NF4 base runs on ddp only, in whole quantization blocks (parallel/tp.py): plan offers exactly
    those layouts — none for fsdp2, none for the tiny model whose o_proj input (192 / 2 = 96) is not whole blocks."""
    node = make_cluster("h100-80gb", 1, 8)
    cfg = load_config(CFG_8B, ["quantization.mode=nf4"])
    spec = model_spec(cfg)
    assert {d.tp for d in layouts(cfg, node, spec, "fsdp2")} == {1}
    assert {d.tp for d in layouts(cfg, node, spec, "ddp")} == {1, 2, 4, 8}
    tiny = load_config(ROOT / "configs" / "quickstart.yaml", ["quantization.mode=nf4"])
    assert {d.tp for d in layouts(tiny, node, model_spec(tiny), "ddp")} == {1}


def test_tp_fits_70b_at_long_context_where_data_parallelism_does_not():
    cfg = load_config(
        ROOT / "configs" / "llama3.1-70b-fsdp2-2nodes.yaml",
        ["data.seq_len=32768", "training.micro_batch_size=1", "training.global_batch_size=0"],
    )
    two = make_cluster("h100-80gb", 2, 8)
    spec = model_spec(cfg)
    flat = project(cfg, two, "fsdp2", spec=spec, dims=MeshDims(dp_shard=16, nodes=2))
    tp8 = project(cfg, two, "fsdp2", spec=spec, dims=MeshDims(dp_shard=2, tp=8, nodes=2))
    assert not flat.fits and tp8.fits
    # the checkpointed block inputs (no sequence parallelism) stay whole; what tp saves is the recomputed block's
    # split activations: 32 K tokens × (bytes per token at tp 1 − at tp 8)
    saved = 32768 * (activation_bytes_per_token(cfg, spec, 1) - activation_bytes_per_token(cfg, spec, 8))
    assert saved > 0
    assert flat.memory.device["activations"] - tp8.memory.device["activations"] == pytest.approx(saved)


def test_tp_rows_in_the_table_once_their_collectives_are_modelled(capsys):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    spec = model_spec(cfg)
    p = project(cfg, make_cluster("h100-80gb", 1, 2), "fsdp2", spec=spec, dims=MeshDims(dp_shard=1, tp=2))
    if not p.comm_modelled:
        pytest.skip("comm.predict_collectives has no tp model on this branch yet (issue 24's engine branch)")
    assert cli(["plan", "--gpus-per-node", "2"]) == 0
    assert "fsdp2 tp=2" in capsys.readouterr().out


# ---- bad input through `dora-dist plan` ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("parallel.shard_group=3", "parallel.shard_group=3 does not divide the 16 data-parallel processes"),
        ("parallel.tp=3", "parallel.tp=3 does not divide the world size 16"),
        ("parallel.engine=zero3 parallel.tp=2", "cannot compose with tensor parallelism; engines that can"),
        ("parallel.engine=ddp parallel.shard_group=8", "engines that do: fsdp2, zero3"),
    ],
)
def test_bad_mesh_is_a_one_line_error(override, message, capsys):
    rc = cli(["plan", "--config", str(CFG_8B), "--nodes", "2", "--gpus-per-node", "8", *override.split()])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert message in err and len(err.splitlines()) == 1, err


# ---- benchmarks/scaling.py's mesh points ----------------------------------------------------------------------


def test_scaling_benchmark_compares_bytes_per_mesh_dimension(tmp_path):
    import argparse
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scaling

    args = argparse.Namespace(micro=2, accum=4, global_batch=8, seq=64, steps=4, device="cpu", cache=str(tmp_path))
    args.gpu = "h100-80gb"
    hsdp, tp2, dp_tp = scaling.mesh_points()
    assert [p.layout for p in (hsdp, tp2, dp_tp)] == ["HSDP 2×2", "tp=2", "dp=2 × tp=2"]
    assert hsdp.nodes == 2 and "parallel.shard_group=2" in scaling.overrides(hsdp, args, tmp_path)
    assert "parallel.tp=2" in scaling.overrides(dp_tp, args, tmp_path)
    pred = scaling.project_point(hsdp, args, tmp_path, None)
    shard, rep = (sum(pred["dim_bytes"][d].values()) for d in ("dp_shard", "dp_replicate"))
    assert shard > 0 and rep > 0 and sum(pred["dim_bytes"]["tp"].values()) == 0
    assert pred["link_bytes"] == {"intra_node": shard, "inter_node": sum(pred["bytes"].values()) - shard}
    # a measured row equal to the prediction matches; one byte off in one dimension does not
    row = {f"counted_{k}_bytes": pred["bytes"][k] for k in scaling.KINDS}
    row |= {f"counted_{d}_{k}_bytes": pred["dim_bytes"][d][k] for d in scaling.MESH_DIMS for k in scaling.KINDS}
    row |= {"same_bytes_on_all_ranks": True, "live_bytes_peak": pred["memory"], "step_s": 1.0}
    assert scaling.add_projection(dict(row), pred)["bytes_match"]
    row["counted_dp_replicate_all_reduce_bytes"] += 1
    off = scaling.add_projection(dict(row), pred)
    assert not off["bytes_match"] and not off["dim_bytes_match"]


def test_crossing_ring_is_capped_by_the_nodes_own_link():
    # PCIe nodes on a fast inter-node link: the ring's hops inside the node bound it, and PCIe's staging through
    # host memory hides only its share behind compute
    pcie = make_cluster("l40s-48gb", 2, 8, inter_node="infiniband")
    dl = dim_link(MeshDims(dp_shard=16, nodes=2), "dp", pcie)
    assert dl.inter_node and dl.bandwidth == pytest.approx(min(pcie.inter.bandwidth, pcie.intra.bandwidth))
    assert dl.overlap_efficiency == pcie.intra.overlap_efficiency < 1


def test_recommends_tp_when_no_data_parallel_layout_fits(monkeypatch):
    """The choice and its reason, given a tp communication model (here: the loss all-reduce only, standing in for
    the engine branch's prediction, so the test checks the planner's choice, not the bytes)."""
    import sys

    proj_mod = sys.modules["dora_dist.plan.project"]  # (dora_dist.plan.project the attribute is the function)
    real = proj_mod.predict_collectives

    def with_tp(cfg, spec, engine, world, dims=None):
        if dims is not None and dims.tp > 1:
            return [Collective("all_reduce", 8, 1, False, "step loss", "dp")]
        return real(cfg, spec, engine, world, dims)

    monkeypatch.setattr(proj_mod, "predict_collectives", with_tp)
    over = ["data.seq_len=32768", "training.micro_batch_size=1", "training.global_batch_size=0"]
    cfg = load_config(ROOT / "configs" / "llama3.1-70b-fsdp2-2nodes.yaml", over)
    node = make_cluster("h100-80gb", 2, 8)
    projs = candidates(cfg, node, model_spec(cfg))
    assert not any(p.fits for p in projs if p.dims.tp == 1)
    assert all(p.fits for p in projs if p.dims.tp > 1) and any(p.dims.tp > 1 for p in projs)
    best, why = recommend(projs, node)
    assert best is not None and best.dims.tp > 1
    assert f"tp={best.dims.tp}: no data-parallel layout fits" in why


def test_tp_that_does_not_split_the_heads_is_a_one_line_error(capsys):
    # the built-in tiny Llama has 6 attention heads and 2 KV heads: tp=4 fits a node of 4 but not the heads
    assert cli(["plan", "--gpus-per-node", "4", "parallel.engine=fsdp2", "parallel.tp=4"]) != 0
    err = capsys.readouterr().err.strip()
    assert "parallel.tp=4 does not divide the 6 attention heads" in err and len(err.splitlines()) == 1, err
