"""The shard reader: exact order, shuffling, rank partitions, resuming (bad shards and
file:// / S3 roots: ``test_data_stream_shards.py``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from conure_dist.data.manifest import Manifest
from conure_dist.data.stream import Batch, iter_batches, num_steps_per_epoch
from data_tools.shards import TaskData
from data_tools.split import split_indices
from data_tools.synthetic import SyntheticSpec, generate, write_synthetic

SPEC = SyntheticSpec(num_users=600, num_items=80, seq_len=6, seed=3)
SPLIT_SEED = 1
TASK_NAMES = ["t1", "click", "like", "gender", "age"]


def write_many(root: str) -> Manifest:
    """click/train: 1233 instances in 13 shards of <= 97, 16 instances per tar sample."""
    return write_synthetic(root, SPEC, split_seed=SPLIT_SEED, instances_per_shard=97, records_per_sample=16)


@pytest.fixture(scope="module")
def generated() -> tuple[np.ndarray, list[TaskData]]:
    t1, tasks, _ = generate(SPEC)
    return t1, tasks


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return write_many(str(tmp_path_factory.mktemp("many")))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """One shard per split."""
    root = tmp_path_factory.mktemp("single")
    return write_synthetic(str(root), SPEC, split_seed=SPLIT_SEED, records_per_sample=32)


def expected_instances(
    generated: tuple[np.ndarray, list[TaskData]], task: str, split: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """(users, targets) of (task, split) in the order the writer stored them."""
    index = TASK_NAMES.index(task)
    data = generated[1][index]
    order = split_indices(data.num_instances, seed=SPLIT_SEED, task_index=index)[split]
    return data.users[order], None if data.targets is None else data.targets[order]


def collect(
    batches: Iterator[Batch],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[int]]:
    got = list(batches)
    users = np.concatenate([b.user.numpy() for b in got]) if got else np.zeros(0, dtype=np.int64)
    targets = None if not got or got[0].target is None else np.concatenate([b.target.numpy() for b in got])
    seqs = np.concatenate([b.seq.numpy() for b in got]) if got else np.zeros((0, SPEC.seq_len), dtype=np.int64)
    return users, targets, seqs, [len(b.user) for b in got]


def pairs(users: np.ndarray, targets: np.ndarray | None) -> list[tuple[int, int]]:
    """The instances as a sorted multiset, for order-free comparisons."""
    t = targets if targets is not None else np.full_like(users, -1)
    return sorted(zip(users.tolist(), t.tolist(), strict=True))


@pytest.mark.parametrize("task", ["t1", "click", "gender"])
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("layout", ["many", "single"])
def test_unshuffled_is_manifest_order(
    request: pytest.FixtureRequest, generated, layout: str, task: str, split: str
) -> None:
    manifest: Manifest = request.getfixturevalue(layout)
    users, targets, seqs, sizes = collect(iter_batches(manifest, task, split, 50, shuffle=False, seed=0, epoch=0))
    want_users, want_targets = expected_instances(generated, task, split)
    np.testing.assert_array_equal(users, want_users)
    if task == "t1":
        assert targets is None
    else:
        np.testing.assert_array_equal(targets, want_targets)
    np.testing.assert_array_equal(seqs, generated[0][users])
    n = len(want_users)
    assert sizes == [50] * (n // 50) + ([n % 50] if n % 50 else [])


def test_batch_dtypes(many: Manifest) -> None:
    batch = next(iter_batches(many, "click", "train", 8, shuffle=True, seed=0, epoch=0))
    assert batch.seq.dtype == batch.target.dtype == batch.user.dtype == torch.int64
    assert tuple(batch.seq.shape) == (8, SPEC.seq_len) and tuple(batch.target.shape) == (8,)


def test_shuffle_is_deterministic_permutation(many: Manifest, generated) -> None:
    def run(seed: int, epoch: int, buffer: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
        users, targets, _, _ = collect(
            iter_batches(
                many,
                "click",
                "train",
                64,
                shuffle=True,
                seed=seed,
                epoch=epoch,
                shuffle_buffer=buffer,
            )
        )
        return users, targets

    users, targets = run(5, 0)
    want_users, want_targets = expected_instances(generated, "click", "train")
    assert pairs(users, targets) == pairs(want_users, want_targets)
    again = run(5, 0)
    np.testing.assert_array_equal(again[0], users)
    np.testing.assert_array_equal(again[1], targets)
    for other in (run(5, 1), run(6, 0), run(5, 0, buffer=100)):
        assert pairs(*other) == pairs(users, targets)
        assert (other[0] != users).mean() > 0.9
    # Stored order is already random, so compare positions: few instances stay where they were.
    assert (users != want_users).mean() > 0.9


@pytest.mark.parametrize("buffer", [0, 5, 16, 17, 5000])
def test_any_buffer_size_yields_a_permutation(many: Manifest, generated, buffer: int) -> None:
    users, targets, _, sizes = collect(
        iter_batches(many, "click", "train", 64, shuffle=True, seed=2, epoch=0, shuffle_buffer=buffer)
    )
    assert pairs(users, targets) == pairs(*expected_instances(generated, "click", "train"))
    assert sizes[:-1] == [64] * (len(sizes) - 1)


@pytest.mark.parametrize("world_size", [2, 3, 5])
@pytest.mark.parametrize("partition", ["auto", "stride", "range"])
@pytest.mark.parametrize("layout", ["many", "single"])
def test_sharded_eval_covers_split_once(
    request: pytest.FixtureRequest, generated, layout: str, partition: str, world_size: int
) -> None:
    manifest: Manifest = request.getfixturevalue(layout)
    parts = [
        collect(
            iter_batches(
                manifest,
                "click",
                "test",
                16,
                shuffle=False,
                seed=0,
                epoch=0,
                rank=r,
                world_size=world_size,
                partition=partition,
            )
        )
        for r in range(world_size)
    ]
    users = np.concatenate([p[0] for p in parts])
    targets = np.concatenate([p[1] for p in parts])
    assert pairs(users, targets) == pairs(*expected_instances(generated, "click", "test"))
    counts = [len(p[0]) for p in parts]
    assert max(counts) - min(counts) <= 1
    want_users, _ = expected_instances(generated, "click", "test")
    num_shards = len(manifest.task("click").splits["test"].shards)
    if partition == "stride" or (partition == "auto" and num_shards < world_size):
        # Rank r holds global positions r, r+W, ... of the manifest order.
        for rank, part in enumerate(parts):
            np.testing.assert_array_equal(part[0], want_users[rank::world_size])
    else:
        # Range: contiguous slices, so the ranks in order give back the manifest order.
        np.testing.assert_array_equal(users, want_users)


@pytest.mark.parametrize("limit", [1, 130, 10_000])
@pytest.mark.parametrize("partition", ["range", "stride"])
def test_max_instances_is_the_first_of_the_split_on_any_world_size(
    many: Manifest, generated, partition: str, limit: int
) -> None:
    """``train.eval_max_users``: the same instances, the first ones in stored order, whoever reads them."""
    want_users, want_targets = expected_instances(generated, "click", "test")
    want = pairs(want_users[:limit], want_targets[:limit])
    unshuffled = {"shuffle": False, "seed": 0, "epoch": 0, "partition": partition, "max_instances": limit}
    for world_size in (1, 2, 3):
        parts = [
            collect(iter_batches(many, "click", "test", 16, rank=r, world_size=world_size, **unshuffled))
            for r in range(world_size)
        ]
        read = [p for p in parts if len(p[0])]  # a rank may get none of a small limit
        got = pairs(np.concatenate([p[0] for p in read]), np.concatenate([p[1] for p in read]))
        assert got == want, (partition, world_size)
    assert len(want) == min(limit, len(want_users))
    with pytest.raises(ValueError, match="max_instances"):
        iter_batches(many, "click", "test", 16, shuffle=False, seed=0, epoch=0, max_instances=0)


def test_stride_ranks_split_each_global_batch(single: Manifest) -> None:
    """With the stride partition, the ranks' step-s batches together are the one-process batch s."""
    world_size, per_rank = 3, 8
    steps = num_steps_per_epoch(single, "click", "train", world_size * per_rank) + 4  # forces a second pass
    reference = list(
        iter_batches(
            single,
            "click",
            "train",
            world_size * per_rank,
            shuffle=True,
            seed=9,
            epoch=2,
            num_steps=steps,
            shuffle_buffer=300,
        )
    )
    ranks = [
        list(
            iter_batches(
                single,
                "click",
                "train",
                per_rank,
                shuffle=True,
                seed=9,
                epoch=2,
                rank=r,
                world_size=world_size,
                num_steps=steps,
                shuffle_buffer=300,
            )
        )
        for r in range(world_size)
    ]
    assert len(reference) == steps and all(len(r) == steps for r in ranks)
    for step in range(steps):
        merged_u = np.concatenate([r[step].user.numpy() for r in ranks])
        merged_t = np.concatenate([r[step].target.numpy() for r in ranks])
        assert pairs(merged_u, merged_t) == pairs(reference[step].user.numpy(), reference[step].target.numpy())


@pytest.mark.parametrize("layout", ["many", "single"])
def test_num_steps_is_exact_on_every_rank(request: pytest.FixtureRequest, layout: str) -> None:
    manifest: Manifest = request.getfixturevalue(layout)
    world_size, per_rank = 3, 16
    epoch_steps = num_steps_per_epoch(manifest, "t1", "train", world_size * per_rank)
    assert epoch_steps == 480 // 48
    steps = 2 * epoch_steps + 3
    ranks = [
        collect(
            iter_batches(
                manifest,
                "t1",
                "train",
                per_rank,
                shuffle=True,
                seed=1,
                epoch=0,
                rank=r,
                world_size=world_size,
                num_steps=steps,
                drop_last=True,
            )
        )
        for r in range(world_size)
    ]
    for _, _, _, sizes in ranks:
        assert sizes == [per_rank] * steps
    # Within the first epoch's steps no user (t1 instances are unique per user) is seen twice.
    first = np.concatenate([users[: epoch_steps * per_rank] for users, _, _, _ in ranks])
    assert len(np.unique(first)) == len(first) == epoch_steps * world_size * per_rank


def test_range_partition_refuses_more_ranks_than_instances(many: Manifest) -> None:
    """Some rank's range would be empty: a repeating stream over it would never yield a batch."""
    n = many.split_info("click", "valid").num_instances
    with pytest.raises(
        ValueError, match=f"click/valid has {n} instances for {n + 1} ranks: too few for data.partition=range"
    ):
        iter_batches(
            many,
            "click",
            "valid",
            1,
            shuffle=False,
            seed=0,
            epoch=0,
            rank=0,
            world_size=n + 1,
            num_steps=1,
            partition="range",
        )
    # stride serves the same ranks: every one of them gets its batch.
    for rank in (0, n):
        batches = list(
            iter_batches(
                many,
                "click",
                "valid",
                1,
                shuffle=False,
                seed=0,
                epoch=0,
                rank=rank,
                world_size=n + 1,
                num_steps=1,
                partition="stride",
            )
        )
        assert [len(b.user) for b in batches] == [1]


def test_ranks_cycle_when_their_part_runs_out(many: Manifest) -> None:
    """world_size larger than the data per rank: every rank still yields exactly num_steps batches."""
    ranks = [
        collect(
            iter_batches(
                many,
                "click",
                "valid",
                32,
                shuffle=True,
                seed=0,
                epoch=0,
                rank=r,
                world_size=4,
                num_steps=5,
            )
        )
        for r in range(4)
    ]
    assert all(sizes == [32] * 5 for _, _, _, sizes in ranks)
    # Before cycling, the ranks share one pass over the split: every instance exactly once.
    users, targets, _, _ = collect(iter_batches(many, "click", "valid", 1000, shuffle=False, seed=0, epoch=0))
    split = Counter(zip(users.tolist(), targets.tolist(), strict=True))
    n = sum(split.values())
    assert n < 4 * 5 * 32  # small enough that every rank cycles
    first_pass = Counter()
    for rank, (u, t, _, _) in enumerate(ranks):
        first_pass.update(list(zip(u.tolist(), t.tolist(), strict=True))[: len(range(rank, n, 4))])
    assert first_pass == split


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2)])
def test_start_step_resumes_mid_epoch(many: Manifest, shuffle: bool, rank: int, world_size: int) -> None:
    kwargs = dict(shuffle=shuffle, seed=4, epoch=1, rank=rank, world_size=world_size, shuffle_buffer=200)
    for num_steps in (None, 30):
        full = list(iter_batches(many, "click", "train", 20, num_steps=num_steps, **kwargs))
        for start in (0, 1, 7, len(full)):
            resumed = list(iter_batches(many, "click", "train", 20, num_steps=num_steps, start_step=start, **kwargs))
            assert len(resumed) == len(full) - start
            for a, b in zip(full[start:], resumed, strict=True):
                assert np.array_equal(a.user.numpy(), b.user.numpy()) and np.array_equal(a.seq.numpy(), b.seq.numpy())
                assert np.array_equal(a.target.numpy(), b.target.numpy())


def test_drop_last_and_steps_per_epoch(many: Manifest) -> None:
    n = many.task("click").splits["train"].num_instances
    assert n == 1233  # fixed by SPEC and SPLIT_SEED
    assert num_steps_per_epoch(many, "click", "train", 70) == 17
    assert num_steps_per_epoch(many, "click", "train", 70, drop_last=False) == 18
    _, _, _, sizes = collect(iter_batches(many, "click", "train", 70, shuffle=False, seed=0, epoch=0, drop_last=True))
    assert sizes == [70] * 17
    _, _, _, sizes = collect(iter_batches(many, "click", "train", 70, shuffle=True, seed=0, epoch=0))
    assert sizes == [70] * 17 + [43]


def test_argument_errors(many: Manifest) -> None:
    with pytest.raises(ValueError, match="rank"):
        iter_batches(many, "click", "train", 8, shuffle=False, seed=0, epoch=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_step"):
        iter_batches(many, "click", "train", 8, shuffle=False, seed=0, epoch=0, num_steps=3, start_step=4)
    with pytest.raises(ValueError, match="batch_size"):
        iter_batches(many, "click", "train", 0, shuffle=False, seed=0, epoch=0)
    with pytest.raises(ValueError, match="no task 'clicks'"):
        iter_batches(many, "clicks", "train", 8, shuffle=False, seed=0, epoch=0)
    with pytest.raises(ValueError, match="no split 'dev'"):
        iter_batches(many, "click", "dev", 8, shuffle=False, seed=0, epoch=0)
