"""The data fingerprint of a global batch: its ranks' parts add up to the one-process value
exactly when the batch, its order and its negatives are the same."""

import torch

from conure_dist.dist import DistInfo
from conure_dist.train.batches import batch_digest, format_digest

ONE = DistInfo(0, 1, 0, torch.device("cpu"), None)


def _ranks(world: int) -> list[DistInfo]:
    return [DistInfo(r, world, r, torch.device("cpu"), "gloo") for r in range(world)]


def _split(users, negatives, shared, step, world):
    """The global batch as the stride partition deals it out: rank r takes r, r+W, ..."""
    total = 0
    for dist in _ranks(world):
        mine = None if negatives is None else (negatives if shared else negatives[dist.rank :: world])
        total += int(batch_digest(users[dist.rank :: world], mine, shared, step, dist))
    return format_digest(total)


def test_rank_parts_add_up_to_the_one_process_fingerprint():
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, 10_000, (12,), generator=g)
    per_instance = torch.randint(1, 500, (12,), generator=g)
    shared = torch.randperm(499, generator=g)[:37] + 1
    for negatives, is_shared in ((None, False), (per_instance, False), (shared, True)):
        whole = format_digest(int(batch_digest(users, negatives, is_shared, 5, ONE)))
        for world in (2, 3, 4):
            assert _split(users, negatives, is_shared, 5, world) == whole, (world, is_shared)


def test_any_change_to_the_batch_changes_the_fingerprint():
    users = torch.arange(100, 112)
    negatives = torch.arange(1, 13)
    base = format_digest(int(batch_digest(users, negatives, False, 0, ONE)))
    swapped = users.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # same users, other order
    other_user = users.clone()
    other_user[3] += 1
    other_negative = negatives.clone()
    other_negative[7] += 1
    variants = [
        batch_digest(swapped, negatives, False, 0, ONE),
        batch_digest(other_user, negatives, False, 0, ONE),
        batch_digest(users, other_negative, False, 0, ONE),
        batch_digest(users, negatives, False, 1, ONE),
        batch_digest(users, None, False, 0, ONE),
    ]
    assert len({base, *(format_digest(int(v)) for v in variants)}) == 6
    # A rank that dealt the batch differently (range partition: contiguous halves) disagrees.
    halves = sum(int(batch_digest(part, None, False, 0, d)) for part, d in zip(users.chunk(2), _ranks(2), strict=True))
    assert format_digest(halves) != format_digest(int(batch_digest(users, None, False, 0, ONE)))


def _batches(n):
    from conure_dist.data.stream import Batch

    for i in range(n):
        yield Batch(torch.full((2, 3), i), torch.tensor([i, i]), torch.tensor([10 * i, 10 * i + 1]))


def test_prefetching_keeps_the_order_and_the_values():
    from conure_dist.train.batches import Prefetcher

    direct = [(b.seq, b.target, b.user) for b in _batches(25)]
    ahead = [(b.seq, b.target, b.user) for b in Prefetcher(_batches(25), depth=3)]
    assert len(ahead) == 25 and all(
        torch.equal(x, y) for a, b in zip(direct, ahead, strict=True) for x, y in zip(a, b, strict=True)
    )


def test_prefetching_hands_on_errors_and_stops_when_left():
    import threading

    import pytest

    from conure_dist.train.batches import Prefetcher

    def failing():
        yield from _batches(2)
        raise ValueError("shard 7 is truncated")

    got = []
    with pytest.raises(ValueError, match="shard 7 is truncated"):
        for batch in Prefetcher(failing(), depth=4):
            got.append(batch)
    assert len(got) == 2
    reader = Prefetcher(_batches(1000), depth=2)
    for i, _ in enumerate(reader):
        if i == 3:
            break  # the consumer leaves early (a diverged loss, a checkpoint-and-exit)
    reader.close()
    assert not reader.thread.is_alive()
    assert not any(t.name == "conure-prefetch" and t.is_alive() for t in threading.enumerate())
