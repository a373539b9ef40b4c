"""Tensor parallelism (`parallel.tp`): each decoder block's linears split over the ranks of the "tp" mesh dimension,
DoRA exact on both kinds of split.

Layout: the model's own `base_model_tp_plan` (transformers) where it has one, else the Llama family's (q, k, v, gate,
up column-wise; o, down row-wise). Applied with torch's `parallelize_module`: plain linears get torch's
ColwiseParallel / RowwiseParallel; DoRA layers get the subclasses below, which place their parameters as DTensors on
the tp mesh (so checkpoints reshard on load and FSDP2 composes on a dp × tp mesh) and run the layer on its local
shards with the collectives spelled out:

- column-wise (output rows split): W, bias, lora_B and the magnitude Shard(0); lora_A replicated. Every row's norm
  is local. Forward: none. Backward: the input's gradient (once per attention / MLP input, shared by its
  projections) and lora_A's gradient are summed over tp.
- row-wise (input columns split): W and lora_A Shard(1); lora_B, magnitude and bias replicated. ‖W‖² is summed once
  at set-up; each forward sums the (out × r) partial W·Aᵀ and the (r × r) A·Aᵀ (one all-reduce, detached) and the
  (tokens × out) partial output (before the bias). Backward: lora_B's and the magnitude's gradients are summed.

The attention modules of current transformers infer their local head count from the split projections (view(...,
-1, head_dim)); head-count attributes of older ones are divided here. parallel.tp must divide the attention heads,
the KV heads and every split width (checked by `tp_plan.tp_config_problem` before any process group, and here again).
4-bit (bitsandbytes NF4/FP4) bases split under the ddp engine: each rank keeps its rows or columns of the packed
codes and their block scales, exactly (quant/split4bit.py), where the split falls on whole quantization blocks;
fsdp2 (row-sharded 4-bit storage) and 8-bit bases are refused with parallel.tp > 1.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from dora_dist.errors import ConfigError
from dora_dist.nn.dora_linear import DoRALinear
from dora_dist.parallel.tp_plan import HEAD_ATTRS, head_problem, model_tp_plan, shared_input_parents

if TYPE_CHECKING:
    from dora_dist.parallel.mesh import JobMesh


# ------------------------------------------------------------------------------------------------------------
# collectives with the gradients TP needs (Megatron's f and g)
# ------------------------------------------------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over tp (an input or a parameter every tp rank holds whole, each
    rank's gradient being the part from its own shard)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # COLLECTIVE (tp): a gradient of the input or a replicated param
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Sum over tp forward (partial outputs of a row-wise split); identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)  # COLLECTIVE (tp): the layer's output, tokens × out
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _summed_together(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """`tensors` (detached, in the first one's dtype) summed over `group` by ONE all-reduce of their concatenation,
    returned as views of it in their own shapes. COLLECTIVE."""
    dtype = tensors[0].dtype
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, group=group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def partial_sums_over(group: dist.ProcessGroup):
    """A DoRALinear.partial_sums: the tensors summed over `group` in ONE all-reduce of their concatenation."""

    def total(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return _summed_together(tensors, group)  # COLLECTIVE (tp): DoRA norm partials

    return total


# ------------------------------------------------------------------------------------------------------------
# DoRA layers on the tp mesh
# ------------------------------------------------------------------------------------------------------------
@dataclass
class TPSpec:
    """How one DoRA layer is split: its kind, the tp group, and the parameters every tp rank holds whole."""

    kind: str  # "colwise" | "rowwise"
    group: dist.ProcessGroup
    replicated: tuple[str, ...]
    #: column-wise: the parent module sums the input's gradient once for all its column-wise projections
    input_shared: bool = False


def tp_spec(layer: nn.Module) -> TPSpec | None:
    """The layer's split (None: not tensor-parallel)."""
    return getattr(layer, "_tp_spec", None)


def is_tensor_parallel(layer: nn.Module) -> bool:
    return tp_spec(layer) is not None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def local_parameters(layer: DoRALinear, spec: TPSpec) -> Iterator[None]:
    """Run `layer` on this rank's shards: its DTensor parameters swapped for their local tensors (autograd-connected:
    gradients reach the DTensors), the replicated trainable ones through _CopyToTP (their gradient summed over tp),
    a row-wise layer's bias left out (added once, after the output is summed)."""
    saved: list[tuple[nn.Module, str, Any]] = []

    def swap(module: nn.Module, name: str, value: Any) -> None:
        saved.append((module, name, module._parameters[name]))
        module._parameters[name] = value

    try:
        for name in ("lora_A", "lora_B", "magnitude"):
            p = layer._parameters.get(name)
            if p is None:
                continue
            local = _local(p)
            if name in spec.replicated and torch.is_grad_enabled() and local.requires_grad:
                local = _CopyToTP.apply(local, spec.group)
            swap(layer, name, local)
        base = layer.base_layer
        weight, bias = base._parameters["weight"], base._parameters.get("bias")
        assert weight is not None  # a dense nn.Linear or split 4-bit base (shard_dora_layer checked)
        swap(base, "weight", _local(weight))
        if bias is not None:
            swap(base, "bias", None if spec.kind == "rowwise" else _local(bias))
        yield
    finally:
        for module, name, value in reversed(saved):
            module._parameters[name] = value


def _tp_forward(self: DoRALinear, x: torch.Tensor) -> torch.Tensor:
    """DoRALinear.forward on this rank's shards, with the split's collectives (bound to TP layers' `forward`)."""
    spec: TPSpec = self._tp_spec  # type: ignore[assignment]
    if spec.kind == "colwise":
        if not spec.input_shared and torch.is_grad_enabled() and x.requires_grad:
            x = _CopyToTP.apply(x, spec.group)
        with local_parameters(self, spec):
            return DoRALinear.forward(self, x)
    with local_parameters(self, spec):
        out = DoRALinear.forward(self, x)
    out = _ReduceFromTP.apply(out, spec.group)
    bias = self.base_layer._parameters.get("bias")
    return out if bias is None else out + _local(bias).to(out.dtype)


#: parameter placements of a DoRA layer per split: (base weight, base bias, lora_A, lora_B, magnitude)
_PLACEMENTS = {
    "colwise": {"weight": Shard(0), "bias": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0), "magnitude": Shard(0)},
    "rowwise": {
        "weight": Shard(1),
        "bias": Replicate(),
        "lora_A": Shard(1),
        "lora_B": Replicate(),
        "magnitude": Replicate(),
    },
}


def _distribute(module: nn.Module, name: str, placement: Any, mesh: Any) -> None:
    p = module._parameters.get(name)
    if p is None:
        return
    # src_data_rank=None: every rank holds the same full tensor (same weights, adapters drawn from training.seed)
    # and keeps its own chunk, no communication
    dt = distribute_tensor(p.detach(), mesh, [placement], src_data_rank=None)
    module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))


@torch.no_grad()
def shard_dora_layer(name: str, layer: DoRALinear, kind: str, mesh: Any) -> None:
    """Place `layer`'s parameters on the tp mesh for a `kind` split, install its norm state (‖W‖² of its rows,
    summed over tp when the columns are split) and its magnitude (= the unsplit layer's ‖W + s·B·A‖), and bind the
    TP forward."""
    tp = mesh.size()
    width = layer.out_features if kind == "colwise" else layer.in_features
    if width % tp:
        raise ConfigError(
            f"parallel.tp={tp} does not divide the {'output' if kind == 'colwise' else 'input'} width {width} of "
            f"{name} (a {kind} split); use a divisor of {width}"
        )
    from dora_dist.quant.bnb import BnB4bitWeight  # imports bitsandbytes only when it is used

    source = layer.weight_source
    if (source.quantized and not isinstance(source, BnB4bitWeight)) or layer.fan_in_fan_out:
        raise ConfigError(
            f"parallel.tp={tp} cannot split {name}: tensor parallelism takes dense (out, in) nn.Linear and "
            "bitsandbytes 4-bit bases only"
        )
    group = mesh.get_group()
    places = _PLACEMENTS[kind]
    if isinstance(source, BnB4bitWeight):
        # this rank's rows / columns of the packed codes, exactly (a plain Params4bit, not a DTensor)
        from dora_dist.quant.split4bit import split_linear4bit

        try:
            split_linear4bit(name, source, kind, mesh.get_local_rank(), tp)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    else:
        _distribute(layer.base_layer, "weight", places["weight"], mesh)
    _distribute(layer.base_layer, "bias", places["bias"], mesh)
    for pname in ("lora_A", "lora_B", "magnitude"):
        _distribute(layer, pname, places[pname], mesh)
    replicated = tuple(n for n in ("lora_A", "lora_B", "magnitude") if isinstance(places[n], Replicate))
    spec = TPSpec(kind, group, replicated)
    layer._tp_spec = spec  # type: ignore[assignment]
    if kind == "rowwise":
        layer.partial_sums = partial_sums_over(group)
    layer.forward = types.MethodType(_tp_forward, layer)  # type: ignore[method-assign]
    layer.invalidate_cache()
    with local_parameters(layer, spec):
        row_sq = layer.base_row_sq_norms()  # row-wise: summed over tp (COLLECTIVE: out floats)
        norm = layer.weight_norm() if layer.magnitude is not None else None  # row-wise: COLLECTIVE (norm partials)
    layer.set_norms(row_sq, norm)


class DoRAColwiseParallel(ColwiseParallel):
    """torch's ColwiseParallel for plain linears; a DoRA layer is split by output rows (see the module docstring)."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if isinstance(module, DoRALinear):
            shard_dora_layer(getattr(module, "_tp_name", ""), module, "colwise", device_mesh)
            return module
        return super()._apply(module, device_mesh)


class DoRARowwiseParallel(RowwiseParallel):
    """torch's RowwiseParallel for plain linears; a DoRA layer is split by input columns."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if isinstance(module, DoRALinear):
            shard_dora_layer(getattr(module, "_tp_name", ""), module, "rowwise", device_mesh)
            return module
        return super()._apply(module, device_mesh)


def _divide_head_counts(model: nn.Module, plan: dict[str, str], tp: int) -> None:
    """Older attention modules keep per-module head counts used in reshapes: make them this rank's."""
    for name in plan:
        parent_name, _, child = name.rpartition(".")
        if child != "q_proj" or not parent_name:
            continue
        attn = model.get_submodule(parent_name)
        for attr in HEAD_ATTRS:
            value = attn.__dict__.get(attr)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(attn, attr, value // tp)


def _input_grad_hook(group: dist.ProcessGroup):
    """A forward pre-hook: the module's input (first positional argument or `hidden_states`) through _CopyToTP."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not torch.is_grad_enabled():
            return args, kwargs
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            args = (_CopyToTP.apply(args[0], group), *args[1:])
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor) and kwargs["hidden_states"].requires_grad:
            kwargs = {**kwargs, "hidden_states": _CopyToTP.apply(kwargs["hidden_states"], group)}
        return args, kwargs

    return hook


def _share_input_reductions(model: nn.Module, plan: dict[str, str]) -> None:
    """One backward all-reduce of N × in per attention / MLP input instead of one per column-wise projection (when
    every such projection is a DoRA layer: torch's ColwiseParallel on a plain linear reduces its own input)."""
    for parent, children in shared_input_parents(plan).items():
        specs = [tp_spec(model.get_submodule(c)) for c in children]
        if any(spec is None for spec in specs):
            continue
        for spec in specs:
            spec.input_shared = True  # type: ignore[union-attr]
        model.get_submodule(parent).register_forward_pre_hook(
            _input_grad_hook(specs[0].group),  # type: ignore[union-attr]
            with_kwargs=True,
        )


def apply_tensor_parallel(model: nn.Module, job_mesh: JobMesh) -> dict[str, str]:
    """Split `model`'s planned linears over job_mesh["tp"] (call before any data-parallel wrapping, after the real
    weights and the adapters are in place). Returns the plan applied ({module name: kind})."""
    tp = job_mesh.dims.tp
    plan = model_tp_plan(model)
    problem = head_problem(getattr(model, "config", None), tp)
    if problem:
        raise ConfigError(problem)
    for name, kind in plan.items():
        module = model.get_submodule(name)
        if isinstance(module, DoRALinear):
            module._tp_name = name  # type: ignore[assignment]  # for error messages
        elif not isinstance(module, nn.Linear) or hasattr(module.weight, "quant_state"):
            raise ConfigError(
                f"parallel.tp cannot split {name}, a {type(module).__name__} ({kind} in the plan) without a DoRA "
                "adapter; add it to dora.target_modules"
            )
    for pname, p in model.named_parameters():
        if p.requires_grad and not any(pname.startswith(n + ".") for n in plan):
            raise ConfigError(
                f"parallel.tp={tp} trains adapters on the tensor-parallel linears only, and {pname} is outside the "
                "model's tensor-parallel plan: leave it out of dora.target_modules / dora.modules_to_save, or use "
                "parallel.tp=1"
            )
    styles = {n: DoRAColwiseParallel() if k == "colwise" else DoRARowwiseParallel() for n, k in plan.items()}
    parallelize_module(model, job_mesh["tp"], styles)  # type: ignore[arg-type]
    _share_input_reductions(model, plan)
    _divide_head_counts(model, plan, tp)
    return plan


# ------------------------------------------------------------------------------------------------------------
# data-parallel gradients of TP parameters (DDP engine: DDP cannot hold DTensor parameters)
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def average_dp_gradients(params: list[nn.Parameter], group: dist.ProcessGroup, dp: int) -> None:
    """Average the local gradients of `params` over the data-parallel ranks: ONE all-reduce of their concatenation
    (in the gradients' dtype; one per dtype). COLLECTIVE (dp)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            g = _local(p.grad)
            by_dtype.setdefault(g.dtype, []).append(g)
    for grads in by_dtype.values():
        for g, total in zip(grads, _summed_together(grads, group), strict=True):  # COLLECTIVE (dp): TP-split grads
            g.copy_(total.div_(dp))


# ------------------------------------------------------------------------------------------------------------
# DoRA health (health.py) of split layers
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _tp_local_copy(p: torch.Tensor, device: torch.device) -> torch.Tensor:
    """This tp rank's part of a parameter, detached, on `device`: a tp DTensor's local tensor; under FSDP2 (a dp × tp
    DTensor) its tp part, gathered over dp (COLLECTIVE: one tensor)."""
    p = p.detach()
    if isinstance(p, DTensor) and p.device_mesh.ndim > 1:
        p = p.redistribute(p.device_mesh, [Replicate()] * (p.device_mesh.ndim - 1) + [p.placements[-1]])
    return _local(p).to(device)


@torch.no_grad()
def tp_row_view(name: str, layer: DoRALinear, owner: bool, device: torch.device):
    """A health.RowView of a split layer. Column-wise: this tp rank's rows (no norm communication); row-wise: all
    rows, W·Aᵀ summed over tp and lora_A gathered (COLLECTIVE), counted by tp rank 0. `owner`: this rank's data-
    parallel index is 0 (replicas add zeros)."""
    from dora_dist.health import RowView

    spec: TPSpec = layer._tp_spec  # type: ignore[assignment]
    tp_rank = dist.get_rank(spec.group)
    if layer.weight_source.quantized:  # a split 4-bit base: the layer's own source reads this rank's part
        source = layer.weight_source
        local_rows = source.out_features
    else:
        weight = _tp_local_copy(cast(torch.Tensor, layer.base_layer.weight), device)
        source = layer.weight_source.over_rows(weight)
        local_rows = weight.shape[0]
    magnitude = _tp_local_copy(layer.magnitude, device)
    lora_b = _tp_local_copy(layer.lora_B, device)
    row_sq = layer.base_row_sq_norms().to(device)
    if spec.kind == "colwise":
        a = _tp_local_copy(layer.lora_A, device)
        k = local_rows
        rows = torch.arange(tp_rank * k, (tp_rank + 1) * k, device=device)
        return RowView(name, rows, magnitude, lora_b, a, row_sq, source.times_A(a).to(device), layer.scaling, owner)
    a_local = _tp_local_copy(layer.lora_A, device)
    (wa,) = partial_sums_over(spec.group)([source.times_A(a_local).to(device)])  # COLLECTIVE: out × r
    a = torch.empty(a_local.shape[0], layer.in_features, dtype=a_local.dtype, device=device)
    parts = list(a.chunk(dist.get_world_size(spec.group), dim=1))
    gathered = [torch.empty_like(t) for t in parts]
    dist.all_gather(gathered, a_local.contiguous(), group=spec.group)  # COLLECTIVE: lora_A, r × in
    for dst, src in zip(parts, gathered, strict=True):
        dst.copy_(src)
    rows = torch.arange(layer.out_features, device=device)
    return RowView(name, rows, magnitude, lora_b, a, row_sq, wa, layer.scaling, owner and tp_rank == 0)


__all__ = [
    "apply_tensor_parallel",
    "is_tensor_parallel",
    "tp_spec",
    "shard_dora_layer",
    "average_dp_gradients",
    "tp_row_view",
]
