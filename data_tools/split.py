"""The random train/valid/test split of a task's instances (80/5/15 by default)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from conure_dist.errors import UserError

SPLIT_NAMES: tuple[str, str, str] = ("train", "valid", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.05, 0.15)


def check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions):
        raise UserError(f"split must be three non-negative fractions (train, valid, test), got {fractions}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
        raise UserError(f"split fractions must sum to 1, got {fractions} (sum {sum(fractions)})")
    if fractions[0] == 0:
        raise UserError(f"the train fraction must be positive, got {fractions}")


def split_sizes(num_instances: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> list[int]:
    """Sizes closest to ``fractions`` that sum exactly to ``num_instances`` (largest remainder)."""
    check_fractions(fractions)
    exact = [num_instances * f for f in fractions]
    sizes = [math.floor(x) for x in exact]
    # Hand the leftover instances to the largest fractional parts; ties go to the earlier split.
    order = sorted(range(3), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: num_instances - sum(sizes)]:
        sizes[i] += 1
    return sizes


def split_indices(
    num_instances: int,
    *,
    seed: int,
    task_index: int,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> dict[str, np.ndarray]:
    """Instance indices of each split, each in a random (already shuffled) order.

    The generator is seeded from (seed, task_index), so a task's split does not change when other
    tasks are added or removed before it is converted, as long as its position stays the same.
    """
    if seed < 0 or task_index < 0:
        raise ValueError(f"seed and task_index must be non-negative, got {seed}, {task_index}")
    rng = np.random.default_rng([seed, task_index])
    order = rng.permutation(num_instances).astype(np.int64)
    bounds = np.cumsum([0, *split_sizes(num_instances, fractions)])
    return {name: order[bounds[i] : bounds[i + 1]] for i, name in enumerate(SPLIT_NAMES)}
