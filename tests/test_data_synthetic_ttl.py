"""The TTL-scale synthetic generator and the streaming shard writer, on a small spec."""

from __future__ import annotations

import numpy as np
import torch
from helpers import shards_digest

from conure_dist.data.manifest import Manifest
from conure_dist.data.stream import iter_batches
from data_tools.synthetic_ttl import TTLSpec, write_synthetic_ttl

SPEC = TTLSpec(num_users=3000, num_items=4000, seq_len=12, num_genres=40, click_items=300, thumbsup_items=200)


def read_all(manifest, task):
    out = {}
    for split in ("train", "valid", "test"):
        batches = list(iter_batches(manifest, task, split, 512, shuffle=False, seed=0, epoch=0))
        out[split] = tuple(
            torch.cat([getattr(b, f) for b in batches]).numpy()
            if batches and getattr(batches[0], f) is not None
            else None
            for f in ("seq", "target", "user")
        )
    return out


def test_streamed_dataset_is_complete_and_consistent(tmp_path):
    manifest = write_synthetic_ttl(str(tmp_path / "a"), SPEC, chunk_users=700, instances_per_shard=900)
    assert [t.name for t in manifest.tasks] == ["t1", "click", "thumbsup", "age", "gender", "life_status"]
    assert manifest.num_seq_items == 4001 and manifest.seq_len == 12
    t1 = read_all(manifest, "t1")
    users = np.concatenate([t1[s][2] for s in t1])
    assert sorted(users.tolist()) == list(range(3000))  # every user once, across the splits
    train = t1["train"]
    assert abs(len(train[2]) / 3000 - 0.8) < 0.03 and len(manifest.task("t1").splits["train"].shards) >= 3
    seqs = np.concatenate([t1[s][0] for s in t1])
    assert seqs.max() <= 4000 and (seqs[:, -1] > 0).all()
    # Left padding only: once an item appears, every later position holds one.
    assert not (np.diff((seqs > 0).astype(int), axis=1) < 0).any()
    counts = manifest.load_train_counts("t1")
    assert counts[0] == 0 and counts.sum() == (train[0][:, 1:] > 0).sum()
    click = read_all(manifest, "click")
    np.testing.assert_array_equal(manifest.load_train_counts("click"), np.bincount(click["train"][1], minlength=300))
    # Every item/class instance reads its user's T1 sequence.
    by_user = dict(zip(users.tolist(), seqs, strict=True))
    for seq, _, user in (click["test"],):
        assert all(np.array_equal(s, by_user[u]) for s, u in zip(seq, user.tolist(), strict=True))
    age = read_all(manifest, "age")
    assert manifest.task("age").num_classes == 8 and set(np.concatenate([age[s][1] for s in age])) <= set(range(8))


def test_same_seed_same_shards(tmp_path):
    a = write_synthetic_ttl(str(tmp_path / "a"), SPEC, chunk_users=1000)
    b = write_synthetic_ttl(str(tmp_path / "b"), SPEC, chunk_users=1000)
    shas = [[sh.sha256 for s in t.splits.values() for sh in s.shards] for m in (a, b) for t in m.tasks]
    assert shas[: len(a.tasks)] == shas[len(a.tasks) :]
    assert Manifest.load(str(tmp_path / "a")).source["spec"]["num_items"] == 4000


def test_streaming_writer_caps_shards_and_checks_ids(tmp_path):
    import pytest

    from data_tools.shard_streaming import StreamingDatasetWriter, StreamTask

    tasks = [StreamTask("t1", "sequence", 50), StreamTask("click", "item", 7)]
    writer = StreamingDatasetWriter(str(tmp_path), dataset="x", tasks=tasks, seq_len=4, seed=0, instances_per_shard=100)
    seqs = np.tile(np.arange(1, 5, dtype=np.int32), (1000, 1))
    writer.add("t1", seqs, np.arange(1000))  # one chunk far larger than a shard
    with pytest.raises(ValueError, match=r"task 'click': targets must lie in 0\.\.6, got 0\.\.7"):
        writer.add("click", seqs[:3], np.arange(3), np.array([0, 7, 1]))
    with pytest.raises(ValueError, match=r"task 't1': item ids must lie in 0\.\.49"):
        writer.add("t1", seqs[:2] + 60, np.arange(2))
    writer.add("click", seqs[:3], np.arange(3), np.array([0, 6, 1]))
    manifest = writer.close({})
    shards = [sh for s in manifest.task("t1").splits.values() for sh in s.shards]
    assert sum(sh.num_instances for sh in shards) == 1000 and max(sh.num_instances for sh in shards) <= 100
    assert manifest.load_train_counts("t1")[1] == 0 and manifest.load_train_counts("t1")[2:5].sum() > 0


def test_streaming_writer_writes_full_shards_until_the_last(tmp_path):
    """Chunks of 150 instances into shards of 100: full shards, only each split's last one short."""
    from data_tools.shard_streaming import StreamingDatasetWriter, StreamTask

    tasks = [StreamTask("t1", "sequence", 50)]
    writer = StreamingDatasetWriter(
        str(tmp_path), dataset="x", tasks=tasks, seq_len=4, seed=0, split=(0.9, 0.05, 0.05), instances_per_shard=100
    )
    seqs = np.tile(np.arange(1, 5, dtype=np.int32), (150, 1))
    for chunk in range(8):
        writer.add("t1", seqs, np.arange(150 * chunk, 150 * (chunk + 1)))
    manifest = writer.close({})
    for split in manifest.task("t1").splits.values():
        sizes = [sh.num_instances for sh in split.shards]
        assert sizes and all(size == 100 for size in sizes[:-1]) and 0 < sizes[-1] <= 100, sizes
    assert sum(s.num_instances for s in manifest.task("t1").splits.values()) == 1200
    users = np.concatenate([read_all(manifest, "t1")[s][2] for s in ("train", "valid", "test")])
    assert sorted(users.tolist()) == list(range(1200))


def test_bad_writer_arguments_leave_an_existing_root_alone(tmp_path):
    import pytest

    from data_tools.shard_streaming import StreamingDatasetWriter, StreamTask
    from data_tools.shards import TaskData, write_dataset

    root = tmp_path / "root"
    manifest = write_synthetic_ttl(str(root), SPEC, chunk_users=1000)
    tasks = [StreamTask("t1", "sequence", 50)]
    with pytest.raises(ValueError, match="instances_per_shard >= 1"):
        StreamingDatasetWriter(str(root), dataset="x", tasks=tasks, seq_len=4, seed=0, instances_per_shard=0)
    t1 = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.int32)
    bad_vocab = [TaskData("t1", "sequence", t1, np.arange(2), None, num_items=6, vocab=["", "a"])]
    with pytest.raises(ValueError, match="task 't1': vocab has 2 ids for num_items=6"):
        write_dataset(str(root), dataset="x", t1_seqs=t1, tasks=bad_vocab, seed=0, source={}, skipped_rows={})
    assert Manifest.load(str(root)) == manifest  # the old dataset is still there, whole


def test_ttl_spec_states_the_bounds():
    import pytest

    with pytest.raises(ValueError, match=r"click_items=10: must be >= num_genres = 40; seq_len=1: must be >= 2"):
        TTLSpec(num_users=10, num_items=100, seq_len=1, num_genres=40, click_items=10, thumbsup_items=50)


# sha256 over the shards' sha256s (manifest order) of SPEC in chunks of 1000: the default
# relation's data, fixed.
DEFAULT_SHARDS_DIGEST = "71d9c32b651550b3219fa2ab3ad5835b2881a535daf74569dd90138bd47e844d"


def _items_by_user(manifest, task):
    """user -> set of target items over every split, and the (user, item) instances."""
    data = read_all(manifest, task)
    users = np.concatenate([data[s][2] for s in data])
    items = np.concatenate([data[s][1] for s in data])
    sets = {}
    for user, item in zip(users.tolist(), items.tolist(), strict=True):
        sets.setdefault(user, set()).add(item)
    return sets, list(zip(users.tolist(), items.tolist(), strict=True))


def test_default_relation_keeps_its_data(tmp_path):
    assert TTLSpec().relation == "shared_genre"
    manifest = write_synthetic_ttl(str(tmp_path / "a"), SPEC, chunk_users=1000)
    assert shards_digest(manifest) == DEFAULT_SHARDS_DIGEST
    assert manifest.task("thumbsup").num_outputs == 200


def test_related_thumbsup_is_a_subset_of_clicks_and_independent_is_not(tmp_path):
    from dataclasses import replace

    share = {}
    for relation in ("related", "independent"):
        manifest = write_synthetic_ttl(str(tmp_path / relation), replace(SPEC, relation=relation), chunk_users=1000)
        assert manifest.task("thumbsup").num_outputs == manifest.task("click").num_outputs == 300
        clicks, _ = _items_by_user(manifest, "click")
        _, thumbs = _items_by_user(manifest, "thumbsup")
        assert 2500 < len(thumbs) < 3500  # about half of 2 clicks per user
        share[relation] = float(np.mean([item in clicks[user] for user, item in thumbs]))
        share[f"{relation}_users"] = sorted({user for user, _ in thumbs})
    assert share["related"] == 1.0
    assert share["independent"] < 0.2  # only where the second genre's draw hits a clicked item
    assert share["related_users"] == share["independent_users"]  # the same thumbs-up users
    again = write_synthetic_ttl(str(tmp_path / "again"), replace(SPEC, relation="related"), chunk_users=1000)
    assert shards_digest(again) == shards_digest(Manifest.load(str(tmp_path / "related")))


def test_relation_flag_of_the_command_line(tmp_path):
    from data_tools.synthetic_ttl import main

    manifest = main(
        ["--out", str(tmp_path / "cli"), "--num-users", "300", "--num-items", "2000", "--relation", "related"]
    )
    assert manifest.source["spec"]["relation"] == "related" and manifest.task("thumbsup").num_outputs == 18_000
    import pytest

    with pytest.raises(
        ValueError, match=r"relation=sideways: must be one of \['shared_genre', 'related', 'independent'\]"
    ):
        TTLSpec(relation="sideways")
