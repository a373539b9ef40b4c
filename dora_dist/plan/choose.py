"""Which engine and layout to run: the candidates `dora-dist plan` compares (every engine, flat, hybrid-sharded
across nodes, tensor-parallel inside a node) and the recommendation with its reason.

The reason says what the winning layout saves: for HSDP / hpZ the bytes that no longer cross the inter-node link
(against the same engine's flat mesh), for tp the memory or the time against the best data-parallel layout.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import TYPE_CHECKING

from dora_dist.errors import ConfigError
from dora_dist.parallel import capabilities
from dora_dist.parallel.mesh import MeshDims, resolve_dims
from dora_dist.plan.hardware import Cluster, GiB
from dora_dist.plan.model_spec import ModelSpec
from dora_dist.plan.project import Projection, layout_label, project, valid_engines
from dora_dist.plan.tp_layout import TP_DEGREES, tp_unfit_reason

if TYPE_CHECKING:
    from dora_dist.config import Config


def layouts(cfg: Config, cluster: Cluster, spec: ModelSpec, engine: str) -> list[MeshDims]:
    """The meshes `plan` compares for one engine: flat data parallelism; on several nodes, where the engine can,
    the base sharded inside each node and replicated across (HSDP / hpZ); where it composes with tensor
    parallelism, tp = 2, 4, 8 inside a node, with the engine's default data-parallel layout (one node's shard
    group across nodes) and flat."""
    world, gpn = cluster.world, cluster.gpus_per_node

    def resolved(tp: int, group: int) -> MeshDims | None:
        c = copy.deepcopy(cfg)
        c.parallel.tp, c.parallel.shard_group, c.parallel.engine = tp, group, engine
        if tp > 1 and c.quantization.mode != "none":
            from dora_dist.parallel.tp_plan import quantized_split_problem, quantized_tp_problem

            widths = SimpleNamespace(
                hidden_size=spec.hidden,
                num_attention_heads=spec.n_heads,
                num_key_value_heads=spec.n_kv_heads,
                head_dim=spec.head_dim,
                intermediate_size=spec.intermediate,
            )
            # what the trainer refuses: fsdp2 + tp over a 4-bit base, widths that are not whole quantization blocks
            if quantized_tp_problem(c) or quantized_split_problem(widths, tp):
                return None
        try:
            return resolve_dims(c, world, gpn, engine)
        except ConfigError:
            return None

    caps = capabilities(engine)
    out = [resolved(1, world)]
    if cluster.nodes > 1 and caps.hybrid_shard and caps.shards_params:
        out.append(resolved(1, gpn))
    if caps.tensor_parallel and world > 1:
        for tp in TP_DEGREES:
            if tp <= gpn and not tp_unfit_reason(spec, tp, gpn):
                out += [resolved(tp, 0), resolved(tp, world // tp)]  # one node's shard group; flat
    seen: list[MeshDims] = []
    for d in out:
        # shard groups of one rank under tp (one node's data-parallel ranks = 1): the whole tp slice on every rank,
        # the same traffic as the flat dp × tp layout with more memory; left out
        replicated = d is not None and d.tp > 1 and d.dp_replicate > 1 and d.dp_shard == 1
        if d is not None and d not in seen and not replicated:
            seen.append(d)
    return seen


def candidates(cfg: Config, cluster: Cluster, spec: ModelSpec, **kw) -> list[Projection]:
    """Every engine and layout (and CPU offload where the engine has it) this job could run with on `cluster`:
    flat, HSDP / hpZ across nodes, and the tensor-parallel layouts that fit (`layouts`). Layouts whose
    collectives comm.py cannot predict yet are left out."""
    out = []
    for engine in valid_engines(cfg, cluster.world):
        for dims in layouts(cfg, cluster, spec, engine):
            for off in (False, True) if capabilities(engine).cpu_offload and dims.tp == 1 else (False,):
                p = project(cfg, cluster, engine, off, spec, dims=dims, **kw)
                if p.comm_modelled and (dims.tp == 1 or p.fits):
                    out.append(p)
    return out


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e8 else f"{nbytes / 2**20:,.1f} MiB"


def layout_reason(best: Projection, projs: list[Projection], cluster: Cluster | None) -> str:
    """Why a hybrid or tensor-parallel layout beats the flat ones: the bytes that no longer cross nodes, or the
    memory tp frees."""
    if best.dims.hybrid:
        flat = [p for p in projs if p.engine == best.engine and not p.dims.hybrid and p.dims.tp == 1]
        link = cluster.inter.name if cluster else "inter-node"
        crossing = sorted(
            {c.what for c in best.collectives if c.dim in ("dp_replicate", "dp") and c.nbytes > 8},
        )
        why = (
            f"{best.label}: across nodes only {'; '.join(crossing) or 'scalars'} "
            f"({_gb(best.link_bytes.get('inter_node', 0))} per step over {link})"
        )
        if flat:
            f = min(flat, key=lambda p: p.cpu_offload)
            why += f"; flat {f.label} moves {_gb(f.link_bytes.get('inter_node', 0))} per step over it"
            why += f" ({f.tokens_per_s:,.0f} tokens/s)" if f.fits else " and does not fit"
        return why
    if best.dims.tp > 1:
        no_tp = [p for p in projs if p.dims.tp == 1]
        fitting = [p for p in no_tp if p.fits]
        if not fitting and no_tp:
            closest = min(no_tp, key=lambda p: p.need_bytes)
            return (
                f"tp={best.dims.tp}: no data-parallel layout fits (the closest, {closest.label}, needs "
                f"{closest.need_bytes / GiB:.1f} GiB); splitting the blocks' weights and activations over "
                f"{best.dims.tp} GPUs of a node brings them to {best.need_bytes / GiB:.1f} GiB"
            )
        if fitting:
            runner = max(fitting, key=lambda p: p.tokens_per_s)
            return (
                f"tp={best.dims.tp}: {best.tokens_per_s:,.0f} tokens/s against {runner.tokens_per_s:,.0f} for the "
                f"best data-parallel layout ({runner.label})"
            )
    return ""


def recommend(projs: list[Projection], cluster: Cluster | None = None) -> tuple[Projection | None, str]:
    """The fastest projection that fits, and a sentence saying why (for a hybrid or tensor-parallel layout: what
    it saves against the flat ones, `layout_reason`)."""
    unmodelled = [p for p in projs if not p.comm_modelled and p.fits]
    projs = [p for p in projs if p.comm_modelled]
    fitting = [p for p in projs if p.fits]
    if not fitting and unmodelled:
        small = min(unmodelled, key=lambda p: p.need_bytes)
        names = ", ".join(p.label for p in unmodelled)
        return None, (
            f"only layouts whose communication plan/comm.py does not model yet fit: {names} (the smallest, "
            f"{small.label}, needs {small.need_bytes / GiB:.1f} GiB per GPU); no time projected for them"
        )
    if not fitting:
        best = min(projs, key=lambda p: p.need_bytes)
        reason = (
            f"needs {best.need_bytes / GiB:.1f} GiB per GPU, has {best.have_bytes / GiB:.0f} GiB"
            if best.need_bytes > best.have_bytes
            else "; ".join(best.notes)
        )
        return None, (
            f"does not fit with any engine; the closest, {layout_label(best.engine, best.dims)}"
            f"{' + CPU offload' if best.cpu_offload else ''}, {reason}. Use more GPUs, a 4-bit base, "
            "gradient checkpointing or a smaller micro-batch / sequence"
        )
    best = max(fitting, key=lambda p: (p.tokens_per_s, -p.need_bytes))
    moved = sum(best.comm_bytes.values())
    why = (
        f"{layout_label(best.engine, best.dims)}{' + CPU offload' if best.cpu_offload else ''}: fits "
        f"({best.need_bytes / GiB:.1f} of "
        f"{best.have_bytes / GiB:.0f} GiB), {moved / 2**20:,.1f} MiB of collectives per step "
        f"({best.exposed_comm_s * 1e3:.1f} ms not hidden behind {best.compute_s * 1e3:.0f} ms of compute), "
        f"{best.tokens_per_s:,.0f} tokens/s"
    )
    others = [p for p in fitting if p is not best]
    if others:
        runner = max(others, key=lambda p: p.tokens_per_s)
        why += (
            f"; next: {runner.label} at "
            f"{runner.tokens_per_s:,.0f} tokens/s ({sum(runner.comm_bytes.values()) / 2**20:,.1f} MiB per step)"
        )
    unfit = sorted({p.engine for p in projs if not p.fits} - {p.engine for p in fitting})
    if unfit:
        why += f"; engines that do not fit: {', '.join(unfit)}"
    layout = layout_reason(best, projs, cluster)
    if layout:
        why += f". Why this layout: {layout}"
    return best, why


__all__ = ["candidates", "layout_reason", "layouts", "recommend"]
