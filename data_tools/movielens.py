"""MovieLens in its public layouts -> Conure tasks.

Layouts, recognized from the files in the source directory (``detect_layout``; the readers are in
``movielens_layouts``):

* ``ml-100k``: GroupLens' ``u.data`` (tab-separated user, item, rating, timestamp) and ``u.user``
  (``id|age|gender|occupation|zip``);
* ``ml-1m``: ``ratings.dat`` and ``users.dat`` (``::``-separated; age is already a bracket code,
  occupation a number 0-20);
* ``csv``: MovieLens-20M/25M/32M and the "latest" releases, ``ratings.csv`` with the header
  ``userId,movieId,rating,timestamp`` (half-star ratings; no demographics);
* ``recbole``: RecBole atomic files, one ``*.inter`` with typed header fields ``user_id``,
  ``item_id``, ``rating``, ``timestamp`` and optionally a ``*.user`` with ``age``, ``gender``,
  ``occupation`` (non-numeric tokens are numbered in sorted order).

Recipe (the Conure paper's MovieLens setup), the same for every layout:

* Each user's ratings are ordered by timestamp; ties keep the order of the rows in the file.
* ``t1`` (sequence): the user's most recent ``seq_len`` ratings below 4 stars, left-padded with 0.
  T1 item ids are remapped to 1..V-1 in the order of the raw ids, over the items that appear in
  some T1 sequence. Users without any rating below 4 have no T1 sequence; all their later-task
  instances are dropped (counted in ``source["users_without_t1"]``). With
  ``min_t1_interactions`` = n (the paper keeps T1 users with "more than 5" interactions: n = 6),
  users with fewer than n ratings below 4 are dropped the same way (``users_below_min_t1``).
* With ``t1_ratings: all`` (not the paper's; the usual sequential-recommendation setting, as in
  RecBole), T1 holds every rating and like4 / like5 are left out: their targets would be in T1,
  the input of every task.
* Under ``split_protocol: leave_one_out`` the T1 vocabulary covers each user's whole history,
  whose earlier part becomes training windows (``shards.split_task``); item tasks carry the
  rating times, which order a user's instances.
* ``like4`` / ``like5`` (item tasks): one instance per rating in [4, 5) / of 5 stars (with whole
  stars: exactly 4 / 5); each task has its own vocabulary 0..n-1 (raw ids in order).
* Profile tasks wherever the layout has demographics: ``gender`` (F, M), ``age`` and
  ``occupation``. Age uses the MovieLens-1M brackets <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+;
  all seven are kept even when empty so class ids mean the same on every variant. Occupations are
  the distinct values found (numbers in numeric order, then names in sorted order).

Malformed rows, and a rating repeating an earlier row's user and item (it could land in both the
training and the test split), raise ``UserError`` naming the file and 1-based line; with
``skip_bad_rows`` they are skipped and counted (``skipped_rows`` in the manifest). Blank lines
carry no row and are ignored. A ratings or profile file left without any valid row is an error naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from conure_dist.data.manifest import Manifest
from conure_dist.errors import UserError
from conure_dist.fs import join
from data_tools.movielens_layouts import (
    GENDERS,
    ParsedSource,
    Profile,
    Ratings,
    detect_layout,
    read_source,
)
from data_tools.rows import RowChecker, numbers_first
from data_tools.shards import TaskData, write_dataset
from data_tools.split import DEFAULT_FRACTIONS

AGE_LIMITS: tuple[int, ...] = (18, 25, 35, 45, 50, 56)
AGE_BRACKETS: tuple[str, ...] = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
LOW_RATING = 4
"""Ratings strictly below this form T1 (``t1_ratings: below_4``, the paper's)."""
T1_RATINGS: tuple[str, ...] = ("below_4", "all")


@dataclass
class _T1Table:
    seqs: np.ndarray
    """[num_t1_users, seq_len]: each user's most recent T1 items, left-padded."""
    users: np.ndarray
    """The raw user id of each row (sorted)."""
    vocab: np.ndarray
    """T1 raw item ids; item id i + 1 is ``vocab[i]``."""
    histories: list[np.ndarray] | None
    """With ``full_history``: each row's whole chronological T1 history (item ids), of which
    ``seqs`` holds the end."""
    below_min: int
    """Users with some T1 rating dropped for having fewer than ``min_t1_interactions``."""


def _t1_table(
    ratings: Ratings,
    seq_len: int,
    min_t1_interactions: int = 0,
    t1_ratings: str = "below_4",
    full_history: bool = False,
) -> _T1Table:
    rows = np.arange(len(ratings.user))
    order = np.lexsort((rows, ratings.timestamp, ratings.user))  # by user, then time, then file row
    low = order if t1_ratings == "all" else order[ratings.rating[order] < LOW_RATING]
    low_users, low_counts = np.unique(ratings.user[low], return_counts=True)
    few = low_users[low_counts < min_t1_interactions]
    low = low[~np.isin(ratings.user[low], few)]
    users, items = ratings.user[low], ratings.item[low]
    t1_users, starts, counts = np.unique(users, return_index=True, return_counts=True)
    # Position of each rating counted from the user's most recent one (0 = most recent).
    from_end = np.repeat(starts + counts, counts) - 1 - np.arange(len(users))
    keep = from_end < seq_len
    kept_items = items[keep]
    # The paper's table holds each user's last seq_len items, and its vocabulary is theirs; the
    # whole histories (leave-one-out's training windows) reach further back.
    vocab = np.unique(items if full_history else kept_items)
    seqs = np.zeros((len(t1_users), seq_len), dtype=np.int32)
    seqs[np.searchsorted(t1_users, users[keep]), seq_len - 1 - from_end[keep]] = np.searchsorted(vocab, kept_items) + 1
    histories = None
    if full_history:
        histories = np.split((np.searchsorted(vocab, items) + 1).astype(np.int32), starts[1:])
    return _T1Table(seqs, t1_users, vocab, histories, len(few))


def _like_task(name: str, parsed: ParsedSource, low: float, high: float, t1_users: np.ndarray) -> tuple[TaskData, int]:
    """Item task over the ratings in [low, high); also returns how many were dropped (no T1)."""
    ratings = parsed.ratings
    chosen = np.flatnonzero((ratings.rating >= low) & (ratings.rating < high))
    has_t1 = np.isin(ratings.user[chosen], t1_users)
    chosen = chosen[has_t1]
    vocab = np.unique(ratings.item[chosen])
    task = TaskData(
        name,
        "item",
        None,
        users=np.searchsorted(t1_users, ratings.user[chosen]).astype(np.int64),
        targets=np.searchsorted(vocab, ratings.item[chosen]).astype(np.int64),
        num_items=max(len(vocab), 1),
        vocab=parsed.raw("item", vocab) if len(vocab) else None,
        times=ratings.timestamp[chosen],
    )
    return task, int((~has_t1).sum())


def _profile_tasks(
    profiles: dict[int, Profile], fields: tuple[str, ...], t1_users: np.ndarray
) -> tuple[list[TaskData], int]:
    """gender, age, occupation tasks (those in ``fields``) over users with a profile and a T1 sequence."""
    with_t1 = set(t1_users.tolist())
    kept = [u for u in sorted(profiles) if u in with_t1]
    rows = np.searchsorted(t1_users, np.asarray(kept, dtype=np.int64)).astype(np.int64)
    occupations = sorted({p.occupation for p in profiles.values() if p.occupation}, key=numbers_first)
    labels = {
        "gender": lambda: ([GENDERS.index(profiles[u].gender) for u in kept], list(GENDERS)),
        "age": lambda: (
            [int(np.searchsorted(AGE_LIMITS, profiles[u].age, side="right")) for u in kept],
            list(AGE_BRACKETS),
        ),
        "occupation": lambda: ([occupations.index(profiles[u].occupation) for u in kept], occupations),
    }
    tasks = []
    for name in ("gender", "age", "occupation"):
        if name in fields:
            ids, names = labels[name]()
            tasks.append(
                TaskData(
                    name,
                    "class",
                    None,
                    rows,
                    np.asarray(ids, dtype=np.int64),
                    num_classes=len(names),
                    class_names=names,
                )
            )
    return tasks, len(profiles) - len(kept)


def read_movielens(
    src_dir: str,
    *,
    seq_len: int = 30,
    skip_bad_rows: bool = False,
    layout: str | None = None,
    min_t1_interactions: int = 0,
    t1_ratings: str = "below_4",
    full_history: bool = False,
) -> tuple[np.ndarray, list[TaskData], dict[str, Any], dict[str, int]]:
    """Parse a MovieLens release under ``src_dir`` (layout detected unless given) into
    (t1_seqs, tasks, source, skipped_rows). ``t1_ratings``: ``below_4`` (the paper's) or ``all``,
    which leaves out like4 and like5 (their targets would be in T1, every task's input).
    ``full_history``: the T1 task carries each user's whole history (leave-one-out's windows)."""
    if t1_ratings not in T1_RATINGS:
        raise UserError(f"t1_ratings must be one of {list(T1_RATINGS)}, got '{t1_ratings}'")
    if seq_len < 2:
        raise UserError(f"seq_len must be >= 2, got {seq_len}")
    if min_t1_interactions < 0:
        raise UserError(f"min_t1_interactions must be >= 0, got {min_t1_interactions}")
    checker = RowChecker(skip_bad_rows)
    layout = layout or detect_layout(src_dir)
    parsed = read_source(src_dir, layout, checker)
    ratings, profiles = parsed.ratings, parsed.profiles
    ratings_file, *profile_file = parsed.files
    parsed.files[ratings_file]["valid_rows"] = len(ratings.user)
    for name in profile_file:
        parsed.files[name]["valid_rows"] = len(profiles)
    rated = set(np.unique(ratings.user).tolist())
    table = _t1_table(ratings, seq_len, min_t1_interactions, t1_ratings, full_history)
    t1_seqs, t1_users, t1_vocab, below_min = table.seqs, table.users, table.vocab, table.below_min
    if len(t1_users) == 0:
        enough = "a rating" if min_t1_interactions <= 1 else f"{min_t1_interactions} or more ratings"
        which = "" if t1_ratings == "all" else f" below {LOW_RATING}"
        raise UserError(f"{join(src_dir, ratings_file)}: no user has {enough}{which}, so there is no T1 sequence")
    like_tasks, dropped = [], {}
    if t1_ratings == "below_4":
        for name, low, high in (("like4", 4, 5), ("like5", 5, 6)):
            task, dropped[name] = _like_task(name, parsed, low, high, t1_users)
            like_tasks.append(task)
    profile_tasks, dropped_profiles = _profile_tasks(profiles, parsed.profile_fields, t1_users)
    t1 = TaskData(
        "t1",
        "sequence",
        t1_seqs,
        np.arange(len(t1_users), dtype=np.int64),
        None,
        num_items=len(t1_vocab) + 1,
        vocab=["", *parsed.raw("item", t1_vocab)],
        histories=table.histories,
    )
    recipe: dict[str, Any] = {"seq_len": seq_len, "t1": f"most recent ratings < {LOW_RATING}"}
    if t1_ratings == "all":
        recipe["t1"] = "most recent ratings, all of them"
    recipe["min_t1_interactions"] = min_t1_interactions
    if like_tasks:
        recipe.update({"like4": "4 <= rating < 5", "like5": "rating == 5"})
    recipe["age_brackets"] = list(AGE_BRACKETS)
    source = {
        "src": src_dir,
        "layout": layout,
        "files": parsed.files,
        "recipe": recipe,
        "num_users": len(rated),
        "num_t1_users": len(t1_users),
        "users_without_t1": len(rated) - len(t1_users) - below_min,
        "users_below_min_t1": below_min,
        "users_without_profile": len(set(t1_users.tolist()) - set(profiles)) if parsed.profile_fields else None,
        "dropped_instances": {**dropped, "profile": dropped_profiles},
        "user_ids": parsed.raw("user", t1_users),  # moved out to users.json by write_movielens
    }
    return t1_seqs, [t1, *like_tasks, *profile_tasks], source, dict(checker.counts)


def write_movielens(
    src: str,
    out: str,
    *,
    seq_len: int = 30,
    seed: int = 0,
    skip_bad_rows: bool = False,
    layout: str | None = None,
    split: tuple[float, float, float] = DEFAULT_FRACTIONS,
    instances_per_shard: int = 50_000,
    records_per_sample: int = 256,
    min_t1_interactions: int = 0,
    t1_ratings: str = "below_4",
    protocol: str = "random",
) -> Manifest:
    """Convert the MovieLens release under ``src`` into shards + manifest under ``out``;
    ``seed`` seeds the split, ``protocol`` chooses it (``shards.split_task``)."""
    t1_seqs, tasks, source, skipped = read_movielens(
        src,
        seq_len=seq_len,
        skip_bad_rows=skip_bad_rows,
        layout=layout,
        min_t1_interactions=min_t1_interactions,
        t1_ratings=t1_ratings,
        full_history=protocol == "leave_one_out",
    )
    user_ids = source.pop("user_ids")
    return write_dataset(
        out,
        user_ids=user_ids,
        dataset=f"movielens-{source['layout']}",
        t1_seqs=t1_seqs,
        tasks=tasks,
        seed=seed,
        split=split,
        source=source,
        skipped_rows=skipped,
        instances_per_shard=instances_per_shard,
        records_per_sample=records_per_sample,
        protocol=protocol,
    )
