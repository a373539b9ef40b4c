"""Next-token loss without whole fp32 logits: lm_head + cross-entropy over chunks of tokens.

Why. The plain loss upcasts the (batch × seq × vocab) logits to fp32 and keeps them (and their softmax) for
backward: at Llama-3's 128k vocabulary and 4k tokens that is 2 GiB per sequence, more than a DoRA layer's
activations for the whole model. Here the logits of `chunk` tokens at a time are computed, reduced to their loss,
turned into their gradient (softmax − one-hot) and multiplied back into the gradient of the hidden states (and of
the head weight, if it trains) before the next chunk: one autograd node whose forward already holds the
gradients for an upstream gradient of 1, scaled in backward. Peak loss memory is O(chunk × vocab) plus one
(tokens × hidden) gradient, whatever the sequence length.

Where the head runs. The head's weight must be read where the engine has it whole: inside the model's forward
(FSDP2 unshards the root's parameters — lm_head, tied embeddings — around the root forward; ZeRO-3 gathers a
module's parameters around that module's forward; outside, they are a DTensor shard or an empty partition). So the
output-embedding module's forward is replaced, once, by one that computes the chunked loss when a loss request is
pending (and its plain forward otherwise): the model's own forward returns the loss sum in the place of `logits`.
Models that post-process logits (soft-capping, a logit scale) fall back to the plain loss; any other alteration of
the returned value is detected and reported.

Packed batches (data/packing.py) reach the model through `packed_forward_kwargs`: position ids that restart at every
document and no 2-D mask, so transformers builds the block-diagonal causal mask; an explicit 4-D mask for a model
whose attention code cannot.
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

#: tokens per chunk: 512 × 128k vocabulary × fp32 = 256 MiB of logits at a time
DEFAULT_CHUNK_TOKENS = 512
_REQUEST_ATTR = "_dora_dist_loss_request"
_PATCHED_ATTR = "_dora_dist_chunked_forward"


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ_valid CE(hidden·Wᵀ + b, labels) in fp32, chunk by chunk; gradients computed in forward (for a unit
    upstream gradient) and scaled in backward, so no chunk's logits outlive its iteration."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk: int,
        ignore_index: int,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 for float64 reference runs
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            h = hidden[start:stop]
            logits = F.linear(h, weight, bias).to(acc)  # (c, V) fp32: the only big temporary
            lab = labels[start:stop]
            valid = lab != ignore_index
            safe = torch.where(valid, lab, torch.zeros_like(lab))
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            # logsumexp and softmax in place: the chunk's logits are the only (c, V) buffer
            row_max = logits.amax(dim=-1)
            p = logits.sub_(row_max[:, None]).exp_()
            sum_exp = p.sum(dim=-1)
            lse = row_max + sum_exp.log()
            loss += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
            if need_h or need_w or need_b:
                p.div_(sum_exp[:, None])  # softmax
                p[torch.arange(stop - start, device=p.device), safe] -= 1.0
                p.mul_(valid[:, None].to(p.dtype))  # ignored tokens: no gradient
                if need_h:
                    grad_h[start:stop] = p.to(hidden.dtype) @ weight
                if need_w:
                    grad_w.addmm_(p.t(), h.to(acc))
                if need_b:
                    grad_b += p.sum(0)
            del logits, p  # freed before the next chunk is allocated
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dh = grad_h * g.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * g).to(ctx.dtypes[0]) if grad_w is not None else None
        db = (grad_b * g).to(ctx.dtypes[1]) if grad_b is not None else None
        return dh, dw, db, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Σ over tokens with label != ignore_index of CE(hidden·Wᵀ + b, label), fp32; hidden (..., H), labels (...)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    return ChunkedLinearCrossEntropy.apply(h, weight, bias, labels.reshape(-1), max(1, int(chunk_tokens)), ignore_index)


def _forward_kwargs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
) -> dict:
    """The model's inputs: a packed batch (position_ids) keeps its documents apart (data/packing.py)."""
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return packed_forward_kwargs(model, batch)


def plain_causal_lm_loss_sum(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int = -100,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference: whole logits, upcast to fp32, cross-entropy summed over next-token targets."""
    logits = model(**_forward_kwargs(model, input_ids, attention_mask, position_ids)).logits
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # ≥ fp32 (fp64 reference runs)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=ignore_index, reduction="sum"
    )


def unwrapped_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / DeepSpeed wrappers (FSDP2 and compiled blocks keep the root)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _transformers_class(model: torch.nn.Module) -> type | None:
    """The transformers class of a model (under an FSDP2 / compile class swap: the first one in its MRO)."""
    return next((c for c in type(model).__mro__ if c.__module__.startswith("transformers.models.")), None)


def masks_from_position_ids(model: torch.nn.Module) -> bool:
    """Whether the model builds the block-diagonal mask from position ids itself: its modeling code creates its
    masks through transformers.masking_utils and its attention implementation is one masking_utils serves."""
    cached = getattr(model, "_dora_dist_masks_from_position_ids", None)
    if cached is not None:
        return cached
    cls = _transformers_class(model)
    module = sys.modules.get(cls.__module__) if cls is not None else None
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        served = impl in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    except ImportError:
        served = False
    answer = bool(served and module is not None and hasattr(module, "create_causal_mask"))
    try:
        model._dora_dist_masks_from_position_ids = answer
    except AttributeError:  # pragma: no cover - a module that refuses attributes: decide again next time
        pass
    return answer


def packed_forward_kwargs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], force_4d_mask: bool = False
) -> dict[str, torch.Tensor | bool | None]:
    """Keyword arguments of the model's forward for a batch from `TokenizedDataset.collate`.

    Unpacked batch: input_ids and the padding mask. Packed batch (it has position_ids): input_ids, position_ids, no
    cache (a cache turns transformers' packed-sequence detection off) and no 2-D mask, so the model builds the
    block-diagonal causal mask from the position ids; or, for a model that cannot (or with force_4d_mask), the
    explicit 4-D mask."""
    pos = batch.get("position_ids")
    if pos is None:
        return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    from dora_dist.data.packing import block_causal_mask

    inner = unwrapped_model(model)
    kwargs = {"input_ids": batch["input_ids"], "position_ids": pos, "use_cache": False}
    if force_4d_mask or not masks_from_position_ids(inner):
        impl = getattr(getattr(inner, "config", None), "_attn_implementation", None)
        dtype = None if impl == "sdpa" else _compute_dtype(inner)
        kwargs["attention_mask"] = block_causal_mask(pos, dtype)
    return kwargs


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype attention scores are added to: the input embeddings' (fp32 if none is found)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32


def chunkable_head(model: nn.Module) -> nn.Module | None:
    """The output-embedding module if the chunked loss can stand in for it, else None (-> plain loss)."""
    inner = unwrapped_model(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or type(head) is not nn.Linear:  # a DoRA/quantized head: keep its own forward
        return None
    config = getattr(inner, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return None
    return head


def _install(head: nn.Module) -> None:
    """Make head.forward compute the chunked loss when a request is pending (idempotent)."""
    if getattr(head, _PATCHED_ATTR, False):
        return
    plain = head.forward

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        request = getattr(self, _REQUEST_ATTR, None)
        if request is None:
            return plain(hidden)
        labels, chunk, ignore_index = request
        # next-token targets: position t predicts labels[t + 1]
        return linear_cross_entropy_sum(hidden[:, :-1], self.weight, labels[:, 1:], self.bias, chunk, ignore_index)

    head.forward = types.MethodType(forward, head)
    setattr(head, _PATCHED_ATTR, True)


@contextlib.contextmanager
def _loss_request(head: nn.Module, labels: torch.Tensor, chunk: int, ignore_index: int):
    setattr(head, _REQUEST_ATTR, (labels, chunk, ignore_index))
    try:
        yield
    finally:
        setattr(head, _REQUEST_ATTR, None)


def causal_lm_loss_sum(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = -100,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ next-token cross-entropy of a batch, fp32. chunk_tokens > 0: chunked (never the whole logits in fp32);
    0, or a model whose head cannot be replaced: the plain loss. position_ids: a packed batch, whose documents
    restart their positions and see only themselves (see data/packing.py)."""
    head = chunkable_head(model) if chunk_tokens and chunk_tokens > 0 else None
    if head is None:
        return plain_causal_lm_loss_sum(model, input_ids, attention_mask, labels, ignore_index, position_ids)
    _install(head)
    with _loss_request(head, labels, int(chunk_tokens), ignore_index):
        out = model(**_forward_kwargs(model, input_ids, attention_mask, position_ids))
    loss = out.logits if hasattr(out, "logits") else out[0]
    if loss.ndim != 0 or loss.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(
            f"{type(unwrapped_model(model)).__name__} altered its head's output (got shape "
            f"{tuple(loss.shape)}, {loss.dtype}); set training.loss_chunk_tokens=0 for this model"
        )
    return loss
