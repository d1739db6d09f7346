"""The leave-one-out split: exact splits on tiny data, for each task kind and end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conure_dist.data.manifest import Manifest
from conure_dist.data.stream import iter_batches
from data_tools.movielens import write_movielens
from data_tools.split import leave_one_out_indices, sequence_windows, split_sizes, stratified_indices
from data_tools.synthetic import SyntheticSpec, write_synthetic
from tests.test_data_movielens import write_files


def test_sequence_windows_hold_out_the_last_two_items_and_cover_the_rest_once() -> None:
    parts = sequence_windows(np.array([1, 2, 3, 4, 5, 6, 7]), seq_len=4)
    np.testing.assert_array_equal(parts["test"], [[4, 5, 6, 7]])
    np.testing.assert_array_equal(parts["valid"], [[3, 4, 5, 6]])
    # Items 1..5 are training; windows overlap by one item, so 2..5 are each a target once.
    np.testing.assert_array_equal(parts["train"], [[0, 0, 1, 2], [2, 3, 4, 5]])
    targets = np.concatenate([w[w > 0][1:] for w in parts["train"]])
    np.testing.assert_array_equal(np.sort(targets), [2, 3, 4, 5])


def test_sequence_windows_of_a_short_history_are_training_only() -> None:
    parts = sequence_windows(np.array([8, 9]), seq_len=4)
    np.testing.assert_array_equal(parts["train"], [[0, 0, 8, 9]])
    assert parts["valid"].shape == (0, 4) and parts["test"].shape == (0, 4)
    three = sequence_windows(np.array([7, 8, 9]), seq_len=4)
    np.testing.assert_array_equal(three["train"], [[0, 0, 0, 7]])
    np.testing.assert_array_equal(three["test"], [[0, 7, 8, 9]])


def test_leave_one_out_indices_order_each_user_by_time() -> None:
    users = np.array([0, 0, 1, 0, 1, 1, 0, 2, 2])
    times = np.array([5, 1, 3, 2, 1, 2, 9, 4, 4])
    parts = leave_one_out_indices(users, times)
    # user 0 in time: 1, 3, 0, 6; user 1: 4, 5, 2; user 2 has two instances: training only.
    assert parts["test"].tolist() == [2, 6]
    assert parts["valid"].tolist() == [0, 5]
    assert parts["train"].tolist() == [1, 3, 4, 7, 8]
    # Without times (and on ties) the instance order decides.
    untimed = leave_one_out_indices(users)
    assert untimed["test"].tolist() == [5, 6] and untimed["valid"].tolist() == [3, 4]


def test_stratified_indices_keep_every_class_mix_and_are_deterministic() -> None:
    labels = np.array([0] * 20 + [1] * 7 + [2] * 3)
    fractions = (0.6, 0.2, 0.2)
    parts = stratified_indices(labels, seed=3, task_index=2, fractions=fractions)
    for label, count in ((0, 20), (1, 7), (2, 3)):
        sizes = [int((labels[parts[name]] == label).sum()) for name in ("train", "valid", "test")]
        assert sizes == split_sizes(count, fractions)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(30))
    again = stratified_indices(labels, seed=3, task_index=2, fractions=fractions)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = stratified_indices(labels, seed=4, task_index=2, fractions=fractions)
    assert not np.array_equal(parts["train"], other["train"])


def _split_rows(manifest: Manifest, task: str, split: str) -> list[tuple[int, tuple[int, ...]]]:
    rows = []
    for batch in iter_batches(manifest, task, split, 64, shuffle=False, seed=0, epoch=0):
        rows += [(int(u), tuple(s.tolist())) for u, s in zip(batch.user, batch.seq, strict=True)]
    return sorted(rows)


def test_movielens_all_ratings_leave_one_out_shards(tmp_path: Path) -> None:
    src = write_files(tmp_path / "raw")
    manifest = write_movielens(
        str(src), str(tmp_path / "out"), seq_len=3, t1_ratings="all", protocol="leave_one_out", split=(0.5, 0.25, 0.25)
    )
    assert [t.name for t in manifest.tasks] == ["t1", "gender", "age", "occupation"]  # no like tasks
    # Every rating is T1: raw items 10..70 -> ids 1..7. User 1 in time: 60 20 50 30 40 10; user 2:
    # 30 20 70; user 3: 20 50 (too short to hold anything out).
    assert _split_rows(manifest, "t1", "test") == [(0, (3, 4, 1)), (1, (3, 2, 7))]
    assert _split_rows(manifest, "t1", "valid") == [(0, (5, 3, 4)), (1, (0, 3, 2))]
    assert _split_rows(manifest, "t1", "train") == [(0, (0, 6, 2)), (0, (2, 5, 3)), (1, (0, 0, 3)), (2, (0, 2, 5))]
    # Popularity counts training items once each (positions 1.. of a window; the shared item of
    # two windows is first in the later one): user 1's 6 2 5 3, user 2's 3, user 3's 2 5.
    counts = manifest.load_train_counts("t1")
    assert {i: int(c) for i, c in enumerate(counts) if c} == {2: 2, 3: 2, 5: 2, 6: 1}
    loaded = Manifest.load(str(tmp_path / "out"))
    assert loaded.split["protocol"] == "leave_one_out"
    assert loaded.split["users_evaluated"]["t1"] == 2
    assert manifest.source["recipe"]["t1"] == "most recent ratings, all of them"


def test_leave_one_out_is_deterministic_and_the_paper_split_records_no_protocol(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_users=40, num_items=30, seq_len=6)
    a = write_synthetic(str(tmp_path / "a"), spec, protocol="leave_one_out")
    b = write_synthetic(str(tmp_path / "b"), spec, protocol="leave_one_out")
    assert [s.sha256 for t in a.tasks for p in t.splits.values() for s in p.shards] == [
        s.sha256 for t in b.tasks for p in t.splits.values() for s in p.shards
    ]
    # Every user's T1 row is evaluated once on each of valid and test.
    assert a.tasks[0].splits["test"].num_instances == a.tasks[0].splits["valid"].num_instances == 40
    assert "protocol" not in write_synthetic(str(tmp_path / "c"), spec).split


def test_shards_of_another_protocol_or_t1_are_refused_by_key(tmp_path: Path) -> None:
    import pytest

    from conure_dist.config import load_config
    from conure_dist.data.dataset import open_dataset
    from data_tools.prepare import write_shards

    src = write_files(tmp_path / "raw")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        f"data: {{root: {tmp_path / 'out'}, source: movielens, source_dir: {src}, seq_len: 3, "
        "t1_ratings: all, split_protocol: leave_one_out, split: [0.5, 0.25, 0.25]}\n"
        "tasks:\n  - {name: t1}\n"
    )
    cfg = load_config(cfg_path)
    write_shards("movielens", cfg.data)
    assert open_dataset(cfg)[0].split["protocol"] == "leave_one_out"
    cfg.data.split_protocol = "random"
    with pytest.raises(ValueError, match=r"data.split_protocol=random \(the shards have leave_one_out\)"):
        open_dataset(cfg)
    cfg.data.split_protocol, cfg.data.t1_ratings = "leave_one_out", "below_4"
    with pytest.raises(ValueError, match=r"data.t1_ratings=below_4 \(the shards have all\)"):
        open_dataset(cfg)
