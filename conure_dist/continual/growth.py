"""Capacity growth: a backbone that runs short of free conv weights gets new residual blocks.

Before a task starts, ``grow_for_task`` appends ``continual.grow_dilations`` blocks (as often as
needed) while the free fraction of the prunable weights is below ``continual.min_free_fraction``.
The new blocks start as the identity and are run by that task and every later one; earlier tasks
stop before them, so their predictions stay bit-identical. Their kernels join the ownership
records as free weights (partitioned like the others); their layer norms and biases train in the
growing task's train phase and are frozen with that task (``ConureModel.grown_names``).

Every rank grows the same way: the decision reads the ownership records (equal on all ranks,
checked at every prune) and the new kernels are drawn from a generator seeded by the run's seed
and the task, so no collective is needed.
"""

from __future__ import annotations

from typing import Any

import torch

from conure_dist.config import ContinualConfig
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.model import ConureModel
from conure_dist.train.samplers import hash_seed
from conure_dist.train.state import CapacityError


def grow_for_task(
    model: ConureModel, ownership: TaskOwnership, task: str, task_index: int, seed: int, cfg: ContinualConfig
) -> list[dict[str, Any]]:
    """Grow until ``task`` starts with at least ``cfg.min_free_fraction`` free weights; returns
    one record per growth step ({task, dilations, free_before, free_after}), empty if none."""
    events: list[dict[str, Any]] = []
    while cfg.min_free_fraction > 0 and ownership.capacity().free < cfg.min_free_fraction:
        blocks = len(model.backbone.blocks)
        if blocks + len(cfg.grow_dilations) > cfg.max_blocks:
            raise CapacityError(
                f"task '{task}' would start with {ownership.capacity().free:.1%} of the conv weights "
                f"free (continual.min_free_fraction={cfg.min_free_fraction}), and growing past "
                f"{blocks} blocks would exceed continual.max_blocks={cfg.max_blocks}"
            )
        free_before = ownership.capacity().free
        generator = torch.Generator().manual_seed(hash_seed(seed, task_index + 1, len(events), blocks))
        names = model.grow(task, cfg.grow_dilations, generator)
        params = dict(model.named_parameters())
        ownership.add({name: params[name].shape for name in names})
        events.append(
            {
                "task": task,
                "dilations": list(cfg.grow_dilations),
                "blocks": blocks + len(cfg.grow_dilations),
                "free_before": free_before,
                "free_after": ownership.capacity().free,
            }
        )
    return events


def apply_growth(model: ConureModel, ownership: TaskOwnership | None, growth: list[dict[str, Any]]) -> None:
    """Rebuild the growth a run recorded (``RunState.growth``) before loading its weights."""
    for event in growth:
        names = model.grow(event["task"], event["dilations"], torch.Generator().manual_seed(0))
        if ownership is not None:
            params = dict(model.named_parameters())
            ownership.add({name: params[name].shape for name in names})
