"""The learning rate over a phase's optimizer steps (``train.lr_schedule``, ``train.warmup_steps``).

A pure function of the step index, so a phase resumed from a mid-phase checkpoint continues the
schedule exactly, with no scheduler state to save.
"""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate for 0-based ``step`` of ``total_steps``: a linear
    warm-up over the first ``warmup_steps`` (from 1/(warmup+1), never exactly 0), then constant,
    or a linear or half-cosine decay reaching 0 after the last step."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule '{schedule}'")
