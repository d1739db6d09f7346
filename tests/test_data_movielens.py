"""MovieLens-100K conversion: the recipe on hand-made files, bad rows, and the real data's numbers."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conure_dist.data.manifest import Manifest
from conure_dist.data.stream import iter_batches
from data_tools.movielens import AGE_BRACKETS, read_movielens, write_movielens
from data_tools.rows import parse_int
from data_tools.split import split_sizes

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def _require_ml100k() -> None:
    """The tests of the real ML-100K run wherever ``../shared`` is (always in CI); elsewhere they
    skip, saying so."""
    if not ML100K.is_dir():
        pytest.skip(f"MovieLens-100K not found at {ML100K} (shared data directory absent)")


# user, item, rating, timestamp: GroupLens' u.data layout (tab separated).
RATINGS = [
    (1, 10, 3, 500),
    (1, 20, 4, 100),
    (1, 30, 1, 300),
    (1, 40, 2, 300),  # same second as item 30: file order decides, 30 then 40
    (1, 50, 5, 200),
    (1, 60, 3, 50),  # oldest low rating: dropped by seq_len=3
    (2, 30, 2, 10),
    (2, 20, 5, 20),
    (2, 70, 4, 30),
    (3, 20, 4, 5),  # user 3 has no rating < 4: no T1 sequence
    (3, 50, 5, 6),
]
# id|age|gender|occupation|zip: GroupLens' u.user layout.
USERS = ["1|17|M|student|12345", "2|56|F|writer|T8H1N", "3|30|M|artist|02139"]


def read_ml100k(src_dir: str, **options) -> tuple:
    """``read_movielens`` for GroupLens' ML-100K files (``u.data``, ``u.user``): the layout given,
    not detected."""
    return read_movielens(src_dir, layout="ml-100k", **options)


def write_files(directory: Path, ratings: list[str] | None = None, users: list[str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = ratings if ratings is not None else ["\t".join(map(str, r)) for r in RATINGS]
    (directory / "u.data").write_text("\n".join(rows) + "\n")
    (directory / "u.user").write_text("\n".join(users if users is not None else USERS) + "\n")
    return directory


def test_recipe_on_small_files(tmp_path: Path) -> None:
    t1, tasks, source, skipped = read_ml100k(str(write_files(tmp_path)), seq_len=3)
    assert skipped == {}
    # User 1's last three low ratings are 30, 40, 10 (60 falls out of the window, so out of the
    # vocabulary too): raw 10, 30, 40 -> 1, 2, 3.
    np.testing.assert_array_equal(t1, [[2, 3, 1], [0, 0, 2]])
    assert [t.name for t in tasks] == ["t1", "like4", "like5", "gender", "age", "occupation"]
    assert tasks[0].num_items == 4
    like4, like5, gender, age, occupation = tasks[1:]
    # like4: raw items 20 (user 1), 70 (user 2); user 3's rating of 20 is dropped (no T1).
    assert like4.num_items == 2
    assert sorted(zip(like4.users.tolist(), like4.targets.tolist(), strict=True)) == [
        (0, 0),
        (1, 1),
    ]
    assert like5.num_items == 2  # items 50 and 20
    assert sorted(zip(like5.users.tolist(), like5.targets.tolist(), strict=True)) == [
        (0, 1),
        (1, 0),
    ]
    assert gender.targets.tolist() == [1, 0] and gender.class_names == ["F", "M"]
    assert age.class_names == list(AGE_BRACKETS) and age.targets.tolist() == [0, 6]
    assert occupation.class_names == [
        "artist",
        "student",
        "writer",
    ] and occupation.targets.tolist() == [1, 2]
    assert source["users_without_t1"] == 1 and source["num_users"] == 3
    assert source["dropped_instances"] == {"like4": 1, "like5": 1, "profile": 1}


@pytest.mark.parametrize(
    ("age", "bracket"),
    [
        (7, 0),
        (17, 0),
        (18, 1),
        (24, 1),
        (25, 2),
        (34, 2),
        (35, 3),
        (45, 4),
        (49, 4),
        (50, 5),
        (55, 5),
        (56, 6),
        (73, 6),
    ],
)
def test_age_brackets(tmp_path: Path, age: int, bracket: int) -> None:
    users = [f"1|{age}|M|student|1", "2|30|F|writer|2"]
    _, tasks, _, _ = read_ml100k(str(write_files(tmp_path, users=users)))
    assert tasks[4].targets.tolist()[0] == bracket


GOOD = "1\t10\t3\t500"


@pytest.mark.parametrize(
    ("file", "bad_line", "message", "reason"),
    [
        (
            "u.data",
            "1\t10\t3",
            r"u\.data line 2: expected 4 tab-separated fields, got 3",
            "u.data: wrong field count",
        ),
        (
            "u.data",
            "1 10 3 500",
            r"u\.data line 2: expected 4 tab-separated fields, got 1",
            "u.data: wrong field count",
        ),
        (
            "u.data",
            "1\tx\t3\t500",
            r"u\.data line 2: non-integer item id 'x'",
            "u.data: non-integer field",
        ),
        (
            "u.data",
            "1\t10\t3.5\t500",
            r"u\.data line 2: non-integer rating '3\.5'",
            "u.data: non-integer field",
        ),
        (
            "u.data",
            "1\t10\t3\tnoon",
            r"u\.data line 2: non-integer timestamp 'noon'",
            "u.data: non-integer field",
        ),
        (
            "u.data",
            "1_0\t10\t3\t500",
            r"u\.data line 2: non-integer user id '1_0'",
            "u.data: non-integer field",
        ),
        (
            "u.data",
            "1\t99999999999999999999\t3\t500",
            r"u\.data line 2: item id 99999999999999999999 beyond the int64 range \(at most 9223372036854775807\)",
            "u.data: value beyond int64",
        ),
        (
            "u.data",
            "1\t10\t6\t500",
            r"u\.data line 2: rating 6 outside 1\.\.5",
            "u.data: rating outside 1..5",
        ),
        (
            "u.data",
            "1\t10\t5\t900",
            r"u\.data line 2: the same user and item as line 1",
            "u.data: duplicate rating",
        ),
        (
            "u.data",
            "1\t10\t0\t500",
            r"u\.data line 2: rating 0 outside 1\.\.5",
            "u.data: rating outside 1..5",
        ),
        (
            "u.user",
            "4|33|F|writer|1",
            r"u\.user line 2: user 4 has no rating in u\.data",
            "u.user: user not in u.data",
        ),
        (
            "u.user",
            "2|old|F|writer|1",
            r"u\.user line 2: non-integer age 'old'",
            "u.user: non-integer field",
        ),
        (
            "u.user",
            "2|3_0|F|writer|1",
            r"u\.user line 2: non-integer age '3_0'",
            "u.user: non-integer field",
        ),
        (
            "u.user",
            "two|30|F|writer|1",
            r"u\.user line 2: non-integer user id 'two'",
            "u.user: non-integer field",
        ),
        (
            "u.user",
            "2|30|F|writer",
            r"u\.user line 2: expected 5 '\|'-separated fields, got 4",
            "u.user: wrong field count",
        ),
        (
            "u.user",
            "2|30|X|writer|1",
            r"u\.user line 2: gender 'X' is not one of",
            "u.user: unknown gender",
        ),
        (
            "u.user",
            "1|30|F|writer|1",
            r"u\.user line 2: user 1 listed twice",
            "u.user: duplicate user id",
        ),
    ],
)
def test_bad_rows(tmp_path: Path, file: str, bad_line: str, message: str, reason: str) -> None:
    ratings = [GOOD, "2\t30\t2\t10", "2\t20\t5\t20"]
    users = ["1|17|M|student|1", "2|56|F|writer|2"]
    if file == "u.data":
        ratings.insert(1, bad_line)
    else:
        users.insert(1, bad_line)
    src = write_files(tmp_path / "src", ratings, users)
    with pytest.raises(ValueError, match=message) as info:
        read_ml100k(str(src))
    assert str(src / file) in str(info.value)
    manifest = write_movielens(str(src), str(tmp_path / "out"), skip_bad_rows=True)
    assert manifest.skipped_rows == {reason: 1}
    assert Manifest.load(str(tmp_path / "out")).skipped_rows == {reason: 1}
    assert (
        manifest.task("gender").splits["train"].num_instances
        + manifest.task("gender").splits["test"].num_instances
        + manifest.task("gender").splits["valid"].num_instances
        == 2
    )


def test_skip_counts_several_rows(tmp_path: Path) -> None:
    ratings = [GOOD, "1\t10", "bad", "1\t11\t9\t1", "2\t30\t2\t10", "", "2\t31\t1\t11"]
    src = write_files(tmp_path, ratings, ["1|17|M|student|1", "2|56|F|writer|2", "9|20|M|none|3"])
    t1, _, source, skipped = read_ml100k(str(src), skip_bad_rows=True)
    assert skipped == {
        "u.data: wrong field count": 2,
        "u.data: rating outside 1..5": 1,
        "u.user: user not in u.data": 1,
    }
    assert source["files"]["u.data"]["valid_rows"] == 3 and t1.shape == (2, 30)


def test_no_low_ratings_is_an_error(tmp_path: Path) -> None:
    src = write_files(tmp_path, ["1\t10\t5\t1"], ["1|17|M|student|1"])
    with pytest.raises(ValueError, match="no user has a rating below 4"):
        read_ml100k(str(src))


def test_integers_are_digits_with_an_optional_sign() -> None:
    assert [parse_int(t) for t in ("196", " 7 ", "+3", "-2", "007")] == [196, 7, 3, -2, 7]
    # int() would take the first two as 10 and 2.
    assert [parse_int(t) for t in ("1_0", "²", "", "1.0", "1 0", "0x1")] == [None] * 6


@pytest.mark.parametrize("skip", [False, True])
def test_utf8_bom_is_not_part_of_the_first_row(tmp_path: Path, skip: bool) -> None:
    t1_ref, tasks_ref, source_ref, _ = read_ml100k(str(write_files(tmp_path / "ref")))
    src = write_files(tmp_path / "bom")
    for name in ("u.data", "u.user"):
        (src / name).write_bytes(b"\xef\xbb\xbf" + (src / name).read_bytes())
    t1, tasks, source, skipped = read_ml100k(str(src), skip_bad_rows=skip)
    assert skipped == {}
    np.testing.assert_array_equal(t1, t1_ref)
    for task, ref in zip(tasks, tasks_ref, strict=True):
        assert task.users.tolist() == ref.users.tolist(), task.name
    for name in ("u.data", "u.user"):
        assert source["files"][name]["valid_rows"] == source_ref["files"][name]["valid_rows"]
        raw = (src / name).read_bytes()  # the record hashes the file as it is, BOM included
        assert source["files"][name]["sha256"] == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize(
    ("users", "skip"),
    [([], False), (["", "  "], False), (["9|20|M|none|3"], True), (["1|17|M|student"], True)],
)
def test_profile_file_without_valid_rows(tmp_path: Path, users: list[str], skip: bool) -> None:
    src = write_files(tmp_path, users=users)
    if not users:
        (src / "u.user").write_bytes(b"")
    with pytest.raises(ValueError, match="no valid user rows") as info:
        read_ml100k(str(src), skip_bad_rows=skip)
    assert str(info.value) == f"{src / 'u.user'}: no valid user rows"


def _reference_counts(src: Path) -> dict[str, int]:
    """Independent, plain-Python count of what the recipe must produce on ML-100K."""
    with open(src / "u.data", newline="") as f:
        rows = [tuple(map(int, r)) for r in csv.reader(f, delimiter="\t")]
    users = {r[0] for r in rows}
    with_t1 = {r[0] for r in rows if r[2] < 4}
    return {
        "users": len(users),
        "with_t1": len(with_t1),
        "like4": sum(1 for r in rows if r[2] == 4 and r[0] in with_t1),
        "like5": sum(1 for r in rows if r[2] == 5 and r[0] in with_t1),
        "t1_items": len({r[1] for r in rows if r[2] < 4}),
        "max_low": max(Counter(r[0] for r in rows if r[2] < 4).values()),
    }


def test_real_ml100k(tmp_path: Path) -> None:
    _require_ml100k()
    manifest = write_movielens(str(ML100K), str(tmp_path / "ml"), seed=0)
    ref = _reference_counts(ML100K)
    assert ref["users"] == 943 and ref["with_t1"] == 941
    assert manifest.source["num_users"] == 943 and manifest.source["users_without_t1"] == 2
    assert manifest.skipped_rows == {}
    assert [t.name for t in manifest.tasks] == [
        "t1",
        "like4",
        "like5",
        "gender",
        "age",
        "occupation",
    ]
    totals = {
        "t1": 941,
        "like4": ref["like4"],
        "like5": ref["like5"],
        "gender": 941,
        "age": 941,
        "occupation": 941,
    }
    for task in manifest.tasks:
        sizes = [task.splits[s].num_instances for s in ("train", "valid", "test")]
        assert sum(sizes) == totals[task.name]
        assert sizes == split_sizes(totals[task.name])
        assert abs(sizes[0] / sum(sizes) - 0.8) < 0.01 and abs(sizes[2] / sum(sizes) - 0.15) < 0.01
    assert manifest.task("gender").num_classes == 2 and manifest.task("occupation").num_classes == 21
    assert manifest.task("age").num_classes == 7
    # T1 vocabulary: items rated < 4 that survive the 30-item window; at most all low-rated items.
    assert 1000 < manifest.num_seq_items - 1 <= ref["t1_items"]
    seqs = np.concatenate(
        [
            b.seq.numpy()
            for split in ("train", "valid", "test")
            for b in iter_batches(manifest, "t1", split, 512, shuffle=False, seed=0, epoch=0)
        ]
    )
    assert seqs.shape == (941, 30) and seqs.max() == manifest.num_seq_items - 1
    lengths = (seqs > 0).sum(axis=1)
    assert lengths.min() >= 1 and lengths.max() == min(30, ref["max_low"])
    assert len(np.unique(seqs[seqs > 0])) == manifest.num_seq_items - 1  # every T1 id is used
    ages = np.concatenate(
        [
            b.target.numpy()
            for split in ("train", "valid", "test")
            for b in iter_batches(manifest, "age", split, 512, shuffle=False, seed=0, epoch=0)
        ]
    )
    assert np.bincount(ages, minlength=7).min() > 0  # every ML-1M bracket occurs in ML-100K


def test_real_ml100k_records_raw_ids(tmp_path: Path) -> None:
    """Every T1 row maps back, through users.json and t1's vocab, to that user's most recent
    30 ratings below 4 stars in u.data; like5 targets map back to 5-star movies of their user."""
    _require_ml100k()
    manifest = write_movielens(str(ML100K), str(tmp_path / "ml"), seed=0)
    users, t1_vocab, like5_vocab = manifest.load_users(), manifest.load_vocab("t1"), manifest.load_vocab("like5")
    assert len(users) == 941 and t1_vocab[0] == "" and len(t1_vocab) == manifest.num_seq_items
    assert manifest.load_vocab("gender") is None and len(like5_vocab) == manifest.task("like5").num_items
    with open(ML100K / "u.data", newline="") as f:
        rows = [tuple(map(int, r)) for r in csv.reader(f, delimiter="\t")]
    low: dict[str, list[tuple[int, int, str]]] = {}
    fives: dict[str, set[str]] = {}
    for line, (user, item, rating, stamp) in enumerate(rows):
        if rating < 4:
            low.setdefault(str(user), []).append((stamp, line, str(item)))
        elif rating == 5:
            fives.setdefault(str(user), set()).add(str(item))
    for batch in iter_batches(manifest, "t1", "test", 512, shuffle=False, seed=0, epoch=0):
        for row, seq in zip(batch.user.tolist(), batch.seq.tolist(), strict=True):
            user = users[row]
            assert [t1_vocab[i] for i in seq if i] == [item for _, _, item in sorted(low[user])[-30:]], user
    batch = next(iter(iter_batches(manifest, "like5", "test", 512, shuffle=False, seed=0, epoch=0)))
    for row, target in zip(batch.user.tolist(), batch.target.tolist(), strict=True):
        assert like5_vocab[target] in fives[users[row]]


def test_min_t1_interactions_on_small_files(tmp_path: Path) -> None:
    """User 1 has 4 low ratings, user 2 one: at 2, user 2 and all their instances go."""
    t1, tasks, source, _ = read_ml100k(str(write_files(tmp_path)), seq_len=3, min_t1_interactions=2)
    np.testing.assert_array_equal(t1, [[2, 3, 1]])
    assert [t.num_instances for t in tasks] == [1, 1, 1, 1, 1, 1]
    assert source["users_below_min_t1"] == 1 and source["users_without_t1"] == 1
    assert source["recipe"]["min_t1_interactions"] == 2
    assert read_ml100k(str(tmp_path), seq_len=3, min_t1_interactions=4)[0].shape == (1, 3)  # 4 is enough
    with pytest.raises(ValueError, match=r"u\.data: no user has 5 or more ratings below 4"):
        read_ml100k(str(tmp_path), min_t1_interactions=5)
    with pytest.raises(ValueError, match="min_t1_interactions must be >= 0, got -1"):
        read_ml100k(str(tmp_path), min_t1_interactions=-1)


def test_real_ml100k_keeps_users_with_more_than_5_t1_ratings(tmp_path: Path) -> None:
    """The paper's filter on ML-100K: 894 of the 941 users with a T1 rating have 6 or more."""
    _require_ml100k()
    from conure_dist.config import load_config
    from conure_dist.data.dataset import open_dataset
    from data_tools.prepare import write_shards

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "ml100k.yaml",
        [f"data.root={tmp_path / 'ml'}", f"data.source_dir={ML100K}"],
    )
    assert cfg.data.min_t1_interactions == 6  # the preset follows the paper
    manifest = write_shards(cfg.data.source, cfg.data)
    low = Counter(user for user, _, rating in _rows(ML100K) if rating < 4)
    assert sum(count >= 6 for count in low.values()) == 894
    assert manifest.source["num_t1_users"] == 894 and manifest.source["users_below_min_t1"] == 47
    assert manifest.source["users_without_t1"] == 2 and manifest.source["dropped_instances"]["like4"] == 537
    sizes = {t.name: sum(t.splits[s].num_instances for s in t.splits) for t in manifest.tasks}
    assert sizes == {"t1": 894, "like4": 33637, "like5": 20454, "gender": 894, "age": 894, "occupation": 894}
    seqs = np.concatenate(
        [b.seq.numpy() for b in iter_batches(manifest, "t1", "train", 512, shuffle=False, seed=0, epoch=0)]
    )
    assert (seqs > 0).sum(axis=1).min() == 6
    # Shards built with the filter are refused for a config without it, naming the key.
    cfg.data.min_t1_interactions = 0
    with pytest.raises(ValueError, match=r"data.min_t1_interactions=0 \(the shards have 6\)"):
        open_dataset(cfg)


def _rows(src: Path) -> list[tuple[int, int, int]]:
    with open(src / "u.data", newline="") as f:
        return [(int(r[0]), int(r[1]), int(r[2])) for r in csv.reader(f, delimiter="\t")]
