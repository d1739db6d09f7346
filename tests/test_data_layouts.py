"""MovieLens-1M, the ratings.csv releases (20M/25M/32M/latest) and RecBole atomic files: the same
recipe as ML-100K, layout detection, and errors that name the file and line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, cli
from test_data_movielens import RATINGS, write_files

from conure_dist.data.manifest import Manifest
from data_tools.movielens import detect_layout, read_movielens

SHARED = REPO.parent / "shared" / "data"
USERS_1M = ["1::M::1::4::12345", "2::F::56::20::T8H1N", "3::M::25::1::02139"]  # id::gender::age::occ::zip
USERS_RECBOLE = [
    "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
    "1\t17\tM\tstudent\t12345",
    "2\t56\tF\twriter\tT8H1N",
    "3\t30\tM\tartist\t02139",
]


def write_ml1m(directory: Path, ratings: list[str] | None = None, users: list[str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = ratings if ratings is not None else ["::".join(map(str, r)) for r in RATINGS]
    (directory / "ratings.dat").write_text("\n".join(rows) + "\n")
    (directory / "users.dat").write_text("\n".join(users if users is not None else USERS_1M) + "\n")
    return directory


def write_csv(directory: Path, rows: list[str] | None = None, header: str = "userId,movieId,rating,timestamp") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    body = rows if rows is not None else [f"{u},{i},{float(r)},{t}" for u, i, r, t in RATINGS]
    (directory / "ratings.csv").write_text("\n".join([header, *body]) + "\n")
    return directory


def write_recbole(directory: Path, inter: list[str] | None = None, users: list[str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = (
        inter
        if inter is not None
        else ["user_id:token\titem_id:token\trating:float\ttimestamp:float", *("\t".join(map(str, r)) for r in RATINGS)]
    )
    (directory / "toy.inter").write_text("\n".join(rows) + "\n")
    if users is not False:
        (directory / "toy.user").write_text("\n".join(users if users is not None else USERS_RECBOLE) + "\n")
    return directory


def _item_tasks(tasks):
    return {
        t.name: (t.num_items, sorted(zip(t.users.tolist(), t.targets.tolist(), strict=True)))
        for t in tasks
        if t.kind == "item"
    }


@pytest.mark.parametrize("layout", ["ml-1m", "csv", "recbole"])
def test_every_layout_gives_the_ml100k_recipe(tmp_path, layout):
    t1_ref, tasks_ref, _, _ = read_movielens(str(write_files(tmp_path / "ref")), seq_len=3)
    writer = {"ml-1m": write_ml1m, "csv": write_csv, "recbole": write_recbole}[layout]
    src = str(writer(tmp_path / layout))
    assert detect_layout(src) == layout
    t1, tasks, source, skipped = read_movielens(src, seq_len=3)
    assert skipped == {} and source["layout"] == layout
    np.testing.assert_array_equal(t1, t1_ref)
    assert _item_tasks(tasks) == _item_tasks(tasks_ref)
    names = [t.name for t in tasks]
    if layout == "csv":  # no demographics: item tasks only
        assert names == ["t1", "like4", "like5"] and source["users_without_profile"] is None
        return
    assert names == ["t1", "like4", "like5", "gender", "age", "occupation"]
    by_name = {t.name: t for t in tasks}
    ref = {t.name: t for t in tasks_ref}
    for task in ("gender", "age"):
        assert by_name[task].targets.tolist() == ref[task].targets.tolist(), task
    if layout == "ml-1m":  # occupation codes, in numeric order
        assert by_name["occupation"].class_names == ["1", "4", "20"]
        assert by_name["occupation"].targets.tolist() == [1, 2]


def test_half_star_ratings_follow_the_recipe(tmp_path):
    rows = ["1,10,3.5,1", "1,11,0.5,2", "1,20,4.5,3", "1,21,4.0,4", "1,30,5.0,5", "2,10,2.0,1", "2,30,4.5,2"]
    t1, tasks, _, _ = read_movielens(str(write_csv(tmp_path, rows)), seq_len=4)
    np.testing.assert_array_equal(t1, [[0, 0, 1, 2], [0, 0, 0, 1]])  # ratings < 4 only
    like4, like5 = tasks[1], tasks[2]
    assert like4.num_items == 3 and sorted(zip(like4.users.tolist(), like4.targets.tolist(), strict=True)) == [
        (0, 0),
        (0, 1),
        (1, 2),
    ]
    assert like5.num_items == 1 and like5.users.tolist() == [0]


def test_real_recbole_copy_equals_grouplens_files(tmp_path):
    if not (SHARED / "ml-100k-recbole").is_dir():
        pytest.skip(f"RecBole ML-100K not found under {SHARED} (shared data directory absent)")
    t1_a, tasks_a, source_a, _ = read_movielens(str(SHARED / "ml-100k"))
    t1_b, tasks_b, source_b, skipped = read_movielens(str(SHARED / "ml-100k-recbole"))
    assert source_a["layout"] == "ml-100k" and source_b["layout"] == "recbole" and skipped == {}
    assert set(source_b["files"]) == {"ml-100k.inter", "ml-100k.user"}
    assert source_b["files"]["ml-100k.inter"]["valid_rows"] == 100_000
    np.testing.assert_array_equal(t1_a, t1_b)
    assert [t.name for t in tasks_a] == [t.name for t in tasks_b]
    for a, b in zip(tasks_a, tasks_b, strict=True):
        np.testing.assert_array_equal(a.users, b.users)
        if a.targets is not None:
            np.testing.assert_array_equal(a.targets, b.targets)
        assert a.class_names == b.class_names and a.num_items == b.num_items


def test_cli_detects_the_layout(tmp_path):
    src = write_ml1m(tmp_path / "ml-1m")
    printed = cli("data", "movielens", "--src", str(src), "--out", str(tmp_path / "out"), "--seq-len", "3")
    assert "wrote 6 tasks" in printed
    manifest = Manifest.load(str(tmp_path / "out"))
    assert manifest.dataset == "movielens-ml-1m" and manifest.source["layout"] == "ml-1m"
    assert [t.name for t in manifest.tasks] == ["t1", "like4", "like5", "gender", "age", "occupation"]


def test_unknown_layout_names_what_it_expects(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(
        ValueError, match=r"no MovieLens layout recognized \(expected ml-100k: u\.data.*\['notes\.txt'\]"
    ):
        detect_layout(str(tmp_path))


GOOD_CSV = ["1,10,3.0,1", "1,20,4.0,2", "2,10,2.5,3"]
GOOD_INTER = [
    "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "1\t10\t3\t1",
    "1\t20\t4\t2",
    "2\t10\t2\t3",
]


@pytest.mark.parametrize(
    ("layout", "file", "bad", "message", "reason"),
    [
        (
            "ml-1m",
            "ratings.dat",
            "1::10::3",
            r"ratings\.dat line 2: expected 4 '::'-separated fields, got 3",
            "ratings.dat: wrong field count",
        ),
        (
            "ml-1m",
            "ratings.dat",
            "1::10::3::99999999999999999999",
            r"ratings\.dat line 2: timestamp 99999999999999999999 beyond the int64 range",
            "ratings.dat: value beyond int64",
        ),
        (
            "csv",
            "ratings.csv",
            "1,18446744073709551616,4.0,5",
            r"ratings\.csv line 3: movieId 18446744073709551616 beyond the int64 range",
            "ratings.csv: value beyond int64",
        ),
        (
            "ml-1m",
            "ratings.dat",
            "1::10::x::5",
            r"ratings\.dat line 2: non-integer rating 'x'",
            "ratings.dat: non-integer field",
        ),
        (
            "ml-1m",
            "users.dat",
            "2::X::25::3::1",
            r"users\.dat line 2: gender 'X' is not one of",
            "users.dat: unknown gender",
        ),
        (
            "ml-1m",
            "users.dat",
            "7::F::25::3::1",
            r"users\.dat line 2: user 7 has no rating in ratings\.dat",
            "users.dat: user not in ratings.dat",
        ),
        (
            "csv",
            "ratings.csv",
            "1,30,4.3,9",
            r"ratings\.csv line 3: rating '4\.3' is not one of 0\.5, 1\.0",
            "ratings.csv: bad rating",
        ),
        (
            "csv",
            "ratings.csv",
            "1,abc,4.0,9",
            r"ratings\.csv line 3: non-integer movieId 'abc'",
            "ratings.csv: non-integer field",
        ),
        (
            "csv",
            "ratings.csv",
            "1_0,30,4.0,9",
            r"ratings\.csv line 3: non-integer userId '1_0'",
            "ratings.csv: non-integer field",
        ),
        (
            "csv",
            "ratings.csv",
            "1,30,0_5,9",
            r"ratings\.csv line 3: rating '0_5' is not one of 0\.5, 1\.0",
            "ratings.csv: bad rating",
        ),
        (
            "csv",
            "ratings.csv",
            "1,30,4.0",
            r"ratings\.csv line 3: expected 4 comma-separated fields, got 3",
            "ratings.csv: wrong field count",
        ),
        (
            "csv",
            "ratings.csv",
            "1,10,5.0,9",
            r"ratings\.csv line 3: the same user and item as line 2",
            "ratings.csv: duplicate rating",
        ),
        (
            "csv",
            "ratings.csv",
            "2,-1,4.0,9",
            r"ratings\.csv line 3: ids must be >= 1, got userId 2, movieId -1",
            "ratings.csv: non-positive id",
        ),
        (
            "recbole",
            "toy.inter",
            "1\t10\t5\t9",
            r"toy\.inter line 3: the same user and item as line 2",
            "toy.inter: duplicate rating",
        ),
        (
            "recbole",
            "toy.inter",
            "1\t30\tfive\t9",
            r"toy\.inter line 3: non-numeric rating 'five'",
            "toy.inter: non-numeric field",
        ),
        (
            "recbole",
            "toy.inter",
            "1\t30\t4\t1_0",
            r"toy\.inter line 3: non-numeric timestamp '1_0'",
            "toy.inter: non-numeric field",
        ),
        (
            "recbole",
            "toy.inter",
            "1\t30\t4",
            r"toy\.inter line 3: expected 4 tab-separated fields, got 3",
            "toy.inter: wrong field count",
        ),
        (
            "recbole",
            "toy.user",
            "9\t30\tF\twriter\t1",
            r"toy\.user line 3: user 9 has no rating in the \.inter file",
            "toy.user: user not in the .inter file",
        ),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, layout, file, bad, message, reason):
    if layout == "ml-1m":
        ratings, users = ["1::10::3::1", "1::20::4::2", "2::10::2::3"], ["1::M::1::4::1", "2::F::56::2::2"]
        (ratings if file == "ratings.dat" else users).insert(1, bad)
        src = write_ml1m(tmp_path / "src", ratings, users)
    elif layout == "csv":
        rows = list(GOOD_CSV)
        rows.insert(1, bad)
        src = write_csv(tmp_path / "src", rows)
    else:
        inter, users = list(GOOD_INTER), list(USERS_RECBOLE[:3])
        (inter if file == "toy.inter" else users).insert(2, bad)
        src = write_recbole(tmp_path / "src", inter, users)
    with pytest.raises(ValueError, match=message) as info:
        read_movielens(str(src))
    assert str(src / file) in str(info.value)
    _, tasks, _, skipped = read_movielens(str(src), skip_bad_rows=True)
    assert skipped == {reason: 1}
    assert tasks[0].seqs.shape == (2, 30)


@pytest.mark.parametrize(
    ("layout", "header", "message"),
    [
        ("csv", "user,movie,rating,time", r"ratings\.csv line 1: expected the header userId,movieId,rating,timestamp"),
        (
            "recbole",
            "user_id:token\titem_id:token\ttimestamp:float",
            r"toy\.inter line 1: the header has no \['rating'\]",
        ),
    ],
)
def test_bad_headers_are_errors_even_when_skipping(tmp_path, layout, header, message):
    if layout == "csv":
        src = write_csv(tmp_path, GOOD_CSV, header=header)
    else:
        src = write_recbole(tmp_path, [header, "1\t10\t1"], users=False)
    with pytest.raises(ValueError, match=message):
        read_movielens(str(src), skip_bad_rows=True)


@pytest.mark.parametrize("layout", ["ml-1m", "csv", "recbole"])
def test_utf8_bom_is_not_part_of_the_header_or_first_row(tmp_path, layout):
    writer = {"ml-1m": write_ml1m, "csv": write_csv, "recbole": write_recbole}[layout]
    t1_ref, tasks_ref, _, _ = read_movielens(str(writer(tmp_path / "ref")))
    src = writer(tmp_path / "bom")
    for path in src.iterdir():
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    for skip in (False, True):
        t1, tasks, source, skipped = read_movielens(str(src), skip_bad_rows=skip)
        assert skipped == {}
        np.testing.assert_array_equal(t1, t1_ref)
        assert [t.users.tolist() for t in tasks] == [t.users.tolist() for t in tasks_ref]
        assert {name: f["sha256"] for name, f in source["files"].items()} == {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()
        }


@pytest.mark.parametrize(
    ("layout", "file", "users"),
    [
        ("ml-1m", "users.dat", []),
        ("ml-1m", "users.dat", ["7::F::25::3::1"]),
        ("recbole", "toy.user", USERS_RECBOLE[:1]),
    ],
)
def test_profile_file_without_valid_rows_names_it(tmp_path, layout, file, users):
    src = write_ml1m(tmp_path, users=users) if layout == "ml-1m" else write_recbole(tmp_path, users=users)
    with pytest.raises(ValueError, match="no valid user rows") as info:
        read_movielens(str(src), skip_bad_rows=True)
    assert str(info.value) == f"{src / file}: no valid user rows"
