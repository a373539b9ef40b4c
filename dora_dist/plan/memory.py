"""Per-rank memory of a job by component, for each engine: what `dora-dist plan` adds up to decide "fits".

Components (bytes on one rank; `host` ones live in CPU memory under parallel.cpu_offload):

- base: the frozen base as stored: dense in model.dtype; NF4/FP4 packed (bitsandbytes: numel/2 + block absmax,
  one uint8 code per 64 weights and an fp32 scale per 256 blocks with double quant; FSDP2: the row records of
  quant/sharded4bit.py); embeddings, norms and head stay dense. Sharded (÷N, padded) under fsdp2 / zero3.
- adapters, grads, optimizer: lora_A/lora_B/magnitude in dora.adapter_dtype, their gradients and AdamW's two
  moments in the same dtype (torch keeps optimizer state like the parameter); sharded under fsdp2 (all three),
  zero2 (grads, moments) and zero3 (all three); DeepSpeed keeps fp32 gradients, moments and master partition
  whatever the parameters' dtype, and its contiguous gradient bucket (reduce_bucket_size elements, 2 GB default).
- gathered: parameters unsharded for compute: FSDP2 holds the root unit (embeddings, head) through the step plus
  the current and the prefetched block (dense in the compute dtype, 4-bit ones dequantized) and the prefetched
  block's all-gather buffer until its copy-out (packed bytes for a 4-bit base); ZeRO-3 holds every
  persistent (≤1e5 elements) parameter whole plus the non-persistent ones of the step.
- secondary (zero3 with hpZ: parallel.shard_group below the data-parallel world): ZeRO++'s secondary partition, each
  non-persistent parameter split over the shard group in the compute dtype, beside the primary partition over all
  data-parallel ranks.

The mesh (parallel/mesh.py MeshDims) decides the shard sizes: FSDP2 shards over dp_shard (HSDP: one shard group,
not the world), ZeRO over all data-parallel ranks; under tp each rank first holds its tp slice (tp_layout.py).
- activations: what autograd saves per token and decoder block (`activation_bytes_per_token`), times the
  micro-batch's tokens and the blocks; with gradient checkpointing only each block's input is kept, plus one block's
  full activations during its recomputation (which happens after the logits are freed: the larger of the two counts).
- logits: the loss's peak: one chunk of fp32 logits for our chunked loss, the whole (tokens × vocab) logits, their
  fp32 copies, the saved log-softmax and its gradients for an unchunked one (`LOSS_STYLES`, FACTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil
from typing import TYPE_CHECKING

from dora_dist.parallel import capabilities
from dora_dist.parallel.mesh import MeshDims
from dora_dist.plan.comm import ZERO3_PERSISTENCE_THRESHOLD, four_bit, packed_row_bytes
from dora_dist.plan.model_spec import ModelSpec, ParamSpec, base_dtype_bytes, dtype_bytes
from dora_dist.plan.tp_layout import SEQUENCE_PARALLEL, leaf_split, tp_fraction

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


def is_quantized(cfg: Config, p: ParamSpec) -> bool:
    """Whether a frozen parameter is stored 4/8-bit: bitsandbytes replaces every nn.Linear of the decoder blocks
    (adapted or not; the head and embeddings stay dense), so a non-targeted o_proj is 4-bit too."""
    if cfg.quantization.mode == "none":
        return False
    return p.role == "linear" or (p.role == "base" and p.block >= 0 and len(p.shape) == 2)


def base_param_bytes(cfg: Config, p: ParamSpec, engine: str) -> float:
    """Stored bytes of one frozen parameter (whole, unsharded)."""
    q = cfg.quantization.mode
    if is_quantized(cfg, p) and q in ("nf4", "fp4"):
        if capabilities(engine).shards_params and capabilities(engine).deepspeed_stage is None:  # FSDP2's rows
            return p.shape[0] * packed_row_bytes(cfg, p.shape[0], p.shape[1])
        blocks = ceil(p.numel / 64)
        absmax = blocks + ceil(blocks / 256) * 4 if cfg.quantization.double_quant else blocks * 4
        return p.numel / 2 + absmax
    if is_quantized(cfg, p) and q == "int8":
        return p.numel + p.shape[0] * 4
    return p.numel * base_dtype_bytes(cfg)


def compute_bytes(cfg: Config) -> int:
    """Bytes per element of activations and of dequantized/gathered weights."""
    if four_bit(cfg) or cfg.quantization.mode == "int8":
        return dtype_bytes(cfg.quantization.compute_dtype)
    return 2 if cfg.training.precision == "bf16" or base_dtype_bytes(cfg) == 2 else 4


#: peak bytes per token and vocabulary entry of the loss, by implementation (see plan/FACTS.md):
#: - "plain": our `plain_causal_lm_loss_sum` (training.loss_chunk_tokens=0): the logits upcast to fp32 (the 16-bit
#:   ones are freed by the reassignment), cross-entropy saves its log-softmax; in backward the incoming and the
#:   outgoing gradient of log-softmax live beside it: 3 × 4 bytes.
#: - "hf": transformers ≥ 4.46 (`ForCausalLMLoss`): the model output keeps the 16-bit logits (a bytes) while the
#:   caller holds the output; the fp32 upcast is local; backward as above: a + 12.
#: - "hf-legacy": transformers < 4.46: the output keeps the fp32 logits (`logits.float()`, 4) and a shifted
#:   `.contiguous()` copy feeds cross-entropy (freed once log-softmax has saved its output); backward as above:
#:   4 + 12 = 16 (the slice's zero-filled gradient comes after log-softmax's saved output is freed).
#: - "compiled": torch.compile'd chunked cross-entropy (torchtune's CEWithChunkedOutputLoss, 8 chunks): the model
#:   keeps its 16-bit logits (a), inductor fuses log-softmax into the loss and saves only the log-sum-exp, and
#:   backward rebuilds one chunk's fp32 softmax and gradient at a time (2 × 4 bytes × tokens/8): a + 1.
#: Our chunked loss ("chunked") holds one chunk's fp32 logits (in place softmax) and its 16-bit matmul output,
#: plus the (tokens × hidden) gradient it computes in forward: not per vocabulary entry, see `logits_bytes`.
LOSS_STYLES = ("chunked", "plain", "hf", "hf-legacy", "compiled")


def loss_style(cfg: Config) -> str:
    """How our trainer computes this job's loss: chunked when training.loss_chunk_tokens > 0 (losses.py)."""
    return "chunked" if (cfg.training.loss_chunk_tokens or 0) > 0 else "plain"


def _adapted_modules(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """Block 0's adapted modules: full module name -> (in, out) features, from lora_A (r, in) and lora_B (out, r).

    Keyed by the module's own name (`…self_attn.q_proj`): the parameter's leaf is the only thing stripped."""
    mods: dict[str, list[int]] = {}
    for p in spec.select(roles=("lora_A", "lora_B"), block=0):
        name = p.name.rsplit(".", 1)[0]
        entry = mods.setdefault(name, [0, 0])
        if p.role == "lora_A":
            entry[0] = p.shape[1]
        else:
            entry[1] = p.shape[0]
    return {k: (v[0], v[1]) for k, v in mods.items()}


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def activation_bytes_per_token(
    cfg: Config, spec: ModelSpec, tp: int = 1, sequence_parallel: bool | None = None
) -> float:
    """Bytes autograd keeps per token for one decoder block (Llama-style: RMSNorm, attention, gated MLP, adapters on
    the targeted linears). Counted tensor by tensor from what each op saves for its backward (FACTS.md):

    - each RMSNorm: its fp32 upcast input (4h; `pow` and the `rsqrt` product save it); the frozen weight's product
      saves only the weight. Its 16-bit output (a·h) is saved only if an adapter reads it (lora_A's input);
    - attention (sdpa): q, k, v and the output (a·(2h + 2kv)); o_proj's input, a contiguous copy, only if adapted;
    - MLP: gate and up outputs (SiLU and the product save them), silu(gate) (2·a·i + a·i); down_proj's input only
      if adapted. A frozen linear saves nothing: its backward needs only its weight;
    - each adapted linear: its input in the adapter dtype (lora_A's weight gradient needs it; a separate copy per
      linear when the adapter dtype differs from the compute dtype, else shared), x·Aᵀ (r); DoRA also its output
      (the fused epilogue saves y, which the next op saves too for v/gate/up: counted once);
    - LoRA dropout (dora.dropout > 0): each adapted linear's dropped input (adapter dtype) and its mask (1 byte);
      DoRA then also runs the base matmul on the dropped input and saves that output (out features, a bytes).

    Per-call temporaries (the DoRA epilogue's fp32 blocks of ≤ 4M elements, 32 MiB) are not per token: the
    allocator headroom covers them.

    Under tensor parallelism (`tp` > 1, plan/tp_layout.py) a rank keeps 1/tp of what the split linears produce
    (q, k, v and the attention output: heads are split; gate, up, silu; the column-wise outputs) and of the
    row-wise linears' inputs; the norms' inputs stay whole (1/tp with `sequence_parallel`, tp_layout.py), as do
    the column-wise linears' input, x·Aᵀ (lora_A replicated, or all-reduced for row-wise) and the row-wise
    outputs."""
    a = compute_bytes(cfg)
    ab = dtype_bytes(cfg.dora.adapter_dtype)
    h, i, r = spec.hidden, spec.intermediate, cfg.dora.r
    kv = spec.n_kv_heads * spec.head_dim
    mods = _adapted_modules(spec)
    leaves = {_leaf(k): v for k, v in mods.items()}
    dora = bool(spec.select(roles=("magnitude",), block=0))
    sp = tp if (SEQUENCE_PARALLEL if sequence_parallel is None else sequence_parallel) else 1
    total = 2 * 4 * h / sp  # the two norms' fp32 inputs (1/tp of the tokens only under sequence parallelism)
    total += a * (2 * h + 2 * kv) / tp  # sdpa: q, k, v, output (heads split under tp)
    total += 3 * a * i / tp  # gate, up, silu(gate)
    shared_input = {"q_proj": h, "k_proj": h, "v_proj": h, "gate_proj": h, "up_proj": h}
    saved_inputs = set()
    for leaf, (in_features, out_features) in leaves.items():
        in_div, out_div = leaf_split(leaf, tp)
        fin, fout = in_features / in_div, out_features / out_div
        if ab != a:
            total += ab * fin  # x.to(adapter dtype): one copy per linear
        else:
            group = "attn_in" if leaf in ("q_proj", "k_proj", "v_proj") else "mlp_in" if leaf in shared_input else leaf
            if group not in saved_inputs:
                saved_inputs.add(group)
                total += a * fin  # the 16-bit input, saved once for the linears that share it
        total += ab * r  # x·Aᵀ
        if dora and leaf not in ("v_proj", "gate_proj", "up_proj"):
            total += a * fout  # the epilogue's output, not otherwise saved
        if cfg.dora.dropout > 0:
            total += (ab + 1) * fin  # dropped input and its mask
            if dora:
                total += a * fout  # the base matmul on the dropped input
    return float(total)


def logits_bytes(cfg: Config, spec: ModelSpec, tokens: int, style: str | None = None) -> float:
    """Peak bytes of the loss (lm_head output, its fp32 copies, the gradients), by `LOSS_STYLES`."""
    a = compute_bytes(cfg)
    style = style or loss_style(cfg)
    if style == "chunked":
        chunk = min(tokens, cfg.training.loss_chunk_tokens or tokens)
        return float(chunk * spec.vocab * (a + 4) + tokens * spec.hidden * a)
    per = {"plain": 12, "hf": a + 12, "hf-legacy": 16, "compiled": a + 1}[style]
    return float(tokens * spec.vocab * per)


def shard_sizes(engine: str, dims: MeshDims) -> tuple[int, int]:
    """(parameter shard, gradient / optimizer shard): how many ranks split each. FSDP2 shards everything over its
    shard group (dp_shard: the whole data-parallel world when flat, one group under HSDP); ZeRO-3 partitions over
    every data-parallel rank (hpZ adds a secondary copy, see estimate_memory), ZeRO-2 gradients and optimizer
    state only; DDP nothing."""
    caps = capabilities(engine)
    if caps.deepspeed_stage is not None:
        return (dims.dp if caps.shards_params else 1), dims.dp
    if caps.shards_params:
        return dims.dp_shard, dims.dp_shard
    return 1, 1


def estimate_memory(
    cfg: Config,
    spec: ModelSpec,
    engine: str,
    world: int,
    loss: str | None = None,
    dims: MeshDims | None = None,
) -> MemoryEstimate:
    """Peak memory of one rank during a training step, by component (live tensors: what the caching allocator
    hands out; project.py adds its fragmentation and what lives outside it). `loss` is one of LOSS_STYLES (default:
    what our trainer runs for this config); `dims` the job's mesh (default: one flat data-parallel group of
    `world`). Under tp each rank holds its tp slice of every split parameter (plan/tp_layout.py) before the
    data-parallel engine shards it."""
    est = MemoryEstimate(engine, world)
    caps = capabilities(engine)
    dims = dims or MeshDims(dp_shard=world)
    tp = dims.tp
    offload = bool(cfg.parallel.cpu_offload) and caps.cpu_offload
    shard, grad_shard = shard_sizes(engine, dims)
    padded = (lambda n: ceil(n / shard)) if shard > 1 else (lambda n: n)
    abytes = dtype_bytes(cfg.dora.adapter_dtype)
    trainable = spec.select(trainable=True)
    local = {p.name: p.numel * tp_fraction(p, tp) for p in spec.params}  # elements on this tp rank
    n_train = sum(local[p.name] for p in trainable)

    base = sum(base_param_bytes(cfg, p, engine) * tp_fraction(p, tp) for p in spec.select(trainable=False)) / shard
    params = sum(padded(local[p.name]) for p in trainable) * abytes
    # torch.optim.AdamW keeps its moments, and autograd the gradients, in the parameter's dtype (dora.adapter_dtype);
    # DeepSpeed's optimizer works on fp32 partitions whatever the parameters' dtype
    grads = n_train * abytes / grad_shard
    optim = 2 * n_train * abytes / grad_shard
    if caps.deepspeed_stage is not None:
        grads = n_train * 4 / grad_shard
        optim = 2 * n_train * 4 / grad_shard + n_train * 4 / dims.dp  # moments and the fp32 master partition
        grads += ds_reduce_bucket_elements(cfg) * 4  # the contiguous gradient bucket, allocated whole
    where = est.host if offload else est.device
    (est.host if offload and caps.offloads_params else est.device)["base"] = base
    (est.host if offload and caps.offloads_params else est.device)["adapters"] = params
    where["optimizer"] = optim
    est.device["grads"] = grads

    c = compute_bytes(cfg)
    if caps.shards_params and caps.deepspeed_stage is None:  # FSDP2
        from dora_dist.plan.comm import fsdp2_unit_bytes

        units = [sum(local[p.name] for p in spec.select(block=u)) for u in spec.units]
        root, blocks = units[0], units[1:]
        biggest = sorted(blocks, reverse=True)[:2] if cfg.parallel.reshard_after_forward else blocks
        # the prefetched block's all-gather output (packed bytes for a 4-bit base) lives until its copy-out; a
        # block's tp slice is gathered under tp (its share of the unit's elements)
        ag_buffer = max(
            (
                fsdp2_unit_bytes(cfg, spec, u, shard) * units[i] / max(1, spec.numel(block=u))
                for i, u in enumerate(spec.units)
                if u >= 0
            ),
            default=0,
        )
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
        if dims.dp_shard < dims.dp:  # hpZ: a secondary partition of every partitioned parameter per shard group
            est.device["secondary"] = sum(
                ceil(p.numel / dims.dp_shard) * c for p in spec.params if p.numel > ZERO3_PERSISTENCE_THRESHOLD
            )
    elif four_bit(cfg):
        # bitsandbytes dequantizes one linear at a time for its matmul
        est.device["gathered"] = max(local[p.name] for p in spec.select(roles=("linear",))) * c

    tokens = cfg.training.micro_batch_size * cfg.data.seq_len
    per_block = tokens * activation_bytes_per_token(cfg, spec, tp)
    logits = logits_bytes(cfg, spec, tokens, loss)
    if cfg.training.gradient_checkpointing:
        # the block inputs stay; one block's activations exist only while it is recomputed in backward, after the
        # logits and their gradient are freed, so only the larger of the two counts towards the peak
        # (whole on every tp rank; 1/tp of the tokens under sequence parallelism)
        sp = dims.tp if SEQUENCE_PARALLEL else 1
        act = tokens * spec.n_blocks * spec.hidden * c / sp + max(0.0, per_block - logits)
    else:
        act = spec.n_blocks * per_block
    est.device["activations"] = act
    est.device["logits"] = logits
    return est
