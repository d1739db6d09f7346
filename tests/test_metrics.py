"""Metrics on hand-computed cases."""

import math

import pytest
import torch

from conure_dist.train.metrics import (
    MIN_BLOCK_ITEMS,
    SCORE_BLOCK_ELEMENTS,
    accuracy_sums,
    finalize,
    item_block,
    ranking_sums,
    streamed_target_ranks,
    target_ranks,
)


def test_ranks_count_strictly_higher_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    assert target_ranks(scores, torch.tensor([2, 3])).tolist() == [1, 3]


def test_tied_scores_never_flatter_the_target():
    # Ties are broken by the lower id, as the popularity reference breaks them: a constant
    # scorer ranks each target at its id, not first.
    scores = torch.zeros(3, 6)
    assert target_ranks(scores, torch.tensor([0, 2, 5])).tolist() == [0, 2, 5]
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert target_ranks(scores, torch.tensor([3])).tolist() == [2]  # behind the higher 2 and the tied 1, 2


def test_mrr_hr_ndcg_by_hand():
    ranks = torch.tensor([0, 1, 4, 5, 100])
    m = finalize(ranking_sums(ranks, k=5))
    assert m["count"] == 5
    assert m["mrr@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 5)
    assert m["hr@5"] == pytest.approx(3 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)


def test_several_cutoffs_and_recall():
    ranks = torch.tensor([0, 1, 4, 5, 9, 100])
    m = finalize(ranking_sums(ranks, [5, 10]))
    assert list(m) == ["mrr@5", "hr@5", "ndcg@5", "recall@5", "mrr@10", "hr@10", "ndcg@10", "recall@10", "count"]
    assert m["hr@5"] == m["recall@5"] == pytest.approx(3 / 6)  # one target per example
    assert m["hr@10"] == pytest.approx(5 / 6)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 6 + 1 / 10) / 6)
    assert finalize(ranking_sums(ranks, 5)) == {k: v for k, v in m.items() if k.endswith("@5") or k == "count"}


def test_sums_compose_across_shards():
    ranks = torch.tensor([0, 3, 7, 2, 9, 1])
    whole = finalize(ranking_sums(ranks, 5))
    a, b = ranking_sums(ranks[:2], 5), ranking_sums(ranks[2:], 5)
    parts = finalize({k: a[k] + b[k] for k in a})
    assert parts == pytest.approx(whole)


def test_accuracy_and_cross_entropy():
    scores = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.3, 0.7]])
    m = finalize(accuracy_sums(scores, torch.tensor([1, 1, 1])))
    assert m["acc"] == pytest.approx(2 / 3)
    log_p = [s[1] - math.log(math.exp(s[0]) + math.exp(s[1])) for s in scores.tolist()]
    assert m["nll"] == pytest.approx(-sum(log_p) / 3)


def test_nan_scores_never_score():
    """A diverged model's NaN scores rank the target last and count as wrong, never as hits."""
    nan = float("nan")
    scores = torch.tensor([[nan, nan, nan, nan], [0.1, nan, 0.5, 0.2]])
    assert target_ranks(scores, torch.tensor([0, 1])).tolist() == [3, 3]
    assert target_ranks(scores, torch.tensor([2])[:1].expand(2)).tolist()[1] == 0
    m = finalize(accuracy_sums(torch.tensor([[nan, nan], [nan, 1.0], [0.0, 1.0]]), torch.tensor([0, 1, 1])))
    assert m["acc"] == pytest.approx(1 / 3)


def test_empty_split_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        finalize({"mrr@5": 0.0, "count": 0.0})


def _block_scorer(scores_NV):
    def scores_for(rows, start, stop):
        return scores_NV[:, start:stop] if rows is None else scores_NV[rows, start:stop]

    return scores_for


@pytest.mark.parametrize("kind", ["random", "tied", "nan"])
@pytest.mark.parametrize("num_rows", [1, 5, 40])
def test_streamed_ranks_equal_the_materialized_ones(kind, num_rows):
    g = torch.Generator().manual_seed(num_rows)
    num_items = 53
    if kind == "tied":  # few distinct values: the id order decides most ranks
        scores = torch.randint(0, 3, (num_rows, num_items), generator=g).float()
    else:
        scores = torch.randn(num_rows, num_items, generator=g)
    scores[:, 0] = float("-inf")  # T1's padding
    target = torch.randint(0, num_items, (num_rows,), generator=g)
    if kind == "nan":  # NaN candidates never count; a NaN target ranks last
        scores[torch.rand(num_rows, num_items, generator=g) < 0.2] = float("nan")
        scores[0, target[0]] = float("nan")
    want = target_ranks(scores, target)
    for block in (1, 7, 16, num_items - 1, num_items, num_items + 3):
        got = streamed_target_ranks(_block_scorer(scores), target, num_items, block)
        assert torch.equal(got, want), (kind, num_rows, block)
    if kind == "nan":
        assert got[0] == num_items - 1


def test_item_blocks_keep_the_scores_within_the_budget():
    assert item_block(16, 500, budget=1 << 14) == 500  # fits: one product, the materialized path
    assert item_block(4096, 646_000) == SCORE_BLOCK_ELEMENTS // 4096
    assert item_block(1 << 20, 646_000) == MIN_BLOCK_ITEMS
