"""`dora-dist keys`: every config key with its type, default, allowed values and one-line doc.

The docs are the `#:` comments above each field in config.py (the convention Sphinx autodoc reads), so the list
cannot drift from the code; types, defaults and allowed values come from the dataclasses themselves.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from typing import Literal

from dora_dist import config as config_module
from dora_dist.config import Config


def _field_docs(cls) -> dict[str, str]:
    """{field: the `#:` comment lines just above it, joined} for one dataclass."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    docs: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#:"):
                comment.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            docs[node.target.id] = " ".join(comment)
    return docs


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _type_and_choices(tp) -> tuple[str, str]:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    literal = (
        tp if typing.get_origin(tp) is Literal else next((a for a in args if typing.get_origin(a) is Literal), None)
    )
    if literal is not None:
        return "str", ", ".join(str(c) for c in typing.get_args(literal))
    name = config_module._type_name(tp).replace("NoneType", "null")
    return name, ""


def describe_keys() -> list[dict]:
    """One record per dotted key: key, type, default, choices ('' when any value of the type), range ('' when
    none is checked), doc."""
    out = []
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        docs, types = _field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            type_name, choices = _type_and_choices(types[f.name])
            if f"{section.name}.{f.name}" == "parallel.engine":
                from dora_dist.parallel import ENGINE_CHOICES

                choices = ", ".join(ENGINE_CHOICES)
            rule = config_module._RANGES.get(f"{section.name}.{f.name}")
            out.append(
                {
                    "key": f"{section.name}.{f.name}",
                    "type": type_name,
                    "default": _default(f),
                    "choices": choices,
                    "range": rule[1].replace("must be ", "") if rule else "",
                    "doc": docs.get(f.name, ""),
                }
            )
    return out


def format_keys() -> str:
    """The text `dora-dist keys` prints: per key, `key  type = default  [choices]` and its doc indented below."""
    rows = []
    for k in describe_keys():
        default = "null" if k["default"] is None else k["default"]
        line = f"{k['key']}  ({k['type']}, default: {default})"
        if k["choices"]:
            line += f"  one of: {k['choices']}"
        if k["range"]:
            line += f"  {k['range']}"
        rows.append(line + (f"\n    {k['doc']}" if k["doc"] else ""))
    return "\n".join(rows)
