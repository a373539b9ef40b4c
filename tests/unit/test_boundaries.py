"""The architecture's boundaries, pinned: import layering, the weight-source registry, the one way engines write a
layer's norm state, the batching object, the load plan; and the review bugs that live at these seams."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dora_dist import DoRAConfig, DoRALinear, apply_dora, save_adapter
from dora_dist.nn import weight_source as ws

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "dora_dist"


# --- imports ---------------------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """dora_dist modules and torch.distributed imported by a file (top-level statements only, outside
    `if TYPE_CHECKING:`, when top_level_only: what runs at import time)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    if top_level_only:
        nodes = []

        def collect(body):
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    continue  # runs when called, not at import
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                nodes.append(node)
                for child in ("body", "orelse", "finalbody", "handlers"):
                    collect(getattr(node, child, []) or [])

        collect(tree.body)
    else:
        nodes = list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".")[: len(me.split(".")) - node.level + (1 if path.name == "__init__.py" else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return {n for n in out if n.startswith(("dora_dist", "torch.distributed"))}


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _graph(key, top_level_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        for dep in _imports(path, top_level_only):
            if dep in MODULES and key(dep) != key(name) and key(dep) != "dora_dist":
                graph.setdefault(key(name), set()).add(key(dep))
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def _package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_packages_form_layers_without_cycles():
    """Every import, also the ones deferred into functions, points down the layers: no package imports one that
    imports it back (nn <-> quant, quant.sharded4bit <-> its op table, config <-> models were such pairs)."""
    cycle = _find_cycle(_graph(_package, top_level_only=False))
    assert cycle is None, " -> ".join(cycle)


def test_no_import_time_cycle_between_modules():
    cycle = _find_cycle(_graph(lambda n: n, top_level_only=True))
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("dora_dist.nn", ("torch.distributed", "dora_dist.quant", "dora_dist.parallel")),
        ("dora_dist.quant", ("torch.distributed", "dora_dist.parallel")),  # quant/ does no collective work
    ],
)
def test_lower_layers_do_not_reach_up(package, forbidden):
    bad = {
        name: sorted(d for d in _imports(path, False) if d.startswith(forbidden))
        for name, path in MODULES.items()
        if name.startswith(package)
    }
    assert not {k: v for k, v in bad.items() if v}


def _package_imports(name: str) -> set[str]:
    """The dora_dist modules a module imports anywhere in its file (deferred and TYPE_CHECKING imports too)."""
    return {d for d in _imports(MODULES[name], top_level_only=False) if d in MODULES and d != "dora_dist"}


def test_config_is_a_leaf():
    """config.py imports of dora_dist only errors and the adapter settings (DoRAConfig, its `dora:` section), so every
    layer can import Config; the settings module itself imports nothing above it (errors, nn/). The rules that read
    the engine registry and the loggers are dora_dist.preflight's, registered with config, not imported by it."""
    assert _package_imports("dora_dist.config") <= {"dora_dist.errors", "dora_dist.adapters.config"}
    text = (PKG / "config.py").read_text()
    assert "importlib" not in text and "__import__" not in text  # no import the AST cannot see
    below = _package_imports("dora_dist.adapters.config")
    assert all(d == "dora_dist.errors" or d.startswith("dora_dist.nn.") for d in below), below


def test_tokenizers_parallelism_is_set_in_one_place_before_any_tokenizer():
    setters = sorted(
        name for name, path in MODULES.items() if re.search(r"environ.*TOKENIZERS_PARALLELISM", path.read_text())
    )
    assert setters == ["dora_dist.models"]  # models/ makes every tokenizer of a job (load_tokenizer, builtin.py)
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    code = "import os; from dora_dist.models import load_tokenizer; print(os.environ['TOKENIZERS_PARALLELISM'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "false"


def test_engines_write_norm_state_only_through_set_norms():
    for path in (PKG / "parallel").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"\.base_row_sq\s*=", text), f"{path.name} writes DoRALinear.base_row_sq directly"
        assert not re.search(r"ds_tensor[^\n]*\.copy_\(", text), f"{path.name} writes a ZeRO partition directly"
        assert "magnitude.to_local()" not in text, f"{path.name} writes a magnitude shard directly"


def test_readme_layout_lists_every_subpackage():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout") :]
    layout = layout[: layout.index("\n## ", 4)]
    subpackages = sorted(p.parent.name for p in PKG.glob("*/__init__.py"))
    for name in subpackages:
        assert re.search(rf"\b{name}/", layout), f"README Layout does not mention dora_dist/{name}/"
    for entry in re.findall(r"^\s+([a-z_0-9]+)/\s", layout, flags=re.M):
        assert (PKG / entry).is_dir() or (ROOT / entry).is_dir(), f"README Layout lists {entry}/ which does not exist"


# --- engine names stay inside parallel/ ------------------------------------------------------------------------------
ENGINE_NAMES = ("none", "ddp", "fsdp2", "zero2", "zero3")
#: (file, literal) pairs allowed to name an engine outside parallel/ (none: every rule reads capabilities)
ENGINE_NAME_ALLOWED: set[tuple[str, str]] = set()


def _string_literals(node: ast.AST) -> list[str]:
    """The string constants of a literal or a tuple/list/set of literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [v for elt in node.elts for v in _string_literals(elt)]
    return []


def _engine_name_comparisons(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, literal) of every engine name compared with an expression that names an engine: `x.engine ==
    "fsdp2"`, `engine in ("zero2", "zero3")`, `saved_engine.startswith("zero")`; and of every collection of engine
    names (`SHARDED = ("fsdp2", "zero3")`, compared later through the constant)."""
    hits = []
    for node in ast.walk(tree):
        literals = _string_literals(node) if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
        if len(literals) >= 2 and all(v in ENGINE_NAMES for v in literals):
            hits += [(node.lineno, v) for v in literals]
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any("engine" in ast.unparse(side).lower() for side in sides if not _string_literals(side)):
                hits += [(node.lineno, v) for side in sides for v in _string_literals(side) if v in ENGINE_NAMES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("startswith", "endswith") and "engine" in ast.unparse(node.func.value).lower():
                literals = [v for arg in node.args for v in _string_literals(arg)]
                hits += [(node.lineno, v) for v in literals if any(n.startswith(v) for n in ENGINE_NAMES)]
    return hits


def test_engine_names_are_not_compared_outside_parallel():
    """What an engine can do is declared on its class and read through `parallel.capabilities(name)`; no module
    outside parallel/ decides by comparing engine names (adding an engine = subclass + register)."""
    found = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("dora_dist/parallel/"):
            continue
        for line, literal in _engine_name_comparisons(ast.parse(path.read_text())):
            if (rel, literal) not in ENGINE_NAME_ALLOWED:
                found.append(f"{rel}:{line} compares an engine with {literal!r}")
    assert not found, "; ".join(found)


@pytest.mark.parametrize(
    "code",
    [
        'cfg.parallel.engine == "zero3"',
        'engine in ("fsdp2", "zero3")',
        'str(saved_engine).startswith("zero")',
        '"ddp" != self.engine_name',
        'COMPILE_ENGINES = ("none", "ddp", "fsdp2")',
    ],
)
def test_engine_name_rule_catches_each_form(code):
    assert _engine_name_comparisons(ast.parse(code))


def test_engine_name_rule_leaves_other_none_comparisons():
    assert not _engine_name_comparisons(ast.parse('cfg.quantization.mode != "none" and resume == "none"'))


# --- the weight-source registry ------------------------------------------------------------------------------------
def test_registry_names_every_supported_base_in_errors():
    with pytest.raises(TypeError) as err:
        ws.weight_source_for(nn.Conv2d(1, 1, 1))
    for kind in ("torch.nn.Linear", "Conv1D", "Linear4bit", "Linear8bitLt", "ShardedLinear4bit"):
        assert kind in str(err.value)


def test_a_registered_base_kind_is_used(monkeypatch):
    class Scaled(nn.Module):  # not an nn.Linear: only the registration makes it a DoRA base
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 4))

    class ScaledWeight(ws.DenseWeight):
        pass

    monkeypatch.setattr(ws, "_REGISTRY", list(ws._REGISTRY))
    ws.register_weight_source(lambda m: isinstance(m, Scaled), ScaledWeight, "test Scaled")
    layer = DoRALinear(Scaled(), r=2, alpha=4)
    assert type(layer.weight_source) is ScaledWeight
    assert layer.weight_source is layer.weight_source  # built once, not per access
    assert "test Scaled" in ws.supported_bases()


# --- norm state ----------------------------------------------------------------------------------------------------
def test_set_norms_installs_row_norms_and_magnitude():
    layer = DoRALinear(nn.Linear(4, 6), r=2, alpha=4)
    row_sq, m = torch.arange(6, dtype=torch.float32), torch.full((6,), 2.0)
    layer.set_norms(row_sq, m)
    assert torch.equal(layer.base_row_sq_norms(), row_sq) and torch.equal(layer.magnitude.detach(), m)
    with pytest.raises(ValueError, match="does not fit"):
        layer.set_norms(row_sq, torch.ones(5))


def test_cached_norms_are_moved_not_recomputed_on_another_device(monkeypatch):
    """Review bug (FSDP2 + CPU offload): cached ‖W‖² on another device than the weight were recomputed from the
    (unsharded, possibly bf16) weight. They are moved."""
    layer = DoRALinear(nn.Linear(4, 6), r=2, alpha=4)
    row_sq = torch.rand(6) + 1
    layer.set_norms(row_sq)
    layer.base_layer.weight = nn.Parameter(torch.empty(6, 4, device="meta"), requires_grad=False)  # moved

    def no_recompute(*_):
        raise AssertionError("row norms recomputed instead of moved")

    monkeypatch.setattr(type(layer.weight_source), "row_sq_norms", no_recompute)
    moved = layer.base_row_sq_norms()
    assert moved.device.type == "meta" and moved.shape == (6,)


# --- batching and load plan ----------------------------------------------------------------------------------
def test_batching_is_resolved_once_without_rewriting_the_config():
    from dora_dist.batching import Batching
    from dora_dist.config import load_config

    cfg = load_config(
        None,
        ["training.global_batch_size=12", "training.micro_batch_size=2", "training.max_steps=0", "training.epochs=2"],
    )
    before = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    b = Batching.resolve(cfg.training, world_size=3, n_samples=100)
    assert (b.grad_accum, b.global_batch_size, b.max_steps) == (2, 12, 16)
    assert json.dumps(cfg.to_dict(), sort_keys=True, default=str) == before
    with pytest.raises(ValueError, match="not a multiple"):
        Batching.resolve(cfg.training, world_size=5, n_samples=100)


@pytest.mark.parametrize(
    "overrides, kind",
    [
        (["parallel.load_on_rank0=false"], "direct"),
        (["quantization.mode=nf4"], "sharded_4bit"),
        ([], "rank0_broadcast"),
    ],
)
def test_fsdp2_chooses_its_load_plan_from_the_config(overrides, kind):
    from dora_dist.config import load_config
    from dora_dist.parallel.dist_env import DistEnv
    from dora_dist.parallel.fsdp2 import FSDP2Engine

    env = DistEnv()
    env.world_size = 2
    engine = FSDP2Engine(load_config(None, ["parallel.engine=fsdp2", "training.max_steps=1", *overrides]), env)
    plan = engine.load_plan()
    assert plan.kind == kind and engine.plan is plan
    assert plan.fills_after_shard == (kind != "direct")


def test_fsdp2_refuses_a_4bit_storage_dtype_it_would_ignore():
    from dora_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="quant_storage"):
        load_config(None, ["parallel.engine=fsdp2", "quantization.mode=nf4", "quantization.quant_storage=bfloat16"])
    load_config(None, ["parallel.engine=ddp", "quantization.mode=nf4", "quantization.quant_storage=bfloat16"])


# --- interop and packaging (review bugs) ------------------------------------------------------------------------
def test_adapter_config_holds_only_peft_lora_keys(tmp_path):
    peft = pytest.importorskip("peft")
    model = apply_dora(nn.Sequential(nn.Linear(8, 8)), DoRAConfig(r=2, target_modules=["0"]))
    save_adapter(model, tmp_path)
    keys = set(json.loads((tmp_path / "adapter_config.json").read_text()))
    known = set(peft.LoraConfig.__dataclass_fields__)
    assert keys <= known, f"keys peft does not know: {sorted(keys - known)}"


def test_declared_dependency_floors_cover_the_apis_used():
    """The code passes `dtype=` to transformers' from_pretrained/from_config (the spelling since 4.56); the
    declared floors are the versions this suite runs with."""
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d).groups() for d in deps)
    version = lambda v: tuple(int(x) for x in v.split(".")[:3])  # noqa: E731
    assert version(floors["transformers"]) >= (4, 56)
    import importlib.metadata as md

    for name, floor in floors.items():
        assert version(md.version(name).split("+")[0]) >= version(floor), name
