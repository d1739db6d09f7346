"""An experiment's runs side by side: ``conure experiment --jobs N`` runs N single-process runs at
once, each in its own process, on one machine.

Each run is the one the sequential loop would make (same config, same output folder, same
``report.json``), so a run's results do not depend on ``--jobs`` as long as its threads do not:
give the runs ``train.num_threads`` (CPU GEMMs round by how they split their work). A run without
it gets ``cpu_count // jobs`` threads instead of torch's default of every core.

The data come first, one ``data.root`` at a time in this process, so that no two runs generate the
same shards. A failed run does not stop the others: every run that finishes keeps its report (the
next call reuses it), and the failures are raised together at the end, each named.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import torch

from conure_dist.config import RunConfig
from conure_dist.dist import DistInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedRun:
    name: str
    """``VARIANT/METHOD/seedS``, for the log and errors."""
    cfg: RunConfig
    out: str
    resume: bool


class RunsFailed(RuntimeError):
    """Some runs of a ``--jobs`` experiment raised; the others' reports are written."""


def run_side_by_side(runs: list[PlannedRun], jobs: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """Every run in ``runs``, at most ``jobs`` at a time: ``{run.out: report}``."""
    from conure_dist.data.prepare import prepare_data

    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    single = _single_process(device)
    first_of_root: dict[str, RunConfig] = {}
    for run in runs:  # the first run of a root builds its shards, as in the sequential loop
        first_of_root.setdefault(run.cfg.data.root, run.cfg)
    for cfg in first_of_root.values():
        prepare_data(cfg, single)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    reports: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    context = multiprocessing.get_context("spawn")  # no inherited torch or thread-pool state
    with ProcessPoolExecutor(max_workers=min(jobs, len(runs)) or 1, mp_context=context,
                             initializer=_start_worker, initargs=(logging.getLogger().level,)) as pool:
        pending = {pool.submit(_run_one, run, threads, device): run for run in runs}
        for done, future in enumerate(as_completed(pending), start=1):
            run = pending[future]
            try:
                reports[run.out] = future.result()
            except Exception as exc:  # the other runs go on; this one is named at the end
                failures.append(f"{run.name}: {type(exc).__name__}: {exc}")
                log.error("%s failed (%d of %d done): %s", run.name, done, len(runs), exc)
            else:
                log.info("%s: done (%d of %d)", run.name, done, len(runs))
    if failures:
        raise RunsFailed(f"{len(failures)} of {len(runs)} runs failed (the other reports are written and the next "
                         "call reuses them):\n  " + "\n  ".join(failures))
    return reports


def _single_process(device: torch.device) -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)


def _start_worker(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")


def _run_one(run: PlannedRun, threads: int, device: torch.device) -> dict[str, Any]:
    from conure_dist.methods import run_method

    if run.cfg.train.num_threads is None:
        torch.set_num_threads(threads)
    log.info("%s: running", run.name)
    return run_method(run.cfg, run.out, _single_process(device), resume=run.resume)
