"""The projection model behind `dora-dist plan`: from a Config (model built on meta, nothing downloaded) to per-rank
memory by component, the collectives of every step with their exact sizes, step time, tokens/s, scaling efficiency
and the engine to use.

    model_spec.py  the job's parameter table (meta build + apply_dora)
    hardware.py    GPU and interconnect presets, a Cluster (nodes × GPUs per node)
    comm.py        predicted collectives per engine (held equal to the counted bytes in tests/dist)
    memory.py      per-rank memory by component (held within 15% of measured live tensors, and against
                   published runs of other frameworks: benchmarks/published)
    links.py       which link each mesh dimension's collectives cross (intra / inter-node), and their time there
    tp_layout.py   what tensor parallelism splits (parameters, activations) on one tp rank
    project.py     step time = compute + non-overlapped communication; fit
    choose.py      the layouts compared (flat, HSDP / hpZ, tp), the recommendation and its reason
    report.py      the `dora-dist plan` command (--sweep: the largest seq_len / micro_batch / r that fits)
    FACTS.md       the allocator, kernel and loss facts the model counts, and where its defaults come from
"""

from dora_dist.plan.choose import candidates, recommend
from dora_dist.plan.comm import bytes_by_kind, predict_collectives
from dora_dist.plan.hardware import GPUS, INTERCONNECTS, make_cluster
from dora_dist.plan.memory import estimate_memory
from dora_dist.plan.model_spec import model_spec
from dora_dist.plan.project import project

__all__ = [
    "GPUS",
    "INTERCONNECTS",
    "bytes_by_kind",
    "candidates",
    "estimate_memory",
    "make_cluster",
    "model_spec",
    "predict_collectives",
    "project",
    "recommend",
]
