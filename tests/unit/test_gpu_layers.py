"""CUDA-only checks (`pytest -m gpu`): the layer on the GPU against peft and against its own fp32 CPU result,
bf16 activations, bitsandbytes' CUDA 4-bit kernels, and one training step of the built-in model on CUDA."""

import copy

import pytest
import torch
from torch import nn

from dora_dist import DoRAConfig, DoRALinear, apply_dora

pytestmark = pytest.mark.gpu


def _set_adapter(layer: DoRALinear, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
        layer.magnitude.mul_(1 + 0.05 * torch.randn(layer.magnitude.shape, generator=g).to(layer.magnitude))


def test_dense_cuda_matches_cpu_fp32():
    torch.manual_seed(0)
    cpu = DoRALinear(nn.Linear(256, 192), r=8, alpha=16)
    _set_adapter(cpu)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(64, 256)
    y_cpu, y_gpu = cpu(x), gpu(x.cuda())
    y_cpu.square().sum().backward()
    y_gpu.square().sum().backward()
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    for name in ("lora_A", "lora_B", "magnitude"):
        torch.testing.assert_close(getattr(gpu, name).grad.cpu(), getattr(cpu, name).grad, rtol=1e-3, atol=1e-4)


def test_dense_bf16_cuda_matches_peft():
    peft = pytest.importorskip("peft")

    class Holder(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    base = nn.Linear(256, 192).cuda().to(torch.bfloat16)
    ours = DoRALinear(copy.deepcopy(base), r=8, alpha=16)
    _set_adapter(ours)
    ref = peft.get_peft_model(
        Holder(copy.deepcopy(base)), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], use_dora=True)
    )
    layer = ref.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    # peft computes its norm in bf16, ours in fp32: agreement to bf16 resolution.
    torch.testing.assert_close(ours(x).float(), ref(x).float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_cuda_fused_dequant_matches_dense_reference(quant_type):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(256, 192, bias=True)
    q = bnb.nn.Linear4bit(256, 192, bias=True, compute_dtype=torch.float32, quant_type=quant_type)
    q.load_state_dict(dense.state_dict())
    q = q.cuda()
    layer = DoRALinear(q, r=8, alpha=16)
    _set_adapter(layer)
    w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    ref = DoRALinear(nn.Linear(256, 192).cuda(), r=8, alpha=16)
    with torch.no_grad():
        ref.base_layer.weight.copy_(w)
        ref.base_layer.bias.copy_(q.bias)
        for name in ("lora_A", "lora_B", "magnitude"):
            getattr(ref, name).copy_(getattr(layer, name))
    ref.invalidate_cache()
    x = torch.randn(48, 256, device="cuda")
    y, y_ref = layer(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for name in ("lora_A", "lora_B", "magnitude"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(ref, name).grad, rtol=1e-3, atol=1e-4)


def test_tiny_llama_training_step_on_cuda():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = apply_dora(LlamaForCausalLM(cfg).cuda().to(torch.bfloat16), DoRAConfig(r=4, alpha=8))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (4, 32), device="cuda")
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
