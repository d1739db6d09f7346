"""The registry of training methods: Conure (and Conure-, the same loop reported before pruning)
and the baselines it is compared with. ``conure run`` and ``conure experiment`` dispatch here."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from conure_dist.config import METHODS as CONFIG_METHODS
from conure_dist.config import RunConfig
from conure_dist.dist import DistInfo
from conure_dist.train.baselines import run_baseline
from conure_dist.train.loop import run_conure

log = logging.getLogger(__name__)

MethodRunner = Callable[[RunConfig, str, DistInfo, bool], dict[str, Any]]


def _baseline(cfg: RunConfig, out: str, dist: DistInfo, resume: bool) -> dict[str, Any]:
    return run_baseline(cfg, out, dist)


CONURE_METHODS = ("conure", "conure_minus")
"""The methods that run the Conure loop (and keep checkpoints); every other one is a baseline."""

METHODS: dict[str, MethodRunner] = {
    name: run_conure if name in CONURE_METHODS else _baseline for name in CONFIG_METHODS
}


def run_method(cfg: RunConfig, out: str, dist: DistInfo, resume: bool = False) -> dict[str, Any]:
    """Conure (``method.name`` conure or conure_minus), or one of the baselines it is compared with."""
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every torch.empty with NaN, which touches each page of
        # large lazily-used buffers (DeepSpeed's gradient buckets): keep them untouched.
        torch.utils.deterministic.fill_uninitialized_memory = False
    if resume and cfg.method.name not in CONURE_METHODS:
        # The launch scripts always pass --resume; a baseline has nothing to resume from.
        log.warning("--resume: method '%s' keeps no checkpoints; it runs from the start", cfg.method.name)
    return METHODS[cfg.method.name](cfg, out, dist, resume)
