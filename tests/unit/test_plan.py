"""dora_dist.plan: `dora-dist plan` on every shipped config (no download), the sanity cases of the issue, the
projection's internal consistency, and the collective counter in one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dora_dist.cli import main as cli
from dora_dist.config import load_config
from dora_dist.plan.hardware import GB, get_interconnect, make_cluster
from dora_dist.plan.project import candidates, project, recommend

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No network: any hub access fails; the built-in model is built in a test cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("DORA_DIST_CACHE", str(tmp_path_factory.getbasetemp() / "plan_cache"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_plan_runs_on_every_config(path, capsys):
    # 16 ranks: a config whose global batch they do not split is projected with the batch that does (micro-batch ×
    # 16 ranks × its accumulation), as training would refuse the other (test_plan_applies_the_trainers_batch_rule)
    cfg = load_config(path)
    t = cfg.training
    fix = (
        []
        if not t.global_batch_size or t.global_batch_size % (t.micro_batch_size * 16) == 0
        else [f"training.global_batch_size={t.micro_batch_size * 16}"]
    )
    assert cli(["plan", "--config", str(path), "--nodes", "2", "--gpus-per-node", "8", "--gpu", "a100-40gb", *fix]) == 0
    out = capsys.readouterr().out
    assert "memory per rank" in out and "engines on this cluster" in out
    verdicts = [
        ln
        for ln in out.splitlines()
        if ln == "  fits" or ln.startswith("  does not fit:") or ln.startswith("  cannot run:")
    ]
    assert len(verdicts) == 1  # exactly one verdict for the configured job
    assert "recommended:" in out or "does not fit with any engine" in out
    assert "against one node" in out  # 2 nodes: efficiency against one node


def test_job_that_cannot_fit_is_reported_not_crashed(capsys):
    rc = cli(
        [
            "plan",
            "--config",
            str(ROOT / "configs" / "llama3.1-70b-fsdp2-2nodes.yaml"),
            "--nodes",
            "1",
            "--gpus-per-node",
            "2",
            "--gpu",
            "rtx4090-24gb",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "does not fit: needs" in out and "has 24 GiB" in out
    assert "does not fit with any engine" in out  # 70B bf16 on 2×24 GB: no engine fits


def test_engine_that_cannot_run_the_job_is_reported(capsys):
    """A one-process config planned on 16 GPUs, and ZeRO-3 with a 4-bit base: reported, with a runnable advice."""
    path = str(ROOT / "configs" / "llama3.1-8b-qdora-1gpu.yaml")
    assert (
        cli(["plan", "--config", path, "--nodes", "2", "--gpus-per-node", "8", "training.global_batch_size=32"]) == 0
    )  # 16 does not split over 16 × micro 2
    out = capsys.readouterr().out
    assert "cannot run: parallel.engine=none" in out and "recommended:" in out
    assert cli(["plan", "--config", path, "--gpus-per-node", "2", "parallel.engine=zero3"]) == 0
    out = capsys.readouterr().out
    assert "cannot run: parallel.engine=zero3" in out


def test_70b_qdora_fsdp2_fits_two_24gb_gpus_with_offload():
    """fsdp_qlora's headline: 70B in 4-bit, FSDP, gradient checkpointing, CPU offload, on 2 × 24 GB."""
    cfg = load_config(ROOT / "configs" / "llama3.1-70b-qdora-fsdp2-2nodes.yaml")
    cluster = make_cluster("rtx4090-24gb", 1, 2)
    assert cfg.training.gradient_checkpointing
    off = project(cfg, cluster, "fsdp2", cpu_offload=True)
    assert off.fits and off.need_bytes < 24 * GB
    assert not project(cfg, cluster, "fsdp2", cpu_offload=False).fits  # the sharded 4-bit base alone is ~20 GB
    best, why = recommend(candidates(cfg, cluster, off_spec(cfg)))
    assert best is not None and best.engine == "fsdp2" and best.cpu_offload, why


def off_spec(cfg):
    from dora_dist.plan.model_spec import model_spec

    return model_spec(cfg)


def test_70b_bf16_does_not_fit_two_24gb_gpus():
    cfg = load_config(ROOT / "configs" / "llama3.1-70b-fsdp2-2nodes.yaml")
    projs = candidates(cfg, make_cluster("rtx4090-24gb", 1, 2), off_spec(cfg))
    assert projs and not any(p.fits for p in projs)
    best, why = recommend(projs)
    assert best is None and "does not fit" in why


def test_8b_qdora_fits_one_24gb_gpu():
    cfg = load_config(ROOT / "configs" / "llama3.1-8b-qdora-1gpu.yaml")
    p = project(cfg, make_cluster("rtx4090-24gb", 1, 1))
    assert p.engine == "none" and p.fits
    assert p.memory.device["base"] < 8 * GB  # 4-bit linears + bf16 embeddings/head


def test_8b_on_one_nvlink_node_scales_above_90_percent():
    cfg = load_config(ROOT / "configs" / "llama3.1-8b-fsdp2-8gpu.yaml")
    cluster = make_cluster("h100-80gb", 1, 8)
    best, why = recommend(candidates(cfg, cluster, off_spec(cfg)))
    assert best is not None and best.efficiency >= 0.9, why
    one = project(cfg, make_cluster("h100-80gb", 1, 1), "none")
    # the same global batch on 8 GPUs: tokens/s within 10% of 8× one GPU's compute-only rate
    assert best.tokens_per_s >= 0.9 * 8 * one.tokens_per_step / one.compute_s


def test_communication_time_follows_bandwidth_and_engines_differ():
    # a flat mesh over both nodes (the default on several nodes is one shard group per node: HSDP)
    cfg = load_config(ROOT / "configs" / "llama3.1-8b-fsdp2-8gpu.yaml", ["parallel.shard_group=16"])
    slow, fast = make_cluster("h100-80gb", 2, 8, bandwidth_gbps=5), make_cluster("h100-80gb", 2, 8, bandwidth_gbps=10)
    a, b = project(cfg, slow, "fsdp2"), project(cfg, fast, "fsdp2")
    assert a.comm_s > b.comm_s and b.comm_s > 0
    ddp = project(cfg, slow, "ddp")
    # DoRA under DDP all-reduces only adapter gradients; FSDP2 all-gathers the frozen base every step
    assert sum(ddp.comm_bytes.values()) * 100 < sum(a.comm_bytes.values())
    assert get_interconnect("ethernet", 5.0).bandwidth == 5 * GB


def test_comm_counter_counts_bytes_by_kind(tmp_path):
    import torch.distributed as dist

    from dora_dist.parallel.comm_counter import CommCounter

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with CommCounter() as counter:
            counter.start_step()
            dist.all_reduce(torch.ones(10))
            dist.broadcast(torch.ones(3, dtype=torch.float64), src=0)
            out = torch.empty(6)
            dist.all_gather_single(out, torch.ones(6))  # all_gather_into_tensor is deprecated (torch 2.13)
            got = counter.end_step()
        assert got["comm_all_reduce_bytes"] == 40 and got["comm_all_reduce_calls"] == 1
        assert got["comm_broadcast_bytes"] == 24
        assert got["comm_all_gather_bytes"] == 24
        assert got["comm_reduce_scatter_bytes"] == 0
    finally:
        dist.destroy_process_group()


def test_memory_components_follow_sharding_offload_and_quantization():
    from dora_dist.plan.memory import estimate_memory

    cfg = load_config(ROOT / "configs" / "llama3.1-8b-fsdp2-8gpu.yaml")
    spec = off_spec(cfg)
    n_frozen = spec.numel(trainable=False)
    ddp, fsdp = estimate_memory(cfg, spec, "ddp", 8), estimate_memory(cfg, spec, "fsdp2", 8)
    assert ddp.device["base"] == pytest.approx(2 * n_frozen)  # bf16, replicated
    assert fsdp.device["base"] == pytest.approx(ddp.device["base"] / 8)  # sharded over 8 ranks
    assert fsdp.device["optimizer"] == pytest.approx(ddp.device["optimizer"] / 8)
    cfg.parallel.cpu_offload = True
    off = estimate_memory(cfg, spec, "fsdp2", 8)
    assert "base" not in off.device and off.host["base"] == pytest.approx(fsdp.device["base"])
    q = load_config(ROOT / "configs" / "llama3.1-8b-qdora-1gpu.yaml")
    lin = spec.numel(roles=("linear",))
    four = estimate_memory(q, off_spec(q), "none", 1).device["base"] - 2 * (n_frozen - lin)
    assert 0.5 * lin < four < 0.56 * lin  # NF4 + double-quant absmax per weight
    tokens = cfg.training.micro_batch_size * cfg.data.seq_len
    cfg.training.gradient_checkpointing = False
    assert estimate_memory(cfg, spec, "fsdp2", 8).device["activations"] > 5 * fsdp.device["activations"]
    # the config's chunked loss (training.loss_chunk_tokens) holds one chunk's logits (16-bit matmul output and its
    # fp32 copy) and the hidden states' gradient, not the whole (tokens × vocab) logits
    chunk = cfg.training.loss_chunk_tokens
    assert 0 < chunk < tokens
    assert fsdp.device["logits"] == pytest.approx(chunk * spec.vocab * (2 + 4) + tokens * spec.hidden * 2)
    cfg.training.loss_chunk_tokens = 0  # our plain loss: fp32 logits, saved log-softmax, its two gradients
    assert estimate_memory(cfg, spec, "fsdp2", 8).device["logits"] == pytest.approx(tokens * spec.vocab * 12)


def test_plan_applies_the_trainers_batch_rule(capsys):
    """A global batch the cluster does not split is refused as training refuses it (one line, exit 2), not projected
    with a smaller batch; the same job on a cluster that splits it is projected with it."""
    path = str(ROOT / "configs" / "llama3.1-8b-fsdp2-8gpu.yaml")  # global 64 = micro 2 × 8 ranks × 4
    assert cli(["plan", "--config", path, "--gpus-per-node", "3"]) == 2
    assert "training.global_batch_size=64 is not a multiple of" in capsys.readouterr().err
    assert cli(["plan", "--config", path, "--gpus-per-node", "4"]) == 0


def test_gloo_waits_for_each_collective_nccl_overlaps():
    """The backend decides the overlap, not only the link: on CPUs (gloo) the step is compute + all communication,
    as measured over a shaped link between two emulated nodes (benchmarks/emulated_nodes.py); on GPUs (nccl) the
    prefetched all-gathers hide behind compute on the same link."""
    # one flat group over the two one-process nodes (auto would make a shard group of one process per node)
    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml",
        ["data.seq_len=64", "training.micro_batch_size=2", "parallel.shard_group=2"],
    )
    cpu = make_cluster("cpu", 2, 1, inter_node="ethernet", bandwidth_gbps=0.0125)
    gpu = make_cluster("h100-80gb", 2, 1, inter_node="ethernet", bandwidth_gbps=0.0125)
    assert (cpu.backend, gpu.backend) == ("gloo", "nccl")
    on_cpu = project(cfg, cpu, "fsdp2", compute_s_per_token=1e-3)
    assert on_cpu.exposed_comm_s == pytest.approx(on_cpu.comm_s)
    assert on_cpu.step_s == pytest.approx(on_cpu.compute_s + on_cpu.comm_s)
    on_gpu = project(cfg, gpu, "fsdp2", compute_s_per_token=1e-3)
    assert on_gpu.comm_s == pytest.approx(on_cpu.comm_s)  # the same bytes over the same link
    assert on_gpu.exposed_comm_s < on_gpu.comm_s
