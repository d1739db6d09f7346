"""The experiment file: its variants, contrasts and seeds (``load_experiment``), and each run's
config (``run_config``). What the file may hold is ``harness``'s docstring."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conure_dist.config import ConfigError, RunConfig, load_config
from conure_dist.methods import DEFAULT_METHOD, METHODS


@dataclass
class Variant:
    name: str
    tasks: list[str] | None = None
    overrides: list[str] = field(default_factory=list)
    methods: list[str] | None = None


@dataclass
class Contrast:
    """Paired differences A - B of the listed tasks; A and B are ``VARIANT/METHOD``."""

    name: str
    a: str
    b: str
    tasks: list[str]


@dataclass
class Experiment:
    path: Path
    base: Path
    overrides: list[str]
    methods: list[str]
    seeds: list[int]
    variants: list[Variant]
    contrasts: list[Contrast] = field(default_factory=list)
    command_overrides: list[str] = field(default_factory=list)
    """``conure experiment``'s own ``key=value`` overrides: applied to every run, after the file's."""


def _list_of(value: Any, kind: type, key: str, path: Path) -> list:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{path}: key '{key}' must be a list of {kind.__name__}, got {value!r}")
    return value


def load_experiment(path: str | Path, command_overrides: list[str] = ()) -> Experiment:
    """Read and check an experiment file (with the command line's ``key=value`` overrides, which
    every run config takes after the file's own); errors name the file and key."""
    path = Path(path)
    for override in command_overrides:
        if override.split("=", 1)[0].strip() in ("seed", "method.name"):
            raise ConfigError(
                f"override '{override}': the experiment sets each run's seed and method "
                "(give --seeds, or the methods in the file)"
            )
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    unknown = set(data) - {"base", "overrides", "methods", "seeds", "variants", "contrasts"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}")
    if "base" not in data:
        raise ConfigError(f"{path}: key 'base' (the run config) is required")
    base = (path.parent / str(data["base"])).resolve()
    methods = _distinct(_list_of(data.get("methods", [DEFAULT_METHOD]), str, "methods", path), "methods", path)
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"{path}: key 'methods': unknown method '{m}', expected some of {list(METHODS)}")
    variants = []
    for name, spec in (data.get("variants") or {"main": {}}).items():
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"tasks", "overrides", "methods"}:
            raise ConfigError(f"{path}: key 'variants.{name}': expected a mapping with tasks, overrides, methods")
        variant = Variant(str(name), spec.get("tasks"), spec.get("overrides", []), spec.get("methods"))
        if variant.tasks is not None:
            _distinct(_list_of(variant.tasks, str, f"variants.{name}.tasks", path), f"variants.{name}.tasks", path)
        _list_of(variant.overrides, str, f"variants.{name}.overrides", path)
        if variant.methods is not None:
            for m in _distinct(
                _list_of(variant.methods, str, f"variants.{name}.methods", path), f"variants.{name}.methods", path
            ):
                if m not in METHODS:
                    raise ConfigError(f"{path}: key 'variants.{name}.methods': unknown method '{m}'")
        variants.append(variant)
    seeds = _list_of(data.get("seeds", [0]), int, "seeds", path)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: key 'seeds' must list distinct seeds, got {seeds}")
    if not methods:
        raise ConfigError(f"{path}: key 'methods' must list at least one method")
    experiment = Experiment(
        path,
        base,
        _list_of(data.get("overrides", []), str, "overrides", path),
        methods,
        seeds,
        variants,
        command_overrides=list(command_overrides),
    )
    tasks = {}  # every run config must load before any compute
    for variant in variants:
        for method in variant.methods or methods:
            cfg = run_config(experiment, variant, method, experiment.seeds[0])
            tasks[f"{variant.name}/{method}"] = [t.name for t in cfg.tasks]
    experiment.contrasts = _contrasts(data.get("contrasts") or {}, tasks, path)
    return experiment


def _contrasts(specs: Any, tasks: dict[str, list[str]], path: Path) -> list[Contrast]:
    """The ``contrasts`` mapping; ``tasks`` maps each ``VARIANT/METHOD`` to its tasks. A contrast
    compares the tasks it lists (default: the later tasks both sides learn)."""
    if not isinstance(specs, dict):
        raise ConfigError(f"{path}: key 'contrasts' must map names to {{a, b, tasks}}")
    out = []
    for name, spec in specs.items():
        key = f"contrasts.{name}"
        if not isinstance(spec, dict) or not {"a", "b"} <= set(spec) or set(spec) - {"a", "b", "tasks"}:
            raise ConfigError(f"{path}: key '{key}': expected a mapping with a, b and optionally tasks")
        for side in ("a", "b"):
            if spec[side] not in tasks:
                raise ConfigError(
                    f"{path}: key '{key}.{side}': '{spec[side]}' is not a VARIANT/METHOD of "
                    f"this experiment ({sorted(tasks)})"
                )
        shared = [t for t in tasks[spec["a"]] if t in tasks[spec["b"]]]
        chosen = _list_of(spec.get("tasks", shared[1:]), str, f"{key}.tasks", path)
        missing = [t for t in chosen if t not in shared]
        if missing or not chosen:
            raise ConfigError(
                f"{path}: key '{key}.tasks': {missing or chosen} not among the tasks that both sides learn ({shared})"
            )
        out.append(Contrast(str(name), spec["a"], spec["b"], chosen))
    return out


def _distinct(values: list[str], key: str, path: Path) -> list[str]:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"{path}: key '{key}': {repeated} listed twice")
    return values


def run_config(experiment: Experiment, variant: Variant, method: str, seed: int) -> RunConfig:
    """The run config of one (variant, method, seed)."""
    overrides = [
        *experiment.overrides,
        *variant.overrides,
        *experiment.command_overrides,
        f"method.name={method}",
        f"seed={seed}",
    ]
    try:
        cfg = load_config(experiment.base, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{experiment.path}: variant '{variant.name}', method '{method}': {exc}") from None
    if variant.tasks is not None:
        by_name = {t.name: t for t in cfg.tasks}
        missing = [t for t in variant.tasks if t not in by_name]
        if missing or not variant.tasks or variant.tasks[0] != cfg.tasks[0].name:
            raise ConfigError(
                f"{experiment.path}: key 'variants.{variant.name}.tasks': must start with "
                f"'{cfg.tasks[0].name}' and name tasks of {experiment.base} "
                f"({[t.name for t in cfg.tasks]}); unknown: {missing}"
            )
        cfg.tasks = [by_name[t] for t in variant.tasks]
    return cfg
