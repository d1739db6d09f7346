"""Every config key with its type, default and documentation, read from the schema itself (the
docstring under each field), so the listing can never fall behind the code. ``conure config``
prints it, optionally with a preset's values."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from conure_dist.config import schema
from conure_dist.config.schema import RunConfig, TaskConfig


@dataclass
class KeyDoc:
    key: str
    """Dotted key as overrides name it (``train.topk``; ``tasks.*.lr`` for every task)."""
    type: str
    default: Any
    doc: str


def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right under its annotation in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _type_name(tp: Any) -> str:
    if get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return str(tp).replace("typing.", "") if get_origin(tp) else getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None  # required


def leaf_fields(cls: type = RunConfig, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any, str]]:
    """Every leaf key of ``cls`` with its field, annotated type and docstring (nested configs
    flattened; task keys as ``tasks.*.KEY``)."""
    hints = typing.get_type_hints(cls, vars(schema))
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaf_fields(tp, f"{key}.")
        elif get_origin(tp) is list and get_args(tp) == (TaskConfig,):
            yield from leaf_fields(TaskConfig, f"{key}.*.")
        else:
            yield key, f, tp, docs.get(f.name, "")


def describe(cls: type = RunConfig, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of ``cls`` (nested configs flattened; task keys as ``tasks.*.KEY``)."""
    out = []
    for key, f, tp, doc in leaf_fields(cls, prefix):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append(KeyDoc(key, _type_name(tp), "(required)" if required else _default(f), doc))
    return out


def value_at(tree: dict[str, Any], key: str) -> Any:
    """A config dict's value at a described key (a list over tasks for ``tasks.*.KEY``)."""
    node: Any = tree
    for part in key.split("."):
        if part == "*":
            return [value_at(item, key.split(".*.", 1)[1]) for item in node]
        node = node[part]
    return node


def format_keys(keys: list[KeyDoc], values: dict[str, Any] | None = None) -> str:
    """One block per key: ``key (type) = default`` (or the given config's value), then its doc."""
    lines = []
    for k in keys:
        shown = repr(k.default) if values is None else repr(value_at(values, k.key))
        label = "default" if values is None else "value"
        lines.append(f"{k.key} ({k.type}) {label}: {shown}")
        lines += [f"    {line}" for line in k.doc.splitlines()] if k.doc else ["    (no documentation)"]
    return "\n".join(lines)
