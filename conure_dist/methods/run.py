"""``run_method``: a run handed to the loop its method's record names (``conure run`` and
``conure experiment`` start every run here)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from conure_dist.config import RunConfig
from conure_dist.dist import DistInfo
from conure_dist.methods.registry import METHODS
from conure_dist.rundir import own_run_dir
from conure_dist.train.baselines import run_baseline
from conure_dist.train.loop import run_conure

log = logging.getLogger(__name__)


def _baseline(cfg: RunConfig, out: str, dist: DistInfo, resume: bool, force: bool) -> dict[str, Any]:
    return run_baseline(cfg, out, dist)


RUNNERS: dict[str, Callable[[RunConfig, str, DistInfo, bool, bool], dict[str, Any]]] = {
    "continual": run_conure,
    "baseline": _baseline,
}
"""The loops, by the ``Method.runner`` that names them."""


def run_method(cfg: RunConfig, out: str, dist: DistInfo, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Run ``cfg.method`` (Conure, Conure- or a baseline) holding ``out`` (``rundir``); return its
    report. ``force``: take over a directory whose run had another method or settings."""
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every torch.empty with NaN, which touches each page of
        # large lazily-used buffers (DeepSpeed's gradient buckets): keep them untouched.
        torch.utils.deterministic.fill_uninitialized_memory = False
    method = METHODS[cfg.method.name]
    if resume and not method.keeps_checkpoints:
        # The launch scripts always pass --resume; a baseline has nothing to resume from.
        log.warning("--resume: method '%s' keeps no checkpoints; it runs from the start", method.name)
    with own_run_dir(out, cfg, dist, checked_by_checkpoint=resume and method.keeps_checkpoints, force=force):
        return RUNNERS[method.runner](cfg, out, dist, resume, force)
