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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec

from conure_dist.config import (
    ConfigError,
    DataConfig,
    RunConfig,
    changes_since,
)
from conure_dist.dist import DistInfo
from conure_dist.errors import UserError
from conure_dist.experiment.report import summarize, write_results
from conure_dist.experiment.spec import Experiment, run_config
from conure_dist.fs import join
from conure_dist.methods import METHODS
from conure_dist.report import as_before_pruning, read_report
from conure_dist.rundir import NOT_RESULTS

log = logging.getLogger(__name__)


def _runs_of(methods: list[str]) -> list[str]:
    """The runs to make: a method whose report another listed method's run yields (Conure- from
    Conure's) is not run on its own."""
    return [m for m in methods if METHODS[m].report_from not in methods]


def run_experiment(
    experiment: Experiment,
    out: str,
    dist: DistInfo,
    jobs: int = 1,
    share_first_task: bool = True,
    prepare: Callable[[DataConfig, DistInfo], None] | None = None,
) -> dict[str, Any]:
    """Every run not already reported, one after another, or ``jobs`` at a time side by side
    (``experiment_jobs``; single-process runs only), then the summary. With ``share_first_task``
    the runs share T1's train phase through ``OUT/first_task`` (``train.first_task`` module;
    unless the config names its own ``train.first_task_cache``): each distinct T1 is trained
    once, and side by side the runs that reuse one start once it is stored. ``prepare`` is called
    once per distinct ``data`` root of the planned runs before any of them starts (the command
    line builds missing shards with it; collective, so every rank calls it alike)."""
    from conure_dist.methods.run import run_method

    _check_results_owner(experiment, out)
    start, reused_seconds = time.perf_counter(), 0.0
    planned = [
        (
            variant,
            method,
            seed,
            join(out, f"runs/{variant.name}/{method}/seed{seed}"),
            run_config(experiment, variant, method, seed),
        )
        for variant in experiment.variants
        for method in _runs_of(variant.methods or experiment.methods)
        for seed in experiment.seeds
    ]
    if prepare is not None:
        for data in {cfg.data.root: cfg.data for *_, cfg in planned}.values():
            prepare(data, dist)
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
            runs.append(
                PlannedRun(
                    f"{variant.name}/{method}/seed{seed}",
                    cfg,
                    run_out,
                    resume=METHODS[method].keeps_checkpoints,
                    after=None if producer == run_out else producer,
                )
            )
        fresh = run_side_by_side(runs, jobs, dist.device) if runs else {}
    reports: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for variant, method, seed, run_out, cfg in planned:
        report_path = join(run_out, "report.json")
        if run_out in fresh:
            report = fresh[run_out]
        elif _exists(report_path):
            report = read_report(report_path)
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


def _check_reused(report: dict[str, Any], cfg: RunConfig, path: str) -> None:
    """A finished run is reused only if it ran what the experiment asks for now."""
    ran = (report.get("method"), report.get("seed"), [t["name"] for t in report["tasks"]])
    want = (cfg.method.name, cfg.seed, [t.name for t in cfg.tasks])
    if ran != want:
        raise UserError(
            f"{path} holds a run of (method, seed, tasks) = {ran}, but the experiment now asks "
            f"for {want}; delete it or use another --out"
        )
    if "config" not in report:
        log.warning("%s records no config (written by an older version): its settings cannot be checked", path)
        return
    changes, newer = changes_since(report["config"], cfg.to_dict())
    if newer:
        log.info("%s was made before %s existed; taken as the default", path, ", ".join(newer))
    differ = [f"{k}={now} (the run: {saved})" for k, (saved, now) in changes.items() if k not in NOT_RESULTS]
    if differ:
        raise UserError(
            f"{path} holds a run made with other settings: {', '.join(differ)}; delete it or use another --out"
        )
