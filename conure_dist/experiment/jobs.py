"""An experiment's runs side by side: ``conure experiment --jobs N`` runs N single-process runs at
once, each in its own process, on one machine.

Each run is the one the sequential loop would make (same config, same output folder, same
``report.json``), so a run's results do not depend on ``--jobs`` as long as its threads do not:
give the runs ``train.num_threads`` (CPU GEMMs round by how they split their work). A run without
it gets ``cpu_count // jobs`` threads instead of torch's default of every core.

The shards exist before the runs start (``conure experiment`` builds missing ones first, one
``data.root`` at a time, so that no two runs build the same shards). A run that reuses another's T1
(``PlannedRun.after``) starts once that run has stored it (its ``first_task.json`` appears) or has
ended; until then the free process takes the next run that can start. A failed run does not stop
the others: every run that finishes keeps its report (the next call reuses it), and the failures
are raised together at the end, each named.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import fsspec
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
    after: str | None = None
    """Output folder of the run that trains this run's T1 (``first_task``): start after it."""


class RunsFailed(RuntimeError):
    """Some runs of a ``--jobs`` experiment raised; the others' reports are written."""


def run_side_by_side(runs: list[PlannedRun], jobs: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """Every run in ``runs``, at most ``jobs`` at a time: ``{run.out: report}``."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    reports: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    context = multiprocessing.get_context("spawn")  # no inherited torch or thread-pool state
    queue, running, ended = list(runs), {}, set()
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(runs)) or 1,
        mp_context=context,
        initializer=_start_worker,
        initargs=(logging.getLogger().level,),
    ) as pool:
        while queue or running:
            while len(running) < jobs:
                ready = next((r for r in queue if _may_start(r, ended)), None)
                if ready is None:
                    break
                queue.remove(ready)
                running[pool.submit(_run_one, ready, threads, device)] = ready
            if not running:  # cannot happen: a waiting run's producer is queued before it
                raise RuntimeError(f"no run can start: {[r.name for r in queue]} wait for runs that never ran")
            finished, _ = wait(running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                ended.add(run.out)
                _collect(run, future, reports, failures, len(runs))
    if failures:
        raise RunsFailed(
            f"{len(failures)} of {len(runs)} runs failed (the other reports are written and the next "
            "call reuses them):\n  " + "\n  ".join(failures)
        )
    return reports


POLL_SECONDS = 1.0


def _may_start(run: PlannedRun, ended: set[str]) -> bool:
    """Free to start, or the run it reuses T1 from has stored it or ended (then it trains T1 itself)."""
    from conure_dist.fs import join
    from conure_dist.train.first_task import MARKER

    if run.after is None or run.after in ended:
        return True
    fs, path = fsspec.core.url_to_fs(join(run.after, MARKER))
    return fs.exists(path)


def _collect(
    run: PlannedRun, future: Future, reports: dict[str, dict[str, Any]], failures: list[str], total: int
) -> None:
    try:
        reports[run.out] = future.result()
    except Exception as exc:  # the other runs go on; this one is named at the end
        failures.append(f"{run.name}: {type(exc).__name__}: {exc}")
        log.error("%s failed (%d of %d done): %s", run.name, len(reports) + len(failures), total, exc)
    else:
        log.info("%s: done (%d of %d)", run.name, len(reports) + len(failures), total)


def _single_process(device: torch.device) -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)


def _start_worker(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")


def _run_one(run: PlannedRun, threads: int, device: torch.device) -> dict[str, Any]:
    from conure_dist.methods.run import run_method

    if run.cfg.train.num_threads is None:
        torch.set_num_threads(threads)
    log.info("%s: running", run.name)
    return run_method(run.cfg, run.out, _single_process(device), resume=run.resume)
