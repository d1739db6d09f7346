"""The Tencent TTL file layout: pretraining file, item-task and profile files (source,,targets)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from helpers import cli

from conure_dist.data.manifest import Manifest
from data_tools.ttl import BLOCK_ROWS, TaskFile, read_ttl

PRETRAIN = ["0,0,a7,b2,c9", "0,0,0,b2,b2", "x1,a7,c9,c9,b2"]
CLICKS = ["0,0,a7,b2,c9,,k5,k1", "0,0,0,b2,b2,,k1", "0,0,0,0,c9,,k20"]  # the last source is not a T1 row
AGE = ["0,0,a7,b2,c9,,3", "x1,a7,c9,c9,b2,,10", "0,0,0,b2,b2,,3"]


def write(tmp_path, pretrain=None, clicks=None, age=None):
    files = {"pretrain.csv": pretrain or PRETRAIN, "clicks.csv": clicks or CLICKS, "age.csv": age or AGE}
    for name, rows in files.items():
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    return (
        str(tmp_path / "pretrain.csv"),
        [TaskFile("click", "item", str(tmp_path / "clicks.csv")), TaskFile("age", "class", str(tmp_path / "age.csv"))],
    )


def test_ttl_files_to_tasks(tmp_path):
    pretrain, tasks = write(tmp_path)
    t1_seqs, data, source, skipped = read_ttl(pretrain, tasks, seq_len=5)
    assert skipped == {}
    # T1 vocabulary: sorted tokens a7, b2, c9, x1 -> 1..4; padding 0.
    np.testing.assert_array_equal(t1_seqs, [[0, 0, 1, 2, 3], [0, 0, 0, 2, 2], [4, 1, 3, 3, 2], [0, 0, 0, 0, 3]])
    t1, click, age = data
    assert t1.num_items == 5 and t1.users.tolist() == [0, 1, 2] and t1.seqs.shape == (3, 5)
    assert source["input_only_rows"] == 1  # clicks' third source is an input row, not a T1 instance
    # Click targets sort as strings: k1, k20, k5 -> 0, 1, 2; one instance per target.
    assert click.num_items == 3
    assert list(zip(click.users.tolist(), click.targets.tolist(), strict=True)) == [(0, 2), (0, 0), (1, 0), (3, 1)]
    assert age.class_names == ["3", "10"] and age.targets.tolist() == [0, 1, 0] and age.users.tolist() == [0, 2, 1]


def test_ttl_cli_writes_shards(tmp_path):
    pretrain, tasks = write(tmp_path)
    cli(
        "data",
        "ttl",
        "--pretrain",
        pretrain,
        "--task",
        f"click=item:{tasks[0].path}",
        "--task",
        f"age=class:{tasks[1].path}",
        "--seq-len",
        "5",
        "--out",
        str(tmp_path / "out"),
    )
    manifest = Manifest.load(str(tmp_path / "out"))
    assert [t.name for t in manifest.tasks] == ["t1", "click", "age"] and manifest.dataset == "ttl"
    assert manifest.num_seq_items == 5 and manifest.seq_len == 5
    assert sum(manifest.task("click").splits[s].num_instances for s in ("train", "valid", "test")) == 4
    # The tokens behind the ids, for predictions in the source's terms.
    assert manifest.load_vocab("t1") == ["", "a7", "b2", "c9", "x1"]
    assert manifest.load_vocab("click") == ["k1", "k20", "k5"] and manifest.load_vocab("age") is None
    assert manifest.load_users() is None  # TTL rows carry no user id


@pytest.mark.parametrize(
    ("which", "bad", "message", "reason"),
    [
        ("pretrain", "0,a7,b2", r"pretrain\.csv line 2: expected 5 tokens, got 3", "pretrain.csv: wrong token count"),
        (
            "clicks",
            "0,0,a7,b2,c9,k5",
            r"clicks\.csv line 2: no ',,' between source and targets",
            "clicks.csv: no ',,' separator",
        ),
        (
            "clicks",
            "0,0,a7,b2,zz,,k5",
            r"clicks\.csv line 2: source token 'zz' is not in the pretraining vocabulary",
            "clicks.csv: token not in T1",
        ),
        ("clicks", "0,0,a7,b2,c9,,", r"clicks\.csv line 2: no target after ',,'", "clicks.csv: no target"),
        ("age", "0,0,a7,b2,c9,,3,4", r"age\.csv line 2: expected one label, got 2", "age.csv: several labels"),
        ("age", "0,0,0,0,0,,3", r"age\.csv line 2: the source is only padding", "age.csv: empty sequence"),
    ],
)
def test_ttl_bad_rows_name_file_and_line(tmp_path, which, bad, message, reason):
    rows = {"pretrain": list(PRETRAIN), "clicks": list(CLICKS), "age": list(AGE)}
    rows[which].insert(1, bad)
    pretrain, tasks = write(tmp_path, rows["pretrain"], rows["clicks"], rows["age"])
    with pytest.raises(ValueError, match=message):
        read_ttl(pretrain, tasks, seq_len=5)
    _, _, _, skipped = read_ttl(pretrain, tasks, seq_len=5, skip_bad_rows=True)
    assert skipped == {reason: 1}


def test_task_spec_errors():
    assert TaskFile.parse("click=item:a/b.csv") == TaskFile("click", "item", "a/b.csv")
    with pytest.raises(ValueError, match="NAME=item:PATH or NAME=class:PATH"):
        TaskFile.parse("click=items:a.csv")


def test_numeric_labels_sort_numerically(tmp_path):
    age = ["0,0,a7,b2,c9,,-1", "x1,a7,c9,c9,b2,,2.5", "0,0,0,b2,b2,,10"]
    pretrain, tasks = write(tmp_path, age=age)
    _, data, _, _ = read_ttl(pretrain, tasks, seq_len=5)
    assert data[2].class_names == ["-1", "2.5", "10"] and data[2].targets.tolist() == [0, 1, 2]


def test_utf8_bom_is_not_a_token(tmp_path):
    (tmp_path / "ref").mkdir()
    t1_ref, data_ref, _, _ = read_ttl(*write(tmp_path / "ref"), seq_len=5)
    pretrain, tasks = write(tmp_path)
    for path in (tmp_path / "pretrain.csv", tmp_path / "clicks.csv", tmp_path / "age.csv"):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    for skip in (False, True):
        t1_seqs, data, source, skipped = read_ttl(pretrain, tasks, seq_len=5, skip_bad_rows=skip)
        assert skipped == {}
        np.testing.assert_array_equal(t1_seqs, t1_ref)
        assert [d.targets is None or d.targets.tolist() for d in data] == [
            d.targets is None or d.targets.tolist() for d in data_ref
        ]
        raw = (tmp_path / "pretrain.csv").read_bytes()  # hashed as it is, BOM included
        assert source["files"]["pretrain.csv"]["sha256"] == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("seq_len", [0, 1, -3])
def test_seq_len_below_two_is_an_error(tmp_path, seq_len):
    pretrain, tasks = write(tmp_path)
    with pytest.raises(ValueError, match=rf"^seq_len \(--seq-len\) must be >= 2, got {seq_len}$"):
        read_ttl(pretrain, tasks, seq_len=seq_len)


def test_the_files_are_streamed_not_held(tmp_path):
    """Memory holds the T1 table (int32; twice while it is put together), the block of rows being
    filled and the vocabularies, never a file's text or its rows as strings (the whole text read
    at once, split into token strings, took 13 times the table here)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    rows = rng.integers(100, 400, size=(3000, 100))  # 300 tokens of 3 characters
    pretrain = ["0,0,0," + ",".join(map(str, r[3:])) for r in rows]
    clicks = [f"{p},,{t}" for p, t in zip(pretrain[::2], rng.integers(0, 50, size=1500), strict=True)]
    path, tasks = write(tmp_path, pretrain, clicks, [f"{p},,1" for p in pretrain[:10]])
    tracemalloc.start()
    try:
        t1_seqs, data, _, _ = read_ttl(path, tasks, seq_len=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert t1_seqs.shape == (3000, 100) and len(data[1].users) == 1500
    block = BLOCK_ROWS * 100 * 4
    assert peak < 2 * t1_seqs.nbytes + block + 2**20
