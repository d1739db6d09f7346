"""MovieLens-100K in GroupLens' original layout (``u.data``, ``u.user``) -> Conure tasks.

Recipe (the Conure paper's MovieLens setup):

* Each user's ratings are ordered by timestamp; ties keep the order of the rows in ``u.data``.
* ``t1`` (sequence): the user's most recent ``seq_len`` ratings below 4 stars, left-padded with 0.
  T1 item ids are remapped to 1..V-1 in the order of the raw ids, over the items that appear in
  some T1 sequence. Users without any rating below 4 have no T1 sequence; all their later-task
  instances are dropped (counted in ``source["users_without_t1"]``, 2 users in ML-100K).
* ``like4`` / ``like5`` (item tasks): one instance per rating of exactly 4 / 5 stars; each task
  has its own vocabulary 0..n-1 (raw ids in order) over the items it contains.
* ``gender`` (F, M), ``age`` and ``occupation`` (class tasks) from ``u.user``. Age uses the
  MovieLens-1M brackets <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+; all seven are kept even when
  empty so class ids mean the same on every MovieLens variant. Occupations are the sorted
  distinct values found in ``u.user`` (21 in ML-100K).

Malformed rows raise ``ValueError`` naming the file and 1-based line; with ``skip_bad_rows`` they
are skipped and counted (``skipped_rows`` in the manifest). Blank lines carry no row and are ignored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from conure_dist.data.manifest import Manifest, join_url
from data_tools.shards import TaskData, write_dataset

AGE_LIMITS: tuple[int, ...] = (18, 25, 35, 45, 50, 56)
AGE_BRACKETS: tuple[str, ...] = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
GENDERS: tuple[str, ...] = ("F", "M")
LOW_RATING = 4
"""Ratings strictly below this form T1."""


@dataclass
class _RowChecker:
    """Raises on a bad row, or counts it when skipping is allowed."""

    skip: bool
    counts: dict[str, int] = field(default_factory=dict)

    def bad(self, label: str, path: str, line_no: int, reason: str, detail: str) -> None:
        if not self.skip:
            raise ValueError(f"{path} line {line_no}: {detail}")
        key = f"{label}: {reason}"
        self.counts[key] = self.counts.get(key, 0) + 1


@dataclass
class _Ratings:
    """Valid ``u.data`` rows in file order."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray


@dataclass(frozen=True)
class _Profile:
    age: int
    gender: str
    occupation: str


def _read_text(url: str) -> tuple[str, str]:
    """File contents and their sha256 (for the source record)."""
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError as exn:
        raise FileNotFoundError(f"MovieLens file not found: {url}") from exn
    # latin-1 never fails to decode; GroupLens files are ASCII apart from titles in u.item.
    return data.decode("latin-1"), hashlib.sha256(data).hexdigest()


def _rows(text: str, sep: str) -> Iterator[tuple[int, list[str]]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield line_no, line.split(sep)


def _parse_int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _read_ratings(path: str, text: str, checker: _RowChecker) -> _Ratings:
    columns: list[list[int]] = [[], [], [], []]
    names = ("user id", "item id", "rating", "timestamp")
    for line_no, fields in _rows(text, "\t"):
        if len(fields) != 4:
            checker.bad(
                "u.data",
                path,
                line_no,
                "wrong field count",
                f"expected 4 tab-separated fields, got {len(fields)}",
            )
            continue
        values = [_parse_int(v) for v in fields]
        missing = [
            f"{n} '{v.strip()}'" for n, v, x in zip(names, fields, values, strict=True) if x is None
        ]
        if missing:
            checker.bad(
                "u.data", path, line_no, "non-integer field", f"non-integer {', '.join(missing)}"
            )
            continue
        user, item, rating, timestamp = ints = [v for v in values if v is not None]
        if user < 1 or item < 1:
            checker.bad(
                "u.data",
                path,
                line_no,
                "non-positive id",
                f"ids must be >= 1, got user {user}, item {item}",
            )
            continue
        if not 1 <= rating <= 5:
            checker.bad(
                "u.data", path, line_no, "rating outside 1..5", f"rating {rating} outside 1..5"
            )
            continue
        for column, value in zip(columns, ints, strict=True):
            column.append(value)
    if not columns[0]:
        raise ValueError(f"{path}: no valid ratings")
    return _Ratings(*(np.asarray(c, dtype=np.int64) for c in columns))


def _read_profiles(
    path: str, text: str, checker: _RowChecker, rated: set[int]
) -> dict[int, _Profile]:
    profiles: dict[int, _Profile] = {}
    for line_no, fields in _rows(text, "|"):
        if len(fields) != 5:
            checker.bad(
                "u.user",
                path,
                line_no,
                "wrong field count",
                f"expected 5 '|'-separated fields, got {len(fields)}",
            )
            continue
        user, age = _parse_int(fields[0]), _parse_int(fields[1])
        gender, occupation = fields[2].strip(), fields[3].strip()
        if user is None or age is None:
            bad = fields[0] if user is None else fields[1]
            checker.bad(
                "u.user",
                path,
                line_no,
                "non-integer field",
                f"non-integer {'user id' if user is None else 'age'} '{bad.strip()}'",
            )
        elif age < 0:
            checker.bad("u.user", path, line_no, "age out of range", f"age {age} is negative")
        elif gender not in GENDERS:
            checker.bad(
                "u.user",
                path,
                line_no,
                "unknown gender",
                f"gender '{gender}' is not one of {list(GENDERS)}",
            )
        elif not occupation:
            checker.bad("u.user", path, line_no, "empty occupation", "empty occupation")
        elif user in profiles:
            checker.bad("u.user", path, line_no, "duplicate user id", f"user {user} listed twice")
        elif user not in rated:
            checker.bad(
                "u.user",
                path,
                line_no,
                "user not in u.data",
                f"user {user} has no rating in u.data",
            )
        else:
            profiles[user] = _Profile(age, gender, occupation)
    return profiles


def _t1_table(ratings: _Ratings, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1 sequences [num_t1_users, seq_len], their raw user ids (sorted) and T1 raw item ids."""
    rows = np.arange(len(ratings.user))
    order = np.lexsort((rows, ratings.timestamp, ratings.user))  # by user, then time, then file row
    low = order[ratings.rating[order] < LOW_RATING]
    users, items = ratings.user[low], ratings.item[low]
    t1_users, starts, counts = np.unique(users, return_index=True, return_counts=True)
    # Position of each rating counted from the user's most recent one (0 = most recent).
    from_end = np.repeat(starts + counts, counts) - 1 - np.arange(len(users))
    keep = from_end < seq_len
    kept_items = items[keep]
    vocab = np.unique(kept_items)
    seqs = np.zeros((len(t1_users), seq_len), dtype=np.int32)
    seqs[np.searchsorted(t1_users, users[keep]), seq_len - 1 - from_end[keep]] = (
        np.searchsorted(vocab, kept_items) + 1
    )
    return seqs, t1_users, vocab


def _like_task(
    name: str, ratings: _Ratings, stars: int, t1_users: np.ndarray
) -> tuple[TaskData, int]:
    """Item task over the ratings of exactly ``stars``; also returns how many were dropped."""
    chosen = np.flatnonzero(ratings.rating == stars)
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
    )
    return task, int((~has_t1).sum())


def _profile_tasks(
    profiles: dict[int, _Profile], t1_users: np.ndarray
) -> tuple[list[TaskData], int]:
    """gender, age, occupation tasks over users with both a profile and a T1 sequence."""
    with_t1 = set(t1_users.tolist())
    kept = [u for u in sorted(profiles) if u in with_t1]
    rows = np.searchsorted(t1_users, np.asarray(kept, dtype=np.int64)).astype(np.int64)
    occupations = sorted({p.occupation for p in profiles.values()})
    labels = {
        "gender": ([GENDERS.index(profiles[u].gender) for u in kept], list(GENDERS)),
        "age": (
            [int(np.searchsorted(AGE_LIMITS, profiles[u].age, side="right")) for u in kept],
            list(AGE_BRACKETS),
        ),
        "occupation": ([occupations.index(profiles[u].occupation) for u in kept], occupations),
    }
    tasks = [
        TaskData(
            name,
            "class",
            None,
            rows,
            np.asarray(ids, dtype=np.int64),
            num_classes=len(names),
            class_names=names,
        )
        for name, (ids, names) in labels.items()
    ]
    return tasks, len(profiles) - len(kept)


def read_ml100k(
    src_dir: str, *, seq_len: int = 30, skip_bad_rows: bool = False
) -> tuple[np.ndarray, list[TaskData], dict[str, Any], dict[str, int]]:
    """Parse ``u.data`` and ``u.user`` under ``src_dir`` into (t1_seqs, tasks, source, skipped_rows)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    checker = _RowChecker(skip_bad_rows)
    data_path, user_path = join_url(src_dir, "u.data"), join_url(src_dir, "u.user")
    data_text, data_sha = _read_text(data_path)
    user_text, user_sha = _read_text(user_path)
    ratings = _read_ratings(data_path, data_text, checker)
    rated = set(np.unique(ratings.user).tolist())
    profiles = _read_profiles(user_path, user_text, checker, rated)
    t1_seqs, t1_users, t1_vocab = _t1_table(ratings, seq_len)
    if len(t1_users) == 0:
        raise ValueError(
            f"{data_path}: no user has a rating below {LOW_RATING}, so there is no T1 sequence"
        )
    like4, dropped4 = _like_task("like4", ratings, 4, t1_users)
    like5, dropped5 = _like_task("like5", ratings, 5, t1_users)
    profile_tasks, dropped_profiles = _profile_tasks(profiles, t1_users)
    t1 = TaskData(
        "t1",
        "sequence",
        t1_seqs,
        np.arange(len(t1_users), dtype=np.int64),
        None,
        num_items=len(t1_vocab) + 1,
    )
    source = {
        "src": src_dir,
        "files": {
            "u.data": {"sha256": data_sha, "valid_rows": len(ratings.user)},
            "u.user": {"sha256": user_sha, "valid_rows": len(profiles)},
        },
        "recipe": {
            "seq_len": seq_len,
            "t1": f"most recent ratings < {LOW_RATING}",
            "like4": "rating == 4",
            "like5": "rating == 5",
            "age_brackets": list(AGE_BRACKETS),
        },
        "num_users": len(rated),
        "num_t1_users": len(t1_users),
        "users_without_t1": len(rated) - len(t1_users),
        "users_without_profile": len(set(t1_users.tolist()) - set(profiles)),
        "dropped_instances": {"like4": dropped4, "like5": dropped5, "profile": dropped_profiles},
    }
    return t1_seqs, [t1, like4, like5, *profile_tasks], source, dict(checker.counts)


def write_movielens(
    src: str,
    out: str,
    *,
    seq_len: int = 30,
    seed: int = 0,
    skip_bad_rows: bool = False,
    instances_per_shard: int = 50_000,
    records_per_sample: int = 256,
) -> Manifest:
    """Convert ML-100K under ``src`` into shards + manifest under ``out``; ``seed`` seeds the split."""
    t1_seqs, tasks, source, skipped = read_ml100k(src, seq_len=seq_len, skip_bad_rows=skip_bad_rows)
    return write_dataset(
        out,
        dataset="ml-100k",
        t1_seqs=t1_seqs,
        tasks=tasks,
        seed=seed,
        source=source,
        skipped_rows=skipped,
        instances_per_shard=instances_per_shard,
        records_per_sample=records_per_sample,
    )
