"""`dora-dist merge --verify`: the written shards read back one tensor at a time and checked against the base +
adapter, so the check stays within the merge's memory bound.

- an adapted weight: W'·x for a few random inputs x against an independent float64 evaluation of
  m ⊙ (W + sBA)·x / ‖W + sBA‖ (row chunks of the base as training saw it: dense, or dequantized 4-bit), within
  the bound the two roundings allow: (u_out + (in + r + 8)·u_fp32) · (|W + sBA|·|x|) · m/‖W + sBA‖ per output,
  doubled for second-order terms (u_out: unit roundoff of the output dtype; in + r + 8 fp32 operations form
  each merged element and its row norm);
- a dequantized 4-bit weight: the dequantized base, to the output dtype's rounding;
- every other tensor: equal to the base's (or the modules_to_save tensor) in the output dtype, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dora_dist.errors import JobFault
from dora_dist.merge.plan import MergePlan
from dora_dist.merge.tensors import base_module, dora_layer, to_stored_layout

INPUTS = 4  # random input vectors per adapted weight


class MergeVerificationError(JobFault):
    """The written merge does not match base + adapter (a bug: nothing is published)."""


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


@torch.no_grad()
def check_adapted(plan: MergePlan, key: str, written: torch.Tensor, seed: int) -> float:
    """Largest |W'x − ref| / bound over the outputs (≤ 1 passes) for one merged weight."""
    action = plan.actions[key]
    layer = dora_layer(plan, action.module, base_module(plan, action, plan.checkpoint.read(action.source)))
    source = layer.weight_source
    w_out = (written.t() if action.conv1d else written).to(torch.float64)  # (out, in)
    n_in, r = layer.in_features, layer.r
    x = torch.randn(INPUTS, n_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a, b = layer.lora_A.double(), layer.lora_B.double()
    m = layer.magnitude.double() if layer.use_dora else None
    s = layer.scaling
    got = x @ w_out.t()
    want = torch.empty_like(got)
    size = torch.empty_like(got)
    for start, chunk in source.iter_row_chunks():
        stop = start + chunk.shape[0]
        rows = chunk.double() + s * (b[start:stop] @ a)
        scale = torch.ones(stop - start, dtype=torch.float64)
        if m is not None:
            norm = rows.norm(dim=1)
            scale = m[start:stop] / torch.where(norm == 0, torch.ones_like(norm), norm)
        want[:, start:stop] = (x @ rows.t()) * scale
        size[:, start:stop] = (x.abs() @ rows.abs().t()) * scale.abs()
    u = unit_roundoff(written.dtype) + (n_in + r + 8) * unit_roundoff(torch.float32)
    bound = 2 * u * size + torch.finfo(torch.float64).tiny
    return float(((got - want).abs() / bound).max())


@torch.no_grad()
def verify_written(plan: MergePlan, out_dir: Path, progress=None) -> dict[str, float]:
    """Check every tensor of the written shards; raise MergeVerificationError naming the first that fails.
    Returns {'adapted': n, 'worst_ratio': max error/bound over the adapted weights, 'copied': n, 'dequantized': n}."""
    from safetensors import safe_open

    worst, adapted, copied, dequantized = 0.0, 0, 0, 0
    for i, (shard, entries) in enumerate(plan.shards.items()):
        for j, e in enumerate(entries):
            with safe_open(str(out_dir / shard), framework="pt") as f:
                written = f.get_tensor(e.key)
            action = plan.actions[e.key]
            if action.kind == "merge":
                ratio = check_adapted(plan, e.key, written, seed=1000 * i + j)
                worst, adapted = max(worst, ratio), adapted + 1
                if not ratio <= 1.0:
                    raise MergeVerificationError(
                        f"--verify: merged weight {e.key} differs from base + adapter by {ratio:.3g}× the rounding "
                        "bound; the merge was not published (this is a bug: please report it)"
                    )
            elif action.kind == "dequant":
                base = base_module(plan, action, plan.checkpoint.read(action.source))
                from dora_dist.nn.weight_source import weight_source_for

                ref = to_stored_layout(weight_source_for(base).dense(torch.float64), action)
                tol = unit_roundoff(written.dtype) * ref.abs()
                dequantized += 1
                if not bool(((written.double() - ref).abs() <= tol).all()):
                    raise MergeVerificationError(f"--verify: dequantized weight {e.key} differs from the 4-bit base")
            else:
                if action.kind == "saved":
                    ref = plan.saved[action.source].to(written.dtype)
                else:
                    ref = plan.checkpoint.read(action.source).to(written.dtype)
                copied += 1
                if not torch.equal(written, ref):
                    raise MergeVerificationError(f"--verify: tensor {e.key} is not the base's / adapter's")
            if progress is not None:
                progress.update(1)
    return {"adapted": adapted, "worst_ratio": worst, "copied": copied, "dequantized": dequantized}


@torch.no_grad()
def onto_original_difference(plan: MergePlan, out_dir: Path) -> float:
    """max over adapted weights of ‖W'_written − W'_onto-original‖ / ‖W'_onto-original‖ (Frobenius), read one
    weight at a time: how far the 4-bit merge is from merging into the original weights."""
    from safetensors import safe_open

    from dora_dist.merge.tensors import merged_onto_original

    worst = 0.0
    for shard, entries in plan.shards.items():
        for e in entries:
            action = plan.actions[e.key]
            if action.kind != "merge":
                continue
            with safe_open(str(out_dir / shard), framework="pt") as f:
                written = f.get_tensor(e.key).float()
            written = written.t() if action.conv1d else written
            orig = merged_onto_original(plan, e.key)
            worst = max(worst, float((written - orig).norm() / orig.norm().clamp_min(1e-30)))
    return worst
