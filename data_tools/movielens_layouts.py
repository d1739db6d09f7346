"""Reading MovieLens in its public layouts (listed in ``movielens``): layout detection and the
rating and profile readers, which check every row (see ``movielens`` for how bad rows are
handled). The interface is ``read_source``, which returns a ``ParsedSource`` (``Ratings`` and
``Profile`` records, and the files read); ``movielens`` turns that into Conure tasks. The two
change for different reasons (a new layout here, the paper's recipe there)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from conure_dist.errors import UserError
from conure_dist.fs import join
from data_tools.rows import INT64_MAX, RowChecker, beyond_int64, parse_int, parse_number, read_text

GENDERS: tuple[str, ...] = ("F", "M")


@dataclass
class Ratings:
    """Valid rating rows in file order: int64 user and item ids, float64 rating and timestamp."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    line: np.ndarray
    """1-based line of each row in its file."""

    def take(self, rows: np.ndarray) -> Ratings:
        return Ratings(self.user[rows], self.item[rows], self.rating[rows], self.timestamp[rows], self.line[rows])


@dataclass(frozen=True)
class Profile:
    """What a layout knows of a user; None where it has no such field."""

    age: int | None
    gender: str | None
    occupation: str | None


@dataclass
class ParsedSource:
    """A layout's parsed files."""

    layout: str
    ratings: Ratings
    profiles: dict[int, Profile]
    files: dict[str, dict[str, Any]]
    profile_fields: tuple[str, ...]
    tokens: dict[str, dict[int, str]] = field(default_factory=dict)
    """Where ids were numbered from tokens (RecBole): 'user' / 'item' -> id -> raw token."""

    def raw(self, kind: str, ids: np.ndarray) -> list[str]:
        names = self.tokens.get(kind)
        return [names[i] for i in ids.tolist()] if names else [str(i) for i in ids.tolist()]


def _rows(text: str, sep: str) -> Iterator[tuple[int, list[str]]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield line_no, line.split(sep)


def _ratings(columns: list[list[float]], lines: list[int]) -> Ratings:
    user, item, rating, timestamp = columns
    return Ratings(
        np.asarray(user, dtype=np.int64),
        np.asarray(item, dtype=np.int64),
        np.asarray(rating, dtype=np.float64),
        np.asarray(timestamp, dtype=np.float64),
        np.asarray(lines, dtype=np.int64),
    )


def _drop_duplicates(label: str, path: str, ratings: Ratings, checker: RowChecker) -> Ratings:
    """A user rates an item once. A repeated (user, item) row is a bad row: kept, it could put
    the same instance in both the training and the test split."""
    order = np.lexsort((ratings.item, ratings.user))  # stable: equal pairs stay in file order
    user, item = ratings.user[order], ratings.item[order]
    repeat_sorted = np.r_[False, (user[1:] == user[:-1]) & (item[1:] == item[:-1])]
    if not repeat_sorted.any():
        return ratings
    # The row that each row repeats: the first of its run of equal pairs.
    run_start = np.maximum.accumulate(np.where(repeat_sorted, 0, np.arange(len(order))))
    first = np.empty_like(order)
    first[order] = order[run_start]
    repeat = np.zeros(len(order), dtype=bool)
    repeat[order] = repeat_sorted
    for row in np.flatnonzero(repeat):  # in file order
        checker.bad(
            label,
            path,
            int(ratings.line[row]),
            "duplicate rating",
            f"the same user and item as line {int(ratings.line[first[row]])} (each user rates an item once)",
        )
    return ratings.take(np.flatnonzero(~repeat))


def _read_int_ratings(label: str, path: str, text: str, sep: str, checker: RowChecker) -> Ratings:
    """``u.data`` / ``ratings.dat``: user, item, whole-star rating 1..5, timestamp; all integers."""
    columns: list[list[float]] = [[], [], [], []]
    lines: list[int] = []
    names = ("user id", "item id", "rating", "timestamp")
    shown = "tab" if sep == "\t" else f"'{sep}'"
    for line_no, fields in _rows(text, sep):
        if len(fields) != 4:
            checker.bad(
                label, path, line_no, "wrong field count", f"expected 4 {shown}-separated fields, got {len(fields)}"
            )
            continue
        values = [parse_int(v) for v in fields]
        missing = [f"{n} '{v.strip()}'" for n, v, x in zip(names, fields, values, strict=True) if x is None]
        if missing:
            checker.bad(label, path, line_no, "non-integer field", f"non-integer {', '.join(missing)}")
            continue
        user, item, rating, timestamp = ints = [v for v in values if v is not None]
        if user < 1 or item < 1:
            checker.bad(label, path, line_no, "non-positive id", f"ids must be >= 1, got user {user}, item {item}")
            continue
        big = beyond_int64(dict(zip(names, ints, strict=True)))
        if big:
            checker.bad(label, path, line_no, "value beyond int64", big)
            continue
        if not 1 <= rating <= 5:
            checker.bad(label, path, line_no, "rating outside 1..5", f"rating {rating} outside 1..5")
            continue
        for column, value in zip(columns, ints, strict=True):
            column.append(value)
        lines.append(line_no)
    if not columns[0]:
        raise UserError(f"{path}: no valid ratings")
    return _drop_duplicates(label, path, _ratings(columns, lines), checker)


CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]


def _read_csv_ratings(path: str, text: str, checker: RowChecker) -> Ratings:
    """``ratings.csv`` (MovieLens-20M/25M/32M, latest): header, then half-star ratings 0.5..5."""
    label = "ratings.csv"
    columns: list[list[float]] = [[], [], [], []]
    lines: list[int] = []
    rows = _rows(text, ",")
    first = next(rows, None)
    if first is None or [f.strip() for f in first[1]] != CSV_HEADER:
        got = ",".join(first[1]) if first else "an empty file"
        raise UserError(
            f"{path} line {first[0] if first else 1}: expected the header {','.join(CSV_HEADER)}, got '{got}'"
        )
    for line_no, fields in rows:
        if len(fields) != 4:
            checker.bad(
                label, path, line_no, "wrong field count", f"expected 4 comma-separated fields, got {len(fields)}"
            )
            continue
        user, item, timestamp = parse_int(fields[0]), parse_int(fields[1]), parse_int(fields[3])
        rating = parse_number(fields[2])
        bad = [
            f"{n} '{v.strip()}'"
            for n, v, x in zip(
                ("userId", "movieId", "timestamp"),
                (fields[0], fields[1], fields[3]),
                (user, item, timestamp),
                strict=True,
            )
            if x is None
        ]
        if bad:
            checker.bad(label, path, line_no, "non-integer field", f"non-integer {', '.join(bad)}")
            continue
        if user < 1 or item < 1:
            checker.bad(label, path, line_no, "non-positive id", f"ids must be >= 1, got userId {user}, movieId {item}")
            continue
        big = beyond_int64({"userId": user, "movieId": item, "timestamp": timestamp})
        if big:
            checker.bad(label, path, line_no, "value beyond int64", big)
            continue
        if rating is None or not 0.5 <= rating <= 5 or rating * 2 != int(rating * 2):
            checker.bad(
                label, path, line_no, "bad rating", f"rating '{fields[2].strip()}' is not one of 0.5, 1.0, ..., 5.0"
            )
            continue
        for column, value in zip(columns, (user, item, rating, timestamp), strict=True):
            column.append(value)
        lines.append(line_no)
    if not columns[0]:
        raise UserError(f"{path}: no valid ratings")
    return _drop_duplicates(label, path, _ratings(columns, lines), checker)


def _recbole_rows(
    path: str, text: str, required: tuple[str, ...], checker: RowChecker
) -> tuple[dict[str, int], Iterator[tuple[int, list[str]]]]:
    """Field positions of a RecBole file's header (``name:type`` separated by tabs) and its data
    rows with the header's field count (other rows are reported to ``checker``)."""
    label = path.rsplit("/", 1)[-1]
    rows = _rows(text, "\t")
    first = next(rows, None)
    if first is None:
        raise UserError(f"{path} line 1: empty file, expected a header of name:type fields")
    names = [f.strip().split(":", 1)[0] for f in first[1]]
    missing = [n for n in required if n not in names]
    if missing:
        raise UserError(f"{path} line {first[0]}: the header has no {missing} field (found {names})")

    def data() -> Iterator[tuple[int, list[str]]]:
        for line_no, fields in rows:
            if len(fields) == len(names):
                yield line_no, fields
            else:
                checker.bad(
                    label,
                    path,
                    line_no,
                    "wrong field count",
                    f"expected {len(names)} tab-separated fields, got {len(fields)}",
                )

    return {n: i for i, n in enumerate(names)}, data()


class _TokenIds:
    """RecBole tokens -> int ids: the numbers themselves when every token is one, else the rank
    of the token in sorted order."""

    def __init__(self, tokens: list[str]) -> None:
        unique = sorted(set(tokens))
        # isdigit() alone takes '²'; a number beyond int64 is a label like any other token.
        self.numeric = all(t.isascii() and t.isdigit() and int(t) <= INT64_MAX for t in unique)
        self.ids = {t: (int(t) if self.numeric else i + 1) for i, t in enumerate(unique)}


def _read_recbole_ratings(path: str, text: str, checker: RowChecker) -> tuple[Ratings, _TokenIds, _TokenIds]:
    label = path.rsplit("/", 1)[-1]
    where, rows = _recbole_rows(path, text, ("user_id", "item_id", "rating", "timestamp"), checker)
    users: list[str] = []
    items: list[str] = []
    values: list[tuple[float, float]] = []
    lines: list[int] = []
    for line_no, fields in rows:
        user, item = fields[where["user_id"]].strip(), fields[where["item_id"]].strip()
        rating, timestamp = parse_number(fields[where["rating"]]), parse_number(fields[where["timestamp"]])
        if not user or not item:
            checker.bad(label, path, line_no, "empty id", "empty user_id or item_id")
        elif rating is None or timestamp is None:
            bad = fields[where["rating"]] if rating is None else fields[where["timestamp"]]
            checker.bad(
                label,
                path,
                line_no,
                "non-numeric field",
                f"non-numeric {'rating' if rating is None else 'timestamp'} '{bad.strip()}'",
            )
        elif not 0 < rating <= 5:
            checker.bad(label, path, line_no, "rating outside (0, 5]", f"rating {rating:g} outside (0, 5]")
        else:
            users.append(user)
            items.append(item)
            values.append((rating, timestamp))
            lines.append(line_no)
    if not users:
        raise UserError(f"{path}: no valid ratings")
    user_ids, item_ids = _TokenIds(users), _TokenIds(items)
    ratings = _ratings(
        [
            [user_ids.ids[u] for u in users],
            [item_ids.ids[i] for i in items],
            [v[0] for v in values],
            [v[1] for v in values],
        ],
        lines,
    )
    return _drop_duplicates(label, path, ratings, checker), user_ids, item_ids


@dataclass
class _ProfileReader:
    """Checks one profile row's fields and collects the profiles."""

    label: str
    path: str
    checker: RowChecker
    rated: set[int]
    profiles: dict[int, Profile] = field(default_factory=dict)

    def add(
        self,
        line_no: int,
        user: int | None,
        user_raw: str,
        age_raw: str | None,
        gender: str | None,
        occupation: str | None,
    ) -> None:
        bad = self.checker.bad
        age = None if age_raw is None else parse_int(age_raw)
        if user is None or (age_raw is not None and age is None):
            shown = user_raw if user is None else age_raw
            bad(
                self.label,
                self.path,
                line_no,
                "non-integer field",
                f"non-integer {'user id' if user is None else 'age'} '{shown.strip()}'",
            )
        elif age is not None and age < 0:
            bad(self.label, self.path, line_no, "age out of range", f"age {age} is negative")
        elif gender is not None and gender not in GENDERS:
            bad(self.label, self.path, line_no, "unknown gender", f"gender '{gender}' is not one of {list(GENDERS)}")
        elif occupation is not None and not occupation:
            bad(self.label, self.path, line_no, "empty occupation", "empty occupation")
        elif user in self.profiles:
            bad(self.label, self.path, line_no, "duplicate user id", f"user {user_raw.strip()} listed twice")
        elif user not in self.rated:
            bad(
                self.label,
                self.path,
                line_no,
                f"user not in {self._ratings_file()}",
                f"user {user_raw.strip()} has no rating in {self._ratings_file()}",
            )
        else:
            self.profiles[user] = Profile(age, gender, occupation)

    def finish(self) -> dict[int, Profile]:
        """The profiles; a file without any valid row is an error (its tasks would have no class)."""
        if not self.profiles:
            raise UserError(f"{self.path}: no valid user rows")
        return self.profiles

    def _ratings_file(self) -> str:
        return {"u.user": "u.data", "users.dat": "ratings.dat"}.get(self.label, "the .inter file")


def _read_delimited_profiles(
    label: str, path: str, text: str, sep: str, order: tuple[int, int, int], checker: RowChecker, rated: set[int]
) -> dict[int, Profile]:
    """``u.user`` (id|age|gender|occupation|zip) and ``users.dat`` (id::gender::age::occupation::zip);
    ``order`` gives the positions of age, gender and occupation."""
    reader = _ProfileReader(label, path, checker, rated)
    age_at, gender_at, occupation_at = order
    for line_no, fields in _rows(text, sep):
        if len(fields) != 5:
            checker.bad(
                label, path, line_no, "wrong field count", f"expected 5 '{sep}'-separated fields, got {len(fields)}"
            )
            continue
        reader.add(
            line_no,
            parse_int(fields[0]),
            fields[0],
            fields[age_at],
            fields[gender_at].strip(),
            fields[occupation_at].strip(),
        )
    return reader.finish()


def _read_recbole_profiles(
    path: str, text: str, checker: RowChecker, rated: set[int], user_ids: _TokenIds
) -> tuple[dict[int, Profile], tuple[str, ...]]:
    label = path.rsplit("/", 1)[-1]
    where, rows = _recbole_rows(path, text, ("user_id",), checker)
    present = tuple(f for f in ("gender", "age", "occupation") if f in where)
    reader = _ProfileReader(label, path, checker, rated)
    for line_no, fields in rows:
        token = fields[where["user_id"]].strip()
        user = user_ids.ids.get(token, parse_int(token) if user_ids.numeric else -1)
        get = {f: (fields[where[f]].strip() if f in where else None) for f in ("age", "gender", "occupation")}
        reader.add(line_no, user, token, get["age"], get["gender"], get["occupation"])
    return reader.finish(), present


LAYOUT_FILES = {
    "ml-100k": "u.data (+ u.user)",
    "ml-1m": "ratings.dat (+ users.dat)",
    "csv": "ratings.csv",
    "recbole": "one *.inter (+ *.user)",
}


def detect_layout(src_dir: str) -> str:
    """Which MovieLens layout ``src_dir`` holds, from its file names."""
    fs, root = fsspec.core.url_to_fs(src_dir)
    try:
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    except FileNotFoundError as exn:
        raise FileNotFoundError(f"MovieLens source directory not found: {src_dir}") from exn
    for layout, marker in (("ml-100k", "u.data"), ("ml-1m", "ratings.dat"), ("csv", "ratings.csv")):
        if marker in names:
            return layout
    if [n for n in names if n.endswith(".inter")]:
        return "recbole"
    known = "; ".join(f"{k}: {v}" for k, v in LAYOUT_FILES.items())
    raise UserError(f"{src_dir}: no MovieLens layout recognized (expected {known}); found {sorted(names)}")


def _only(src_dir: str, suffix: str, required: bool) -> str | None:
    fs, root = fsspec.core.url_to_fs(src_dir)
    found = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if p.endswith(suffix))
    if len(found) > 1:
        raise UserError(f"{src_dir}: several {suffix} files {found}; keep one per directory")
    if not found:
        if required:
            raise FileNotFoundError(f"{src_dir}: no {suffix} file")
        return None
    return join(src_dir, found[0])


def read_source(src_dir: str, layout: str, checker: RowChecker) -> ParsedSource:
    """The ratings and profiles of the release under ``src_dir`` in ``layout``, each row checked."""
    files: dict[str, dict[str, Any]] = {}

    def load(url: str) -> tuple[str, str]:
        text, sha = read_text(url)
        files[url.rsplit("/", 1)[-1]] = {"sha256": sha}
        return url, text

    profile_fields: tuple[str, ...] = ("gender", "age", "occupation")
    if layout in ("ml-100k", "ml-1m"):
        data_name, user_name, sep = (
            ("u.data", "u.user", "\t") if layout == "ml-100k" else ("ratings.dat", "users.dat", "::")
        )
        path, text = load(join(src_dir, data_name))
        ratings = _read_int_ratings(data_name, path, text, sep, checker)
        rated = set(np.unique(ratings.user).tolist())
        path, text = load(join(src_dir, user_name))
        order = (1, 2, 3) if layout == "ml-100k" else (2, 1, 3)
        profiles = _read_delimited_profiles(
            user_name, path, text, "|" if layout == "ml-100k" else "::", order, checker, rated
        )
    elif layout == "csv":
        path, text = load(join(src_dir, "ratings.csv"))
        ratings, profiles, profile_fields = _read_csv_ratings(path, text, checker), {}, ()
    elif layout == "recbole":
        path, text = load(_only(src_dir, ".inter", required=True))
        ratings, user_ids, item_ids = _read_recbole_ratings(path, text, checker)
        user_url = _only(src_dir, ".user", required=False)
        profiles, profile_fields = {}, ()
        if user_url is not None:
            path, text = load(user_url)
            profiles, profile_fields = _read_recbole_profiles(
                path, text, checker, set(np.unique(ratings.user).tolist()), user_ids
            )
        tokens = {kind: {i: t for t, i in ids.ids.items()} for kind, ids in (("user", user_ids), ("item", item_ids))}
        return ParsedSource(layout, ratings, profiles, files, profile_fields, tokens)
    else:
        raise UserError(f"unknown MovieLens layout '{layout}', expected one of {sorted(LAYOUT_FILES)}")
    return ParsedSource(layout, ratings, profiles, files, profile_fields)
