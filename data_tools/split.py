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


# --- leave-one-out: the protocol of RecBole, SASRec and most sequential-recommendation papers ---

PROTOCOLS: tuple[str, str] = ("random", "leave_one_out")
"""``random``: the paper's split of every task's instances by the fractions (80/5/15);
``leave_one_out``: per user, the last interaction of a task is its test instance, the one before
its validation instance, the rest training; profile tasks get a split stratified by class."""


def leave_one_out_indices(users: np.ndarray, times: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Instance indices of each split of an item task: per user, in the order of ``times`` (ties
    and ``times=None``: the order of the instances), the last instance is test, the one before
    valid, the rest train. A user with fewer than three instances has them all in train (nothing
    is left to validate on without emptying train). Each split's indices are in ascending order."""
    users = np.asarray(users, dtype=np.int64)
    rows = np.arange(len(users))
    keys = (rows, rows if times is None else np.asarray(times), users)
    order = np.lexsort(keys)  # by user, then time, then instance
    sorted_users = users[order]
    _, starts, counts = np.unique(sorted_users, return_index=True, return_counts=True)
    from_end = np.repeat(starts + counts, counts) - 1 - np.arange(len(order))  # 0: the user's last
    enough = np.repeat(counts >= 3, counts)
    test = enough & (from_end == 0)
    valid = enough & (from_end == 1)
    return {
        "train": np.sort(order[~(test | valid)]),
        "valid": np.sort(order[valid]),
        "test": np.sort(order[test]),
    }


def stratified_indices(
    labels: np.ndarray,
    *,
    seed: int,
    task_index: int,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> dict[str, np.ndarray]:
    """Instance indices of each split of a class task: every class split by ``fractions``
    (largest remainder, as ``split_sizes``), so each split keeps the label mix. Deterministic in
    (seed, task_index); each split's indices are in ascending order."""
    if seed < 0 or task_index < 0:
        raise ValueError(f"seed and task_index must be non-negative, got {seed}, {task_index}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([seed, task_index])
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        bounds = np.cumsum([0, *split_sizes(len(members), fractions)])
        for i, name in enumerate(SPLIT_NAMES):
            parts[name].append(members[bounds[i] : bounds[i + 1]])
    return {
        name: np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for name, p in parts.items()
    }


def sequence_windows(history: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Left-padded sequences [n, seq_len] of each split of one user's chronological T1 history
    under leave-one-out: test ends at the last item (its target), valid at the one before, and the
    items before those two are cut into training windows that overlap by one item, so that every
    training item but the first is a target exactly once, with up to ``seq_len - 1`` items of
    context. With fewer than three items, the whole history is one training window (at most its
    last ``seq_len`` items) and valid and test are empty."""
    history = np.asarray(history, dtype=np.int32)
    empty = np.zeros((0, seq_len), dtype=np.int32)
    if len(history) < 3:
        return {"train": _left_padded([history[-seq_len:]], seq_len), "valid": empty, "test": empty}
    windows, end = [], len(history) - 2
    while True:
        start = max(0, end - seq_len)
        windows.append(history[start:end])
        if start == 0:
            break
        end = start + 1  # the next window's last item is this window's first, which it does not predict
    return {
        "train": _left_padded(windows[::-1], seq_len),
        "valid": _left_padded([history[:-1][-seq_len:]], seq_len),
        "test": _left_padded([history[-seq_len:]], seq_len),
    }


def _left_padded(rows: list[np.ndarray], seq_len: int) -> np.ndarray:
    out = np.zeros((len(rows), seq_len), dtype=np.int32)
    for i, row in enumerate(rows):
        if len(row):
            out[i, seq_len - len(row) :] = row
    return out
