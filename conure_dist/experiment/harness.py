"""``conure experiment``: methods x seeds (x variants) over one run config, then a Table-2-style
comparison (markdown + JSON) and plots.

An experiment file names a run config and what to vary::

    base: ../ml100k.yaml                # run config, relative to this file
    overrides: [train.progress=false]   # applied to every run
    methods: [conure, conure_minus, finetune, stl, finesmax, sinmo, peterrec, mtl]
    seeds: [0, 1, 2]
    variants:                           # optional; none means one variant called "main"
      main: {}
      without_like4: {tasks: [t1, like5], methods: [conure]}
      split_20_80: {overrides: [data.split=[0.15,0.05,0.8], data.root=runs/data/ml100k_20_80]}
    contrasts:                          # optional: paired differences A - B, seed by seed
      transfer: {a: main/conure, b: without_like4/conure, tasks: [like5]}

A variant may pick and reorder the base config's tasks (T1 stays first) and override keys. Each
run writes ``OUT/runs/VARIANT/METHOD/seedS/report.json``; a run whose report exists is not
repeated, so an interrupted experiment continues where it stopped. ``conure_minus`` comes from
the ``conure`` runs when both are listed (the scores before each task's pruning).

What the table, ``results.json`` and the plots hold is ``experiment_report``'s: per variant and
method each task's score when it was learned (mean and 95% confidence interval over seeds) and
paired differences with their intervals.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import yaml

from conure_dist.config import (
    ConfigError,
    RunConfig,
    TaskConfig,
    config_changes,
    load_config,
)
from conure_dist.dist import DistInfo
from conure_dist.errors import UserError
from conure_dist.experiment.report import summarize, write_results
from conure_dist.fs import join
from conure_dist.methods import DEFAULT_METHOD, METHODS
from conure_dist.report import as_before_pruning

log = logging.getLogger(__name__)


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
            raise ConfigError(f"override '{override}': the experiment sets each run's seed and method "
                              "(give --seeds, or the methods in the file)")
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
            for m in _distinct(_list_of(variant.methods, str, f"variants.{name}.methods", path),
                               f"variants.{name}.methods", path):
                if m not in METHODS:
                    raise ConfigError(f"{path}: key 'variants.{name}.methods': unknown method '{m}'")
        variants.append(variant)
    seeds = _list_of(data.get("seeds", [0]), int, "seeds", path)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: key 'seeds' must list distinct seeds, got {seeds}")
    if not methods:
        raise ConfigError(f"{path}: key 'methods' must list at least one method")
    experiment = Experiment(path, base, _list_of(data.get("overrides", []), str, "overrides", path), methods,
                            seeds, variants, command_overrides=list(command_overrides))
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
                raise ConfigError(f"{path}: key '{key}.{side}': '{spec[side]}' is not a VARIANT/METHOD of "
                                  f"this experiment ({sorted(tasks)})")
        shared = [t for t in tasks[spec["a"]] if t in tasks[spec["b"]]]
        chosen = _list_of(spec.get("tasks", shared[1:]), str, f"{key}.tasks", path)
        missing = [t for t in chosen if t not in shared]
        if missing or not chosen:
            raise ConfigError(f"{path}: key '{key}.tasks': {missing or chosen} not among the tasks that "
                              f"both sides learn ({shared})")
        out.append(Contrast(str(name), spec["a"], spec["b"], chosen))
    return out


def _distinct(values: list[str], key: str, path: Path) -> list[str]:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"{path}: key '{key}': {repeated} listed twice")
    return values


def run_config(experiment: Experiment, variant: Variant, method: str, seed: int) -> RunConfig:
    """The run config of one (variant, method, seed)."""
    overrides = [*experiment.overrides, *variant.overrides, *experiment.command_overrides, f"method.name={method}",
                 f"seed={seed}"]
    try:
        cfg = load_config(experiment.base, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{experiment.path}: variant '{variant.name}', method '{method}': {exc}") from None
    if variant.tasks is not None:
        by_name = {t.name: t for t in cfg.tasks}
        missing = [t for t in variant.tasks if t not in by_name]
        if missing or not variant.tasks or variant.tasks[0] != cfg.tasks[0].name:
            raise ConfigError(f"{experiment.path}: key 'variants.{variant.name}.tasks': must start with "
                              f"'{cfg.tasks[0].name}' and name tasks of {experiment.base} "
                              f"({[t.name for t in cfg.tasks]}); unknown: {missing}")
        cfg.tasks = [by_name[t] for t in variant.tasks]
    return cfg


def _runs_of(methods: list[str]) -> list[str]:
    """The runs to make: a method whose report another listed method's run yields (Conure- from
    Conure's) is not run on its own."""
    return [m for m in methods if METHODS[m].report_from not in methods]


def run_experiment(experiment: Experiment, out: str, dist: DistInfo, jobs: int = 1,
                   share_first_task: bool = True) -> dict[str, Any]:
    """Every run not already reported, one after another, or ``jobs`` at a time side by side
    (``experiment_jobs``; single-process runs only), then the summary. With ``share_first_task``
    the runs share T1's train phase through ``OUT/first_task`` (``train.first_task`` module;
    unless the config names its own ``train.first_task_cache``): each distinct T1 is trained
    once, and side by side the runs that reuse one start once it is stored."""
    from conure_dist.methods.run import run_method

    _check_results_owner(experiment, out)
    start, reused_seconds = time.perf_counter(), 0.0
    planned = [(variant, method, seed, join(out, f"runs/{variant.name}/{method}/seed{seed}"),
                run_config(experiment, variant, method, seed))
               for variant in experiment.variants for method in _runs_of(variant.methods or experiment.methods)
               for seed in experiment.seeds]
    if share_first_task:
        for *_, cfg in planned:
            if cfg.train.first_task_cache is None:
                cfg.train.first_task_cache = join(out, "first_task")
    fresh: dict[str, dict[str, Any]] = {}
    if jobs > 1:
        if dist.is_distributed:
            raise ConfigError("--jobs runs single-process runs side by side; under torchrun leave it at 1")
        from conure_dist.experiment.jobs import PlannedRun, run_side_by_side

        producers: dict[str, str] = {}  # first-task group -> the output folder of the run that trains it
        runs = []
        for variant, method, seed, run_out, cfg in planned:
            if _exists(join(run_out, "report.json")):
                continue
            group = first_task_group(cfg)
            producer = None if group is None else producers.setdefault(group, run_out)
            runs.append(PlannedRun(f"{variant.name}/{method}/seed{seed}", cfg, run_out,
                                   resume=METHODS[method].keeps_checkpoints,
                                   after=None if producer == run_out else producer))
        fresh = run_side_by_side(runs, jobs, dist.device) if runs else {}
    reports: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for variant, method, seed, run_out, cfg in planned:
        report_path = join(run_out, "report.json")
        if run_out in fresh:
            report = fresh[run_out]
        elif _exists(report_path):
            with fsspec.open(report_path) as f:
                report = json.load(f)
            _check_reused(report, cfg, report_path)
            reused_seconds += report["wall_seconds"]
            log.info("%s/%s/seed%d: report exists, not run again", variant.name, method, seed)
        else:
            log.info("%s/%s/seed%d: running", variant.name, method, seed)
            # A Conure run interrupted earlier continues from its last checkpoint.
            report = run_method(cfg, run_out, dist, resume=METHODS[method].keeps_checkpoints)
        reports.setdefault(variant.name, {}).setdefault(method, []).append(report)
    for variant in experiment.variants:
        methods = variant.methods or experiment.methods
        for m in methods:
            source = METHODS[m].report_from
            if source in methods:
                reports[variant.name][m] = [as_before_pruning(r, m) for r in reports[variant.name][source]]
        reports[variant.name] = {m: reports[variant.name][m] for m in methods}
    # Runs reused from an earlier invocation count with the time they took then.
    summary = summarize(experiment, reports, time.perf_counter() - start + reused_seconds, reused_seconds)
    if dist.is_main:
        write_results(summary, out)
    return summary


def first_task_group(cfg: RunConfig) -> str | None:
    """Runs in one group would train T1 identically (the settings that key ``first_task``'s
    cache, without the initial weights, which the same seed and model give): one of them trains
    it, the others wait for it. None without a cache."""
    from conure_dist.train.first_task import keyed_settings

    if cfg.train.first_task_cache is None:
        return None
    return json.dumps([cfg.train.first_task_cache, keyed_settings(cfg.to_dict())], sort_keys=True)


def _check_results_owner(experiment: Experiment, out: str) -> None:
    """Refuse an ``out`` whose ``results.json`` another experiment file wrote: this one would
    overwrite its table and plots."""
    path = join(out, "results.json")
    if _exists(path):
        with fsspec.open(path) as f:
            written = str(json.load(f).get("experiment", ""))
        if Path(written).name != experiment.path.name:
            raise ConfigError(f"{path} holds the results of {written}, not of {experiment.path}: give another --out")


def _exists(url: str) -> bool:
    fs, local = fsspec.core.url_to_fs(url)
    return fs.exists(local)


# Settings that change how a run is carried out or shown, not its results.
NOT_RESULTS = ("train.progress", "train.num_threads", "train.keep_checkpoints", "train.checkpoint_every_steps",
               "train.log_every", "train.eval_batch_size", "dist.compile", "train.first_task_cache")


def _check_reused(report: dict[str, Any], cfg: RunConfig, path: str) -> None:
    """A finished run is reused only if it ran what the experiment asks for now."""
    ran = (report.get("method"), report.get("seed"), [t["name"] for t in report["tasks"]])
    want = (cfg.method.name, cfg.seed, [t.name for t in cfg.tasks])
    if ran != want:
        raise UserError(f"{path} holds a run of (method, seed, tasks) = {ran}, but the experiment now asks "
                         f"for {want}; delete it or use another --out")
    if "config" not in report:
        log.warning("%s records no config (written by an older version): its settings cannot be checked", path)
        return
    changes = config_changes(report["config"], cfg.to_dict())
    # A key added to the schema after the run was made is at its default there: by convention a
    # new option's default keeps the behaviour from before it existed.
    newer = [k for k, (_, now) in changes.items() if not _has_key(report["config"], k) and now == _default_of(k)]
    if newer:
        log.info("%s was made before %s existed; taken as the default", path, ", ".join(newer))
    differ = [f"{k}={now} (the run: {saved})" for k, (saved, now) in changes.items()
              if k not in NOT_RESULTS and k not in newer]
    if differ:
        raise UserError(f"{path} holds a run made with other settings: {', '.join(differ)}; delete it or use another --out")


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
