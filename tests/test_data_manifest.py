"""Manifest round trips, URL joining and the errors of ``Manifest.load``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conure_dist.data.manifest import Manifest, manifest_exists
from conure_dist.fs import join
from data_tools.shards import TaskData, write_dataset
from data_tools.split import split_indices


def tiny_tasks() -> tuple[np.ndarray, list[TaskData]]:
    """20 users, L=4, items 1..5; one item task (3 items) and one class task (2 classes)."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 5, size=20)
    t1 = rng.integers(1, 6, size=(20, 4)).astype(np.int32)
    t1[np.arange(4)[None, :] < (4 - lengths)[:, None]] = 0
    users = np.arange(20, dtype=np.int64)
    item_users = np.repeat(users, 2)
    return t1, [
        TaskData("t1", "sequence", t1, users, None, num_items=6),
        TaskData("buy", "item", None, item_users, rng.integers(0, 3, size=40), num_items=3),
        TaskData(
            "sex",
            "class",
            None,
            users,
            rng.integers(0, 2, size=20),
            num_classes=2,
            class_names=["F", "M"],
        ),
    ]


def write_tiny(root: str, **kwargs: Any) -> Manifest:
    t1, tasks = tiny_tasks()
    return write_dataset(
        root,
        dataset="tiny",
        t1_seqs=t1,
        tasks=tasks,
        seed=3,
        source={"made": "by hand"},
        skipped_rows={"u.data: wrong field count": 2},
        **kwargs,
    )


def test_round_trip_local(tmp_path: Path) -> None:
    root = str(tmp_path / "data")
    assert not manifest_exists(root)
    written = write_tiny(root, instances_per_shard=7)
    assert manifest_exists(root)
    loaded = Manifest.load(root)
    assert loaded == written
    assert loaded.to_json() == written.to_json()
    assert [t.name for t in loaded.tasks] == ["t1", "buy", "sex"]
    assert [t.num_outputs for t in loaded.tasks] == [6, 3, 2]
    assert loaded.num_seq_items == 6
    assert loaded.skipped_rows == {"u.data: wrong field count": 2}
    assert loaded.split == {"train": 0.8, "valid": 0.05, "test": 0.15, "seed": 3}
    raw = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert "root" not in raw and raw["format"] == "conure-shards" and raw["version"] == 1
    # 40 buy instances -> 32/2/6; 32 train instances at <= 7 per shard -> 5 balanced shards.
    train = loaded.task("buy").splits["train"]
    assert train.num_instances == 32
    assert [s.num_instances for s in train.shards] == [7, 7, 6, 6, 6]
    assert [s.url for s in train.shards][:2] == ["buy/train-000000.tar", "buy/train-000001.tar"]
    for shard in train.shards:
        assert shard.num_bytes == os.path.getsize(tmp_path / "data" / shard.url)
    assert not [p for p in os.listdir(tmp_path / "data") if p.endswith(".tmp")]


def test_train_counts(tmp_path: Path) -> None:
    manifest = write_tiny(str(tmp_path))
    t1, tasks = tiny_tasks()
    seq_train = split_indices(20, seed=3, task_index=0)["train"]
    expected = np.bincount(t1[seq_train, 1:].ravel(), minlength=6)
    expected[0] = 0
    np.testing.assert_array_equal(manifest.load_train_counts("t1"), expected)
    buy_train = split_indices(40, seed=3, task_index=1)["train"]
    np.testing.assert_array_equal(
        manifest.load_train_counts("buy"), np.bincount(tasks[1].targets[buy_train], minlength=3)
    )
    counts = manifest.load_train_counts("sex")
    assert counts.dtype == np.int64 and counts.sum() == 16


def test_train_counts_are_checked_against_their_sha256_and_signs(tmp_path: Path) -> None:
    """One flipped byte of a counts file, or a negative count, is an error naming the file."""
    import hashlib

    from conure_dist.errors import UserError

    write_tiny(str(tmp_path))
    path = tmp_path / "buy" / "train_counts.npy"
    manifest = Manifest.load(str(tmp_path))
    assert manifest.task("buy").train_counts_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"^{path} does not match its sha256 in {tmp_path / 'manifest.json'}"):
        manifest.load_train_counts("buy")
    # A negative count, with the checksum made to match (or a manifest from before checksums).
    np.save(path, np.array([3, -2, 5], dtype=np.int64))
    raw = json.loads((tmp_path / "manifest.json").read_text())
    buy = next(t for t in raw["tasks"] if t["name"] == "buy")
    buy["train_counts_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=f"^{path}: negative count -2 for output 1"):
        Manifest.load(str(tmp_path)).load_train_counts("buy")


def test_memory_filesystem_round_trip() -> None:
    root = "memory://conure-test/manifest-roundtrip"
    written = write_tiny(root)
    assert manifest_exists(root)
    loaded = Manifest.load(root)
    assert loaded == written
    assert loaded.shard_urls("t1", "train") == [f"{root}/t1/train-000000.tar"]


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("memory://", "memory://t1/train_counts.npy"),
        ("memory://a", "memory://a/t1/train_counts.npy"),
        ("s3://bucket", "s3://bucket/t1/train_counts.npy"),
        ("s3://bucket/", "s3://bucket/t1/train_counts.npy"),
        ("s3://bucket/prefix", "s3://bucket/prefix/t1/train_counts.npy"),
        ("s3://bucket/prefix/", "s3://bucket/prefix/t1/train_counts.npy"),
        ("file:///", "file:///t1/train_counts.npy"),
        ("/tmp/x", "/tmp/x/t1/train_counts.npy"),
        ("/tmp/x/", "/tmp/x/t1/train_counts.npy"),
        ("a/b", "a/b/t1/train_counts.npy"),
        ("", "t1/train_counts.npy"),
    ],
)
def test_join(root: str, expected: str) -> None:
    assert join(root, "t1/train_counts.npy") == expected
    assert join(root, "t1", "train_counts.npy") == expected
    assert join(root, "t1//", "train_counts.npy") == expected
    assert join(root) == root


@pytest.mark.parametrize("part", ["/abs/x", "s3://other/x", "memory://y"])
def test_join_refuses_parts_that_are_not_relative(part: str) -> None:
    for root in ("memory://", "s3://bucket", "/tmp/x", "a/b"):
        with pytest.raises(ValueError, match="must be relative"):
            join(root, part)


def test_shard_urls_are_absolute(tmp_path: Path) -> None:
    manifest = write_tiny(str(tmp_path), instances_per_shard=5)
    urls = manifest.shard_urls("buy", "train")
    assert len(urls) == 7
    assert all(os.path.isabs(u) and os.path.exists(u) for u in urls)
    s3 = Manifest(
        "s3://bucket/runs/data",
        manifest.dataset,
        manifest.seq_len,
        manifest.split,
        manifest.source,
        manifest.skipped_rows,
        manifest.tasks,
    )
    assert s3.shard_urls("buy", "valid") == ["s3://bucket/runs/data/buy/valid-000000.tar"]


def test_task_lookup_error_lists_names(tmp_path: Path) -> None:
    manifest = write_tiny(str(tmp_path))
    with pytest.raises(ValueError, match="no task 'nope'.*available: t1, buy, sex"):
        manifest.task("nope")
    with pytest.raises(ValueError, match="no split 'dev'"):
        manifest.shard_urls("t1", "dev")


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no manifest.json under {tmp_path}"):
        Manifest.load(str(tmp_path))


def test_bad_json(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json: invalid JSON"):
        Manifest.load(str(tmp_path))


def _edit(raw: dict[str, Any], change: str) -> None:
    tasks = raw["tasks"]
    if change == "drop_sha":
        del tasks[1]["splits"]["train"]["shards"][0]["sha256"]
    elif change == "bad_kind":
        tasks[2]["kind"] = "ranking"
    elif change == "sequence_not_first":
        tasks[0], tasks[1] = tasks[1], tasks[0]
    elif change == "two_sequences":
        tasks[1]["kind"] = "sequence"
    elif change == "count_mismatch":
        tasks[1]["splits"]["test"]["num_instances"] += 1
    elif change == "wrong_type":
        raw["seq_len"] = "20"
    elif change == "bool_count":
        tasks[2]["num_classes"] = True
    elif change == "class_names":
        tasks[2]["class_names"] = ["F"]
    elif change == "version":
        raw["version"] = 2
    elif change == "duplicate_name":
        tasks[2]["name"] = "buy"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop_sha", r"key 'tasks\[1\]\.splits\.train\.shards\[0\]\.sha256': missing"),
        ("bad_kind", r"key 'tasks\[2\]\.kind': unknown kind 'ranking'"),
        (
            "sequence_not_first",
            r"key 'tasks': need exactly one 'sequence' task and it must be first.*\[1\]",
        ),
        ("two_sequences", r"key 'tasks': need exactly one 'sequence' task.*\[0, 1\]"),
        (
            "count_mismatch",
            r"key 'tasks\[1\]\.splits\.test\.num_instances': is 7 but its shards hold 6",
        ),
        ("wrong_type", r"key 'seq_len': expected int, got str"),
        ("bool_count", r"key 'tasks\[2\]\.num_classes': expected int, got bool"),
        ("class_names", r"key 'tasks\[2\]\.class_names': has 1 names for num_classes=2"),
        ("version", r"key 'version': this reader knows version 1, got 2"),
        ("duplicate_name", r"duplicate task names \['buy'\]"),
    ],
)
def test_invalid_manifest_names_key_and_file(tmp_path: Path, change: str, message: str) -> None:
    write_tiny(str(tmp_path))
    path = tmp_path / "manifest.json"
    raw = json.loads(path.read_text())
    _edit(raw, change)
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message) as info:
        Manifest.load(str(tmp_path))
    assert str(path) in str(info.value)


def test_bad_train_counts_file(tmp_path: Path) -> None:
    """A manifest written before counts were checksummed still checks the file's shape."""
    write_tiny(str(tmp_path))
    raw = json.loads((tmp_path / "manifest.json").read_text())
    for task in raw["tasks"]:
        del task["train_counts_sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    np.save(tmp_path / "buy" / "train_counts.npy", np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match=r"train_counts\.npy: expected int64 array of shape \(3,\)"):
        Manifest.load(str(tmp_path)).load_train_counts("buy")


def test_raw_ids_round_trip_and_bad_files_are_named(tmp_path: Path) -> None:
    t1, tasks = tiny_tasks()
    tasks[1].vocab = ["m10", "m20", "m30"]
    manifest = write_dataset(
        str(tmp_path),
        dataset="tiny",
        t1_seqs=t1,
        tasks=tasks,
        seed=3,
        source={},
        skipped_rows={},
        user_ids=[f"u{i}" for i in range(20)],
    )
    loaded = Manifest.load(str(tmp_path))
    assert loaded == manifest and loaded.users == "users.json" and loaded.task("buy").vocab == "buy/vocab.json"
    assert loaded.load_vocab("buy") == ["m10", "m20", "m30"] and loaded.load_vocab("t1") is None
    assert loaded.load_users()[:2] == ["u0", "u1"]
    (tmp_path / "buy" / "vocab.json").write_text('["m10"]')
    with pytest.raises(ValueError, match=r"buy/vocab\.json: expected a list of 3 raw ids"):
        loaded.load_vocab("buy")
    (tmp_path / "users.json").unlink()
    with pytest.raises(ValueError, match=r"users\.json is missing \(listed in .*manifest\.json\)"):
        loaded.load_users()
    tasks[1].vocab = ["m10"]
    with pytest.raises(ValueError, match="task 'buy': vocab has 1 ids for num_items=3"):
        write_dataset(
            str(tmp_path / "again"), dataset="tiny", t1_seqs=t1, tasks=tasks, seed=3, source={}, skipped_rows={}
        )


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    manifest = write_tiny(str(tmp_path))
    changed = Manifest(
        manifest.root,
        "renamed",
        manifest.seq_len,
        manifest.split,
        manifest.source,
        manifest.skipped_rows,
        manifest.tasks,
    )
    changed.save()
    assert Manifest.load(str(tmp_path)).dataset == "renamed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buy", "manifest.json", "sex", "t1"]


def test_writer_rejects_inconsistent_tasks(tmp_path: Path) -> None:
    t1, tasks = tiny_tasks()
    bad_target = TaskData("buy", "item", None, tasks[1].users, tasks[1].targets + 1, num_items=3)
    with pytest.raises(ValueError, match=r"task 'buy': targets must lie in 0\.\.2, got 1\.\.3"):
        write_dataset(
            str(tmp_path),
            dataset="x",
            t1_seqs=t1,
            tasks=[tasks[0], bad_target],
            seed=0,
            source={},
            skipped_rows={},
        )
    right_padded = t1.copy()
    right_padded[0] = [1, 2, 0, 0]
    seq_task = TaskData("t1", "sequence", right_padded, tasks[0].users, None, num_items=6)
    with pytest.raises(ValueError, match="last position"):
        write_dataset(
            str(tmp_path),
            dataset="x",
            t1_seqs=right_padded,
            tasks=[seq_task],
            seed=0,
            source={},
            skipped_rows={},
        )
    with pytest.raises(ValueError, match="must be first"):
        write_dataset(
            str(tmp_path),
            dataset="x",
            t1_seqs=t1,
            tasks=[tasks[1], tasks[0]],
            seed=0,
            source={},
            skipped_rows={},
        )
    assert not manifest_exists(str(tmp_path))
