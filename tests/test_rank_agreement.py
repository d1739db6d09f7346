"""What every rank must agree on, over a real 2-process gloo group: evaluation sums when one rank
saw no instance, the logged loss (the global batch's mean), and a non-finite loss on one rank only."""

import math

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from conure_dist.dist import DistInfo
from conure_dist.train.evaluate import _reduce
from conure_dist.train.loss import normalized_loss
from conure_dist.train.metrics import finalize, sum_keys

pytestmark = pytest.mark.multiprocess
WORLD = 2


def _worker(rank: int, init: str, results: dict) -> None:
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        dist = DistInfo(rank, WORLD, rank, torch.device("cpu"), "gloo")
        # Rank 0 holds both instances of a tiny split (stride partition); rank 1 holds none.
        item = (
            {"mrr@5": 1.5, "hr@5": 2.0, "ndcg@5": 1.6309297535714575, "recall@5": 2.0, "count": 2.0}
            if rank == 0
            else {}
        )
        klass = {"acc": 1.0, "nll": 0.75, "count": 2.0} if rank == 0 else {}
        # Rank 0 sums 3.0 over 2 examples, rank 1 5.0 over 3: both log the global mean 8 / 5, and
        # back-propagate their sum times world size / global count.
        loss, mean = normalized_loss(torch.tensor(3.0 + 2 * rank), torch.tensor(2 + rank), dist)
        # Rank 1's batch diverged: both ranks must see it, so that both stop at this step.
        loss_sum = torch.tensor(float("inf") if rank == 1 else 3.0)
        _, logged = normalized_loss(loss_sum, torch.tensor(2 + rank), dist)
        results[rank] = (
            finalize(_reduce(item, sum_keys("item", 5), dist)),
            finalize(_reduce(klass, sum_keys("class", 5), dist)),
            logged.item(),
            mean.item(),
            loss.item(),
        )
    finally:
        tdist.destroy_process_group()


def test_a_rank_without_instances_still_reduces(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", results), nprocs=WORLD, join=True)
    expected_item = {"mrr@5": 0.75, "hr@5": 1.0, "ndcg@5": 1.6309297535714575 / 2, "recall@5": 1.0, "count": 2}
    expected_class = {"acc": 0.5, "nll": 0.375, "count": 2}
    for rank in range(WORLD):
        item, klass, logged, mean, loss = results[rank]
        assert not math.isfinite(logged)
        assert mean == pytest.approx(8 / 5, rel=1e-12)
        assert loss == pytest.approx((3.0 + 2 * rank) * WORLD / 5, rel=1e-6)
        assert item == pytest.approx(expected_item) and item["count"] == 2
        assert klass == pytest.approx(expected_class)
