"""How tensor parallelism splits a Llama-family block, for the planner: which parameters each tp rank holds a
1/tp slice of, and which activations.

The layout is the one issue 24 asks of the engine (transformers' `base_model_tp_plan` for Llama, torchtitan's
recipe): q, k, v, gate and up are column-wise (output rows split), o and down row-wise (input columns split);
attention heads are split with q/k/v. DoRA's pieces follow their base weight:

- column-wise: W, lora_B (out × r) and the magnitude (out,) split by rows; lora_A (r × in) replicated;
- row-wise: W and lora_A split by columns; lora_B and the magnitude replicated;
- norms, embeddings and the head are replicated parameters. The engine (parallel/tp.py) runs the norms on the
  whole sequence, so the residual stream between the split layers, the norms' inputs and, with gradient
  checkpointing, the saved block inputs are whole on every tp rank. With sequence parallelism (torchtitan's
  `SequenceParallel` on the norms; `SEQUENCE_PARALLEL`, or `sequence_parallel=True` where the functions take it)
  they would hold 1/tp of the tokens. No vocabulary split is modelled (the logits stay whole on every tp rank).

The data-parallel engine then shards what each tp rank holds over its own dimension (fsdp2) or keeps it whole
(ddp).
"""

from __future__ import annotations

from dora_dist.plan.model_spec import ModelSpec, ParamSpec

COLUMN_WISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_WISE = ("o_proj", "down_proj")
#: candidate degrees `plan` tries (within one node)
TP_DEGREES = (2, 4, 8)
#: whether the tensor-parallel engine splits the residual stream by tokens (sequence parallel): not yet
SEQUENCE_PARALLEL = False


def split_kind(p: ParamSpec) -> str | None:
    """The split of one parameter of the table: "column", "row" or None (replicated)."""
    if p.block < 0:
        return None
    parts = set(p.name.split("."))
    if parts & set(COLUMN_WISE):
        return "column"
    if parts & set(ROW_WISE):
        return "row"
    return None


def tp_fraction(p: ParamSpec, tp: int) -> float:
    """Fraction of the parameter's elements one tp rank holds."""
    kind = split_kind(p)
    if tp <= 1 or kind is None:
        return 1.0
    if p.role in ("linear", "base") and len(p.shape) == 2:
        return 1.0 / tp
    split = {"column": ("lora_B", "magnitude"), "row": ("lora_A",)}[kind]
    return 1.0 / tp if p.role in split else 1.0


def leaf_split(leaf: str, tp: int) -> tuple[int, int]:
    """(input divisor, output divisor) of one adapted linear's activations on a tp rank."""
    if tp <= 1:
        return 1, 1
    if leaf in COLUMN_WISE:
        return 1, tp
    if leaf in ROW_WISE:
        return tp, 1
    return 1, 1


def tp_unfit_reason(spec: ModelSpec, tp: int, gpus_per_node: int) -> str | None:
    """Why `tp` cannot split this model on nodes of `gpus_per_node`, or None."""
    if gpus_per_node % tp:
        return f"tp={tp} does not divide the {gpus_per_node} GPUs of a node"
    return model_split_problem(spec, tp)


def model_split_problem(spec: ModelSpec, tp: int) -> str | None:
    """Why the model's heads / KV heads / MLP width cannot be split `tp` ways, or None."""
    for what, n in (
        ("attention heads", spec.n_heads),
        ("KV heads", spec.n_kv_heads),
        ("MLP width", spec.intermediate),
    ):
        if n % tp:
            return f"tp={tp} does not divide the {n} {what}"
    return None


__all__ = [
    "COLUMN_WISE",
    "ROW_WISE",
    "SEQUENCE_PARALLEL",
    "TP_DEGREES",
    "leaf_split",
    "model_split_problem",
    "split_kind",
    "tp_fraction",
    "tp_unfit_reason",
]
