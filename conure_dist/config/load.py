"""Loading a run configuration: dict -> dataclass with type checks, YAML files, key=value overrides.

Keys and values are checked against the annotations of :mod:`conure_dist.config.schema`, then each
section's ``validate`` runs; errors raise :class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from conure_dist.config.schema import ConfigError, RunConfig, TaskConfig


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; configs are full of such numbers, so accept them.
    A key given twice in one mapping is an error (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (first on line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless (int -> float)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"key '{key}': must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"key '{key}': expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            raise ConfigError(
                f"key '{key}': expected a string, got {value!r} (YAML reads yes/no/on/off as "
                "true/false: quote the value)"
            )
        if not isinstance(value, str):
            raise ConfigError(f"key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            raise ConfigError(f"unknown key '{key}' (known: {', '.join(sorted(known))})")
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    if raw == "":
        return key.split("."), ""
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError:
        return key.split("."), raw  # not YAML (e.g. '@x', '[1'): a plain string, checked by type
    if isinstance(value, str) and " #" in raw and raw.strip()[:1] not in "\"'":
        value = raw.strip()  # YAML would drop an unquoted ' #...' as a comment: a path may contain it
    return key.split("."), value


def _set_dotted(tree: Any, path: list[str], value: Any, full_key: str) -> None:
    head, rest = path[0], path[1:]
    if isinstance(tree, list):
        targets = range(len(tree)) if head == "*" else None
        if targets is None:
            if not head.isdigit() or int(head) >= len(tree):
                raise ConfigError(f"override '{full_key}': '{head}' is not an index below {len(tree)}")
            targets = [int(head)]
        for i in targets:
            if rest:
                _set_dotted(tree[i], rest, value, full_key)
            else:
                tree[i] = value
        return
    if not isinstance(tree, dict):
        raise ConfigError(f"override '{full_key}': '{head}' is below a value that is not a mapping")
    if rest:
        _set_dotted(tree.setdefault(head, {}), rest, value, full_key)
    else:
        tree[head] = value


def config_from_dict(data: dict[str, Any], overrides: list[str] = (), source: str = "<dict>") -> RunConfig:
    """Build and validate a :class:`RunConfig`; errors name ``source`` (a file path)."""
    tree = _yaml_load(yaml.safe_dump(data)) if data else {}
    try:
        for text in overrides:
            path, value = _parse_override(text)
            _set_dotted(tree, path, value, text.split("=", 1)[0])
        cfg = _build(RunConfig, tree, "")
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}{_from_override(str(exc), overrides)}") from None
    return cfg


def _from_override(message: str, overrides: list[str]) -> str:
    """' (set by the override K=V)' when the key an error names came from the command line."""
    named = re.search(r"key '([^']+)'", message)
    if named is None:
        return ""
    for text in reversed(overrides):  # the last override of a key wins
        pattern = re.escape(text.split("=", 1)[0]).replace(r"\*", r"\d+")
        if re.fullmatch(pattern + r"(\..+)?", named.group(1)):
            return f" (set by the override '{text}')"
    return ""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config as ``{dotted key: value}`` (``tasks.0.lr``), lists of mappings indexed."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree and isinstance(tree[0], dict):
        return {k: v for i, value in enumerate(tree) for k, v in _flatten(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (value in ``before``, value in ``after``) wherever two configs (as
    ``to_dict`` gives them) differ, in key order."""
    old, new = _flatten(before), _flatten(after)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def changes_since(recorded: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """``config_changes(recorded, now)`` for a config recorded by an earlier run, less the keys
    the schema gained since that ``now`` leaves at their default (by convention a new option's
    default keeps the behaviour from before it existed); and those keys."""
    changes = config_changes(recorded, now)
    newer = [k for k, (_, value) in changes.items() if not _has_key(recorded, k) and value == _default_of(k)]
    return {k: v for k, v in changes.items() if k not in newer}, newer


def _has_key(tree: Any, dotted: str) -> bool:
    """Whether a config dict (as ``to_dict`` gives it) holds the dotted key (``tasks.0.lr``)."""
    for part in dotted.split("."):
        if isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        elif isinstance(tree, dict) and part in tree:
            tree = tree[part]
        else:
            return False
    return True


def _default_of(dotted: str) -> Any:
    """The schema's default of a dotted key (a task's keys: ``TaskConfig``'s), None if unknown."""
    parts = dotted.split(".")
    tree: Any = TaskConfig().__dict__ if parts[0] == "tasks" else RunConfig().to_dict()
    for part in parts[2:] if parts[0] == "tasks" else parts:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML preset, apply ``key=value`` overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return config_from_dict(data, list(overrides), source=str(path))
