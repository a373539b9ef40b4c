"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters sharded by rows (dim 0) over the data-parallel ranks.

Wrapping: `fully_shard` on every decoder block (the model's `_no_split_modules` classes) and then on the root, with
a MixedPrecisionPolicy (bf16 parameters in forward/backward when training.precision=bf16, fp32 gradient
reduction) and an optional CPUOffloadPolicy.

DoRA and sharding. fully_shard splits each parameter along dim 0 with torch.chunk semantics (ceil(out/N) rows per
rank, the last rank possibly fewer). A base weight W (out, in), its magnitude m (out,) and lora_B (out, r) all have
`out` as dim 0, so rank k holds the *same rows* of all three. The magnitude init therefore needs no weight gather:

    m_i = ‖W_i + s·(B·A)_i‖ = sqrt(‖W_i‖² + 2s·B_i·(W_i·Aᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ)   for the local rows i

Only lora_A (r, in), sharded over r, is all-gathered (r·in floats; zero at B = 0 but kept for generality).
‖W_i‖² is also cached on each layer (`DoRALinear.base_row_sq`, a non-persistent buffer that FSDP2 does not
shard) for the forward pass: computed here from the local rows in fp32 and all-gathered as (out,) floats per layer,
so forward never recomputes it from the (possibly bf16) unsharded weight. Collectives are marked `# COLLECTIVE`.

Forward and backward: FSDP2 all-gathers each block's parameters before use and reduce-scatters gradients
(averaged over ranks; `loss_scale` = world size compensates, see base.py). Under gradient accumulation,
`set_requires_gradient_sync(False)` skips the reduce-scatter on all but the last micro-step.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from dora_dist.nn.dora_linear import dora_row_norms
from dora_dist.nn.weight_source import Conv1DWeight, DenseWeight, RowsView, WeightSource
from dora_dist.parallel.base import Engine, dora_layers

try:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - torch < 2.6
    from torch.distributed._composable.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard one by one (classes in `_no_split_modules`, else ModuleList children)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    for module in model.modules():  # fallback: the longest ModuleList
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            return list(module)
    return []


class FSDP2Engine(Engine):
    name = "fsdp2"
    # bitsandbytes Params4bit cannot be sharded by fully_shard (forward raises `quant_state is required`).
    supports_quantized_base = False

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.mesh = None

    # --- wrapping ------------------------------------------------------------------------------------
    def mp_policy(self) -> MixedPrecisionPolicy:
        bf16 = self.cfg.training.precision == "bf16"
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)

    def shard_kwargs(self) -> dict:
        kwargs = {"mesh": self.mesh, "mp_policy": self.mp_policy()}
        if self.cfg.parallel.cpu_offload:
            # pinned host memory needs an accelerator; on a CPU-only run the "offload" is a no-op copy anyway
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.env.device.type == "cuda")
        return kwargs

    def _load_on_rank0(self) -> bool:
        return (bool(getattr(self.cfg.parallel, "load_on_rank0", False)) and self.env.world_size > 1
                and self.cfg.quantization.mode == "none")

    def load_device(self) -> torch.device:
        """load_on_rank0: rank 0 reads the weights into CPU memory, the other ranks build on meta (no memory)."""
        if self._load_on_rank0():
            return torch.device("cpu") if self.env.is_main else torch.device("meta")
        return self.env.device

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.env.distributed:
            raise RuntimeError("parallel.engine=fsdp2 needs several processes (launch with torchrun)")
        self.mesh = init_device_mesh(self.env.device.type, (self.env.world_size,), mesh_dim_names=("dp",))
        kwargs = self.shard_kwargs()
        full_state = buffers = None
        if self._load_on_rank0():
            # Keep rank 0's full weights (CPU) and every rank's buffers (non-persistent ones, e.g. RoPE inv_freq,
            # are in no state dict), then shard an empty (meta) model and fill it below.
            full_state = model.state_dict() if self.env.is_main else {}
            buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
            model.to("meta")
        blocks = decoder_blocks(model)
        for block in blocks:
            fully_shard(block, reshard_after_forward=self.cfg.parallel.reshard_after_forward, **kwargs)
        # The root holds embeddings, final norm and head; its params are needed right after the last block.
        fully_shard(model, reshard_after_forward=False if blocks else self.cfg.parallel.reshard_after_forward,
                    **kwargs)
        if full_state is not None:
            self._fill_from_rank0(model, full_state, buffers)
        from dora_dist.models.lowmem_load import finish_lowmem_load

        finish_lowmem_load(model, self.env.device)  # 4-bit QDoRA built on meta: allocate + load this rank's rows
        return model

    def _fill_from_rank0(self, model: nn.Module, full_state: dict, buffers: dict) -> None:
        """Allocate this rank's shards, restore buffers, receive the weights from rank 0 (one tensor at a time)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model.to_empty(device=self.env.device)
        for name, value in buffers.items():
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module._buffers[attr] = value.to(self.env.device)
        # COLLECTIVE: a broadcast of every base/adapter tensor from rank 0; each rank keeps only its rows
        set_model_state_dict(model, full_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        full_state.clear()

    # --- magnitude init from local rows ----------------------------------------------------------------
    def local_rows_source(self, layer: nn.Module) -> WeightSource:
        """This rank's rows of the base weight as a weight source: chunked row norms and W·Aᵀ, no communication
        (a 4-bit shard is dequantized a few rows at a time, a bf16 shard is never copied whole to fp32)."""
        local = layer.base_layer.weight.to_local()
        if hasattr(local, "dequantize_rows"):  # Sharded4bitTensor (issue 6): this rank's packed rows
            from dora_dist.quant.sharded4bit_source import Sharded4bitWeight

            return Sharded4bitWeight(RowsView(local))
        return DenseWeight(RowsView(local))

    def _gather_rows(self, local: torch.Tensor, out_features: int) -> torch.Tensor:
        """All-gather a row-sharded (rows,) vector into (out,) (torch.chunk layout, last shards may be short)."""
        world = self.env.world_size
        per = -(-out_features // world)
        padded = torch.zeros(per, dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        gathered = torch.empty(per * world, dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(gathered, padded)  # COLLECTIVE: (out,) floats per layer
        return gathered[:out_features]

    @torch.no_grad()
    def init_magnitudes(self, model: nn.Module) -> None:
        for _, layer in dora_layers(model):
            weight = layer.base_layer.weight
            if not isinstance(weight, DTensor):
                layer.init_magnitude()  # not sharded (e.g. outside any fully_shard unit)
                continue
            if layer.fan_in_fan_out:
                self._init_conv1d_layer(layer)
                continue
            rows = self.local_rows_source(layer)                              # this rank's rows of W
            row_sq = rows.row_sq_norms().to(self.env.device)                   # ‖W_i‖², local rows
            layer.base_row_sq = self._gather_rows(row_sq, layer.out_features).to(weight.device)
            if layer.magnitude is None:
                continue
            a = layer.lora_A.full_tensor()                                     # COLLECTIVE: all-gather A (r, in)
            b = layer.lora_B.to_local()                                        # (rows, r), same rows as W
            wa = rows.times_A(a).to(self.env.device)
            norm = dora_row_norms(row_sq, wa, a.to(self.env.device), b.to(self.env.device), layer.scaling)
            m_local = layer.magnitude.to_local()
            m_local.copy_(norm.to(m_local.dtype))

    @torch.no_grad()
    def _init_conv1d_layer(self, layer: nn.Module) -> None:
        """A transformers Conv1D stores W as (in, out), so fully_shard's dim-0 shards hold input rows, not the
        output rows the norm runs over: gather this one layer's weight (never more than one at a time), compute
        its norms, and keep this rank's chunk of the magnitude (torch.chunk layout, as fully_shard splits it)."""
        weight = layer.base_layer.weight.full_tensor()                        # COLLECTIVE: one layer's weight
        source = Conv1DWeight(RowsView(weight))
        row_sq = source.row_sq_norms()
        layer.base_row_sq = row_sq.to(weight.device)
        if layer.magnitude is not None:
            a, b = layer.lora_A.full_tensor(), layer.lora_B.full_tensor()    # COLLECTIVE: adapter of one layer
            norm = dora_row_norms(row_sq, source.times_A(a), a, b, layer.scaling)
            chunks = torch.chunk(norm, self.env.world_size)
            m_local = layer.magnitude.to_local()
            mine = chunks[self.env.rank] if self.env.rank < len(chunks) else norm[:0]
            m_local.copy_(mine.to(device=m_local.device, dtype=m_local.dtype))
        del weight

    # --- step ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    # --- adapter export --------------------------------------------------------------------------------
    def adapter_state_dict(self, model: nn.Module | None = None):
        """Gather each adapter tensor (only adapters) to full size; rank 0 keeps a CPU copy."""
        from dora_dist.adapters import adapter_state_dict as peft_state

        model = self.unwrap(model)
        out = {}
        for key, t in peft_state(model).items():  # same order on every rank
            if isinstance(t, DTensor):
                if t.device.type != self.env.device.type:
                    t = t.to(self.env.device)
                t = t.full_tensor()  # COLLECTIVE: all-gather of one adapter tensor
            if self.env.is_main:
                out[key] = t.detach().cpu().clone()
        return out if self.env.is_main else None
