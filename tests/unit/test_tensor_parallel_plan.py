"""The pure parts of tensor parallelism (parallel/tp_plan.py, plan/comm_tp.py): which linears a plan splits and how,
the one-line errors for what tp cannot split, and the tp-local parameter shapes the communication model uses."""

from __future__ import annotations

import pytest

from dora_dist.config import load_config
from dora_dist.errors import ConfigError
from dora_dist.parallel.tp_plan import (
    LLAMA_TP_PLAN,
    head_problem,
    quantized_split_problem,
    resolve_tp_plan,
    tp_config_problem,
)
from dora_dist.plan.comm_tp import layer_kind, tp_local_spec
from dora_dist.plan.model_spec import ModelSpec, ParamSpec

NAMES = [
    "model",
    "model.layers.0.self_attn",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.q_proj.base_layer",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.mlp.up_proj",
    "lm_head",
]


def test_llama_plan_selects_module_paths_under_the_base_model():
    plan = resolve_tp_plan(NAMES, LLAMA_TP_PLAN, "model.")
    assert plan == {
        "model.layers.0.self_attn.q_proj": "colwise",
        "model.layers.0.self_attn.o_proj": "rowwise",
        "model.layers.0.mlp.down_proj": "rowwise",
        "model.layers.1.mlp.up_proj": "colwise",
    }  # not the wrapped base_layer, not lm_head


def test_transformers_local_styles_map_to_their_split():
    plan = resolve_tp_plan(NAMES, {"layers.*.self_attn.q_proj": "local_colwise"}, "model.")
    assert plan == {"model.layers.0.self_attn.q_proj": "colwise"}


def test_unsupported_plan_style_is_one_line_naming_it():
    with pytest.raises(ConfigError) as e:
        resolve_tp_plan(NAMES, {"layers.*.mlp.up_proj": "gather"}, "model.")
    msg = str(e.value)
    assert "\n" not in msg and "'gather'" in msg and "parallel.tp=1" in msg


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.mark.parametrize(
    "sizes,tp,key",
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 512}, 4, "num_attention_heads=6"),
        ({"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 512}, 3, "num_key_value_heads=2"),
        ({"num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 99}, 2, "intermediate_size=99"),
    ],
)
def test_tp_not_dividing_heads_kv_heads_or_mlp_is_named(sizes, tp, key):
    msg = head_problem(_Cfg(**sizes), tp)
    assert msg is not None and key in msg and f"parallel.tp={tp}" in msg and "\n" not in msg


def test_tp_dividing_everything_is_fine():
    assert head_problem(_Cfg(num_attention_heads=6, num_key_value_heads=2, intermediate_size=512), 2) is None


def test_quantized_base_with_tp_runs_on_ddp_and_whole_blocks_only():
    """4-bit + tp: ddp (or auto) with widths of whole 64-value blocks per rank; fsdp2 and int8 refused in one line."""
    nf4 = ["parallel.tp=2", "quantization.mode=nf4"]
    assert tp_config_problem(load_config(None, nf4), None) is None  # auto: ddp
    assert tp_config_problem(load_config(None, [*nf4, "parallel.engine=ddp"]), None) is None
    msg = tp_config_problem(load_config(None, [*nf4, "parallel.engine=fsdp2"]), None)
    assert msg is not None and "parallel.engine=ddp" in msg and "not fsdp2" in msg and "\n" not in msg
    msg = tp_config_problem(load_config(None, ["parallel.tp=2", "quantization.mode=int8"]), None)
    assert msg is not None and "quantization.mode=int8" in msg and "not implemented" in msg and "\n" not in msg
    assert tp_config_problem(load_config(None, ["parallel.tp=1", "quantization.mode=nf4"]), None) is None
    # the built-in model: o_proj's 192 inputs give 96 per rank, not whole blocks of 64
    builtin = _Cfg(hidden_size=192, num_attention_heads=6, num_key_value_heads=2, intermediate_size=512)
    msg = tp_config_problem(load_config(None, nf4), builtin)
    assert msg is not None and "self_attn.o_proj" in msg and "input width 192" in msg and "\n" not in msg
    assert quantized_split_problem(builtin, 2) == msg
    ok = _Cfg(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
    assert tp_config_problem(load_config(None, nf4), ok) is None
    # down_proj: 256 inputs over tp=4 are 64 per rank (fine), over tp=8 32 (not)
    msg = quantized_split_problem(
        _Cfg(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, intermediate_size=256), 8
    )
    assert msg is not None and "mlp.down_proj" in msg and "input width 256" in msg


def test_preflight_refuses_tp_not_dividing_the_heads_before_any_model_work(tmp_path):
    from dora_dist.preflight import check_mesh

    cfg = load_config(None, ["parallel.tp=4", "parallel.engine=fsdp2", f"model.cache_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="num_attention_heads=6"):
        check_mesh(cfg, 4)
    assert not any(tmp_path.iterdir())  # the built-in model was not built to read its config


def test_tp_local_shapes_split_the_right_dimension():
    def p(name, shape, role, trainable=False):
        return ParamSpec(name, shape, role, 0, trainable)

    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    params = [
        p(f"{q}.base_layer.weight", (64, 32), "linear"),
        p(f"{q}.lora_A", (8, 32), "lora_A", True),
        p(f"{q}.lora_B", (64, 8), "lora_B", True),
        p(f"{q}.magnitude", (64,), "magnitude", True),
        p(f"{o}.base_layer.weight", (32, 64), "linear"),
        p(f"{o}.lora_A", (8, 64), "lora_A", True),
        p(f"{o}.lora_B", (32, 8), "lora_B", True),
        p(f"{o}.magnitude", (32,), "magnitude", True),
        p("model.norm.weight", (32,), "base"),
    ]
    spec = ModelSpec(params, 1, 32, 64, 10, 4, 2, 8)
    local, kinds = tp_local_spec(spec, LLAMA_TP_PLAN, 2)
    shapes = {x.name: x.shape for x in local.params}
    assert kinds == {q: "colwise", o: "rowwise"}
    assert shapes[f"{q}.base_layer.weight"] == (32, 32) and shapes[f"{q}.lora_B"] == (32, 8)
    assert shapes[f"{q}.magnitude"] == (32,) and shapes[f"{q}.lora_A"] == (8, 32)  # A replicated
    assert shapes[f"{o}.base_layer.weight"] == (32, 32) and shapes[f"{o}.lora_A"] == (8, 32)
    assert shapes[f"{o}.lora_B"] == (32, 8) and shapes[f"{o}.magnitude"] == (32,)  # B, m replicated
    assert shapes["model.norm.weight"] == (32,)
    assert layer_kind("model.layers.3.mlp.down_proj", LLAMA_TP_PLAN) == "rowwise"
    assert layer_kind("lm_head", LLAMA_TP_PLAN) is None


def test_row_wise_partial_sums_give_the_unsplit_norm():
    """DoRALinear.partial_sums (the row-wise hook parallel/tp.py installs, here summing with the other half's
    partials by hand): a layer holding half of the input columns gets the whole layer's ‖W + s·B·A‖."""
    import torch
    from torch import nn

    from dora_dist.nn.dora_linear import DoRALinear
    from dora_dist.nn.weight_source import at_least_fp32

    torch.manual_seed(0)
    full = DoRALinear(nn.Linear(12, 5, bias=False).double(), r=3, alpha=6, adapter_dtype=torch.float64)
    with torch.no_grad():
        full.lora_B.normal_()
    want = full.weight_norm(exact=True)
    halves = []
    for cols in (slice(0, 6), slice(6, 12)):
        lin = nn.Linear(6, 5, bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(full.base_layer.weight[:, cols])
        half = DoRALinear(lin, r=3, alpha=6, adapter_dtype=torch.float64, init_magnitude=False)
        with torch.no_grad():
            half.lora_A.copy_(full.lora_A[:, cols])
            half.lora_B.copy_(full.lora_B)
        halves.append(half)
    other = halves[1]
    a1 = at_least_fp32(other.lora_A.detach())
    parts = {
        "sq": other.weight_source.row_sq_norms(),
        "wa": other.weight_source.times_A(other.lora_A),
        "g": a1 @ a1.t(),
    }

    def plus_other(tensors):
        key = ["sq"] if len(tensors) == 1 else ["wa", "g"]
        return [t + parts[k] for t, k in zip(tensors, key, strict=True)]

    halves[0].partial_sums = plus_other
    assert torch.allclose(halves[0].weight_norm(), want, rtol=1e-13, atol=0)
    assert not torch.allclose(halves[1].weight_norm(), want)  # without the sum: the local half only


def _tiny_llama_with_dora(targets):
    from transformers import AutoModelForCausalLM

    from dora_dist.adapters import apply_dora
    from dora_dist.models import dora_config_from, hf_config_from_dict

    arch = {
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 24,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
    }
    model = AutoModelForCausalLM.from_config(hf_config_from_dict(arch))
    cfg = load_config(None, [f"dora.target_modules={targets}"])
    apply_dora(model, dora_config_from(cfg))
    return model


@pytest.mark.parametrize(
    "targets,tp,expect",
    [
        ("[q_proj,v_proj,lm_head]", 2, "lm_head"),  # an adapter outside the plan
        ("[q_proj,v_proj]", 4, "num_attention_heads=6"),  # checked again on the loaded model
    ],
)
def test_apply_refuses_before_splitting_anything(targets, tp, expect):
    from types import SimpleNamespace

    from dora_dist.parallel.mesh import MeshDims
    from dora_dist.parallel.tp import apply_tensor_parallel

    model = _tiny_llama_with_dora(targets)
    with pytest.raises(ConfigError, match=expect) as e:
        apply_tensor_parallel(model, SimpleNamespace(dims=MeshDims(tp=tp)))  # no process group needed to refuse
    assert "\n" not in str(e.value)
    assert not any(hasattr(p, "placements") for p in model.parameters())


def test_batch_arithmetic_and_data_ranks_count_data_parallel_ranks():
    """A tp group reads the same batches: training.global_batch_size splits over world / tp ranks, and the tp ranks
    of a group (consecutive, tp innermost) share one data-parallel index."""
    from dora_dist.parallel.mesh import data_parallel_rank
    from dora_dist.preflight import check_batch

    cfg = load_config(None, ["parallel.tp=2", "training.global_batch_size=6", "training.micro_batch_size=3"])
    check_batch(cfg, 4)  # 6 = 3 × (4 / 2): fine with tp=2
    with pytest.raises(ConfigError, match="global_batch_size=6"):
        check_batch(load_config(None, ["training.global_batch_size=6", "training.micro_batch_size=3"]), 4)
    assert [data_parallel_rank(cfg, r, 4) for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
