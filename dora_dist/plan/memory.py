"""Per-rank memory of a job by component, for each engine: what `dora-dist plan` adds up to decide "fits".

Components (bytes on one rank; `host` ones live in CPU memory under parallel.cpu_offload):

- base: the frozen base as stored: dense in model.dtype; NF4/FP4 packed (bitsandbytes: numel/2 + block absmax,
  one uint8 code per 64 weights and an fp32 scale per 256 blocks with double quant; FSDP2: the row records of
  quant/sharded4bit.py); embeddings, norms and head stay dense. Sharded (÷N, padded) under fsdp2 / zero3.
- adapters, grads, optimizer: lora_A/lora_B/magnitude in dora.adapter_dtype, their gradients (fp32), AdamW's two
  moments; sharded under fsdp2 (all three), zero2 (grads, moments) and zero3 (all three); DeepSpeed also keeps an
  fp32 master partition and its contiguous gradient bucket (reduce_bucket_size elements, 2 GB by default).
- gathered: parameters unsharded for compute: FSDP2 holds the root unit (embeddings, head) through the step plus
  the current and the prefetched block (dense in the compute dtype, 4-bit ones dequantized) and the prefetched
  block's all-gather buffer until its copy-out (packed bytes for a 4-bit base); ZeRO-3 holds every
  persistent (≤1e5 elements) parameter whole plus the non-persistent ones of the step.
- activations: what autograd saves per token and decoder block (`activation_bytes_per_token`), times the
  micro-batch's tokens and the blocks; with gradient checkpointing only each block's input is kept, plus one block's
  full activations during its recomputation (which happens after the logits are freed: the larger of the two counts).
- logits: the (tokens × vocab) logits, their fp32 upcast/shifted copy, the log-softmax saved by cross-entropy and
  the logits' gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil
from typing import TYPE_CHECKING

from dora_dist.parallel import capabilities
from dora_dist.plan.comm import ZERO3_PERSISTENCE_THRESHOLD, four_bit, packed_row_bytes
from dora_dist.plan.model_spec import ModelSpec, ParamSpec, base_dtype_bytes, dtype_bytes

if TYPE_CHECKING:
    from dora_dist.config import Config


@dataclass
class MemoryEstimate:
    engine: str
    world: int
    device: dict[str, float] = field(default_factory=dict)  # component -> bytes on the accelerator
    host: dict[str, float] = field(default_factory=dict)  # component -> bytes in CPU memory (offload)

    @property
    def device_total(self) -> float:
        return sum(self.device.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


DS_REDUCE_BUCKET_DEFAULT = 500_000_000


def ds_reduce_bucket_elements(cfg: Config) -> int:
    """DeepSpeed's gradient bucket (`zero_optimization.reduce_bucket_size`, default 5e8 elements: 2 GB in fp32,
    allocated in full whatever the model's size), from the user's DeepSpeed JSON when it sets one."""
    path = getattr(cfg.parallel, "deepspeed_config", None)
    if path:
        import json
        from pathlib import Path

        try:
            zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
            value = zero.get("reduce_bucket_size")
            if isinstance(value, (int, float)):
                return int(value)
        except (OSError, ValueError):
            pass
    return DS_REDUCE_BUCKET_DEFAULT


def base_param_bytes(cfg: Config, p: ParamSpec, engine: str) -> float:
    """Stored bytes of one frozen parameter (whole, unsharded)."""
    q = cfg.quantization.mode
    if p.role == "linear" and q in ("nf4", "fp4"):
        if capabilities(engine).shards_params and capabilities(engine).deepspeed_stage is None:  # FSDP2's rows
            return p.shape[0] * packed_row_bytes(cfg, p.shape[0], p.shape[1])
        blocks = ceil(p.numel / 64)
        absmax = blocks + ceil(blocks / 256) * 4 if cfg.quantization.double_quant else blocks * 4
        return p.numel / 2 + absmax
    if p.role == "linear" and q == "int8":
        return p.numel + p.shape[0] * 4
    return p.numel * base_dtype_bytes(cfg)


def compute_bytes(cfg: Config) -> int:
    """Bytes per element of activations and of dequantized/gathered weights."""
    if four_bit(cfg) or cfg.quantization.mode == "int8":
        return dtype_bytes(cfg.quantization.compute_dtype)
    return 2 if cfg.training.precision == "bf16" or base_dtype_bytes(cfg) == 2 else 4


def activation_bytes_per_token(cfg: Config, spec: ModelSpec) -> float:
    """Bytes autograd keeps per token for one decoder block (Llama-style: RMSNorm, attention, gated MLP, DoRA
    on the targeted linears). Counted tensor by tensor from the layers' forward code:

    - 2 RMSNorms: the fp32 upcast input, the normalized fp32 value and the weighted output (2·4h + a·h each);
    - each DoRA linear (out features o): its input is shared with the others reading the same tensor; it saves
      x·Aᵀ (r) and the base-plus-LoRA output that the magnitude scales (o); the scaled output (o) is the next op's
      input;
    - attention: rotated q and k, v (h + 2·kv), and the sdpa output (h) plus its reshaped copy for o_proj (h);
    - MLP: gate and up outputs (2i), silu(gate) (i), the product fed to down_proj (i).

    Not per token, so not here: in 16 bits the DoRA epilogue sums scale ⊙ base + low-rank in fp32 blocks of at
    most 4M elements (two live at once, 32 MiB on a GPU, freed before the next layer) and saves nothing in fp32;
    the planner's headroom covers them.
    """
    a = compute_bytes(cfg)
    h, i, r = spec.hidden, spec.intermediate, cfg.dora.r
    kv = spec.n_kv_heads * spec.head_dim
    targeted = {p.name.rsplit(".", 2)[0]: p.shape[0] for p in spec.select(roles=("magnitude",), block=0)}
    if not targeted:  # LoRA (use_dora=False) or magnitude-less: count lora_B rows
        targeted = {p.name.rsplit(".", 1)[0]: p.shape[0] for p in spec.select(roles=("lora_B",), block=0)}
    dora = sum(a * (r + o) for o in targeted.values())
    norms = 2 * (2 * 4 * h + a * h)
    attn = a * (h + 2 * kv) + 2 * a * h
    mlp = a * 4 * i
    return float(norms + dora + attn + mlp)


def logits_bytes_per_token(cfg: Config, spec: ModelSpec) -> float:
    a = compute_bytes(cfg)
    return float(spec.vocab * (a + 3 * 4))


def estimate_memory(cfg: Config, spec: ModelSpec, engine: str, world: int) -> MemoryEstimate:
    """Peak memory of one rank during a training step, by component."""
    est = MemoryEstimate(engine, world)
    caps = capabilities(engine)
    offload = bool(cfg.parallel.cpu_offload) and caps.cpu_offload
    shard = world if caps.shards_params else 1
    padded = (lambda n: ceil(n / shard)) if shard > 1 else (lambda n: n)
    abytes = dtype_bytes(cfg.dora.adapter_dtype)
    trainable = spec.select(trainable=True)
    n_train = sum(p.numel for p in trainable)

    base = sum(base_param_bytes(cfg, p, engine) for p in spec.select(trainable=False)) / shard
    params = sum(padded(p.numel) for p in trainable) * abytes if shard > 1 else n_train * abytes
    grad_shard = world if caps.shards_optimizer else 1
    grads = n_train * 4 / grad_shard
    optim = 2 * n_train * 4 / grad_shard
    if caps.deepspeed_stage is not None:
        optim += n_train * 4 / world  # fp32 master partition
        grads += ds_reduce_bucket_elements(cfg) * 4  # the contiguous gradient bucket, allocated whole
    where = est.host if offload else est.device
    (est.host if offload and caps.offloads_params else est.device)["base"] = base
    (est.host if offload and caps.offloads_params else est.device)["adapters"] = params
    where["optimizer"] = optim
    est.device["grads"] = grads

    c = compute_bytes(cfg)
    if caps.shards_params and caps.deepspeed_stage is None:  # FSDP2
        from dora_dist.plan.comm import fsdp2_unit_bytes

        units = [sum(p.numel for p in spec.select(block=u)) for u in spec.units]
        root, blocks = units[0], units[1:]
        biggest = sorted(blocks, reverse=True)[:2] if cfg.parallel.reshard_after_forward else blocks
        # the prefetched block's all-gather output (packed bytes for a 4-bit base) lives until its copy-out
        ag_buffer = max((fsdp2_unit_bytes(cfg, spec, u, world) for u in spec.units if u >= 0), default=0)
        est.device["gathered"] = (root + sum(biggest)) * c + ag_buffer
    elif caps.deepspeed_stage == 3:
        persistent = sum(
            p.numel * (abytes if p.trainable else base_dtype_bytes(cfg))
            for p in spec.params
            if p.numel <= ZERO3_PERSISTENCE_THRESHOLD
        )
        big = sorted(
            (p.numel * base_dtype_bytes(cfg) for p in spec.params if p.numel > ZERO3_PERSISTENCE_THRESHOLD),
            reverse=True,
        )
        est.device["gathered"] = persistent + sum(big[:2])
    elif four_bit(cfg):
        # bitsandbytes dequantizes one linear at a time for its matmul
        est.device["gathered"] = max(p.numel for p in spec.select(roles=("linear",))) * c

    tokens = cfg.training.micro_batch_size * cfg.data.seq_len
    per_block = tokens * activation_bytes_per_token(cfg, spec)
    logits = tokens * logits_bytes_per_token(cfg, spec)
    if cfg.training.gradient_checkpointing:
        # the block inputs stay; one block's activations exist only while it is recomputed in backward, after the
        # logits and their gradient are freed, so only the larger of the two counts towards the peak
        act = tokens * spec.n_blocks * spec.hidden * c + max(0.0, per_block - logits)
    else:
        act = spec.n_blocks * per_block
    est.device["activations"] = act
    est.device["logits"] = logits
    return est
