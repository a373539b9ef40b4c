"""CUDA paths that had no test (`pytest -m gpu`, run by benchmarks/gpu_check.sh): the allocator's peak memory of
a bf16 DoRA layer's forward, bitsandbytes' CUDA 4-bit dequantize against the project's reference decode, and a
2-process nccl FSDP2 run against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dora_dist.nn.dora_linear import DoRALinear

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def forward_memory(use_dora: bool, tokens: int, width: int) -> tuple[int, int]:
    """(peak allocated during the forward above what was allocated before it, bytes still held after it: the
    output and what autograd saved)."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(width, width, bias=False).cuda().to(torch.bfloat16), r=16, alpha=32, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # warm-up: cached norms, cuBLAS workspace
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = layer(x)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    del y
    return peak, held


def test_cuda_forward_memory_one_output_and_fp32_blocks_only():
    """The bf16 DoRA forward allocates its output (tokens × out, written in place of the base matmul's) and, at
    most, two fp32 blocks of ≤ 4M elements for the one-rounding sum (the low-rank product and the upcast base
    block): never a whole (tokens × out) fp32 tensor, 256 MiB at 16k tokens × 4096, twice the bf16 output. It keeps
    y for dL/dm: one output more than LoRA keeps."""
    tokens, width = 16384, 4096
    y_bytes = tokens * width * 2
    block = 4 * min(tokens * width, 1 << 22)
    dora_peak, dora_held = forward_memory(True, tokens, width)
    _, lora_held = forward_memory(False, tokens, width)
    assert dora_peak <= y_bytes + 2 * block + (8 << 20), f"forward peak {dora_peak / 2**20:.0f} MiB"
    assert dora_held - lora_held <= y_bytes + (1 << 20), (dora_held, lora_held)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_cuda_4bit_dequantize_equals_reference_decode(quant_type, double_quant):
    """bitsandbytes' CUDA kernel and quant/decode4bit.py read the same bytes to the same values, bit for bit."""
    bnb = pytest.importorskip("bitsandbytes")
    from dora_dist.quant.bnb import dequantize_absmax
    from dora_dist.quant.decode4bit import decode_elements, packed_bytes

    torch.manual_seed(0)
    dense = nn.Linear(512, 384, bias=False)
    q = bnb.nn.Linear4bit(
        512, 384, bias=False, compute_dtype=torch.bfloat16, quant_type=quant_type, compress_statistics=double_quant
    )
    q.load_state_dict(dense.state_dict())
    q = q.cuda()  # quantized by bitsandbytes' CUDA kernel
    qs = q.weight.quant_state
    theirs = bnb.functional.dequantize_4bit(q.weight.data, qs).float()
    n = 512 * 384
    ours = decode_elements(packed_bytes(q.weight.data), dequantize_absmax(qs), quant_type, qs.blocksize, 0, n)
    assert torch.equal(ours.view(384, 512).to(qs.dtype).float(), theirs)
    # and the DoRA norm of the wrapped layer is taken over exactly that weight
    layer = DoRALinear(q, r=8, alpha=16)
    ref = theirs.double().norm(dim=1)
    torch.testing.assert_close(layer.weight_norm().double(), ref, rtol=512 * 2**-24, atol=0)


def _quickstart_losses(tmp: Path, nproc: int) -> list[float]:
    out = tmp / f"run{nproc}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "dora_dist.train",
        "--config",
        "configs/quickstart.yaml",
        "training.max_steps=4",
        "parallel.engine=" + ("fsdp2" if nproc > 1 else "none"),
        "checkpoint.every_steps=1000",
        f"output.dir={out}",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NVIDIA_TF32_OVERRIDE": "0"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r and "step" in r]


def test_nccl_fsdp2_two_processes_match_one(tmp_path):
    """The quickstart (fp32) on 2 GPUs over nccl equals one process: same global batch, same losses (reduction
    order differs: fp32 sums of ~1e3 terms, 1e-5 relative)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    one, two = _quickstart_losses(tmp_path, 1), _quickstart_losses(tmp_path, 2)
    assert len(one) == len(two) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-5)
