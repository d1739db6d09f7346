"""Exact ranking metrics over all candidates, and accuracy.

Metrics are accumulated as sums so that evaluation sharded over ranks reduces to exactly the
single-process numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from conure_dist.compiled import hot

ITEM_METRICS = ("mrr", "hr", "ndcg", "recall")
Cutoffs = int | Sequence[int]


@hot
def target_ranks(scores_NV: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all candidates under a strict order: by score, ties
    broken by the lower id (as the popularity reference breaks them), so tied scores can never
    flatter a model. A NaN target score ranks last. Compiled (``compiled=True``), one fused pass
    over the scores; ``conure_dist.kernels.fused_target_ranks`` counts the same from the hidden
    vectors and the item table without materializing the scores (evaluation on a GPU)."""
    target_scores = scores_NV.gather(1, target_N[:, None])
    ids = torch.arange(scores_NV.shape[1], device=scores_NV.device)
    before = (scores_NV > target_scores) | ((scores_NV == target_scores) & (ids[None, :] < target_N[:, None]))
    return torch.where(target_scores[:, 0].isnan(), scores_NV.shape[1] - 1, before.sum(dim=1))


SCORE_BLOCK_ELEMENTS = 1 << 24
"""Scores held at once by ``streamed_target_ranks`` (64 MB in fp32): [rows, block] with the block
as wide as this allows, so evaluation's memory does not grow with the vocabulary."""
MIN_BLOCK_ITEMS = 256
MIN_PRODUCT_ROWS = 16
"""From this many rows on, a row's scores on the CPU do not depend on how many rows share the
matrix product (below it the product may round differently): the fewest rows a product that
reads single targets' scores is given."""

BlockScores = Callable[[torch.Tensor | None, int, int], torch.Tensor]
"""``scores_for(rows, start, stop)``: scores [rows, stop - start] of items ``start`` to ``stop``
for the given rows (an index tensor, or ``None`` for all), columns of the full [rows, items]
scores."""


def item_block(num_rows: int, num_items: int, budget: int | None = None) -> int:
    """Items per block of ``streamed_target_ranks``: all of them where [rows, items] scores fit
    ``budget`` elements (default ``SCORE_BLOCK_ELEMENTS``; one product, exactly the materialized
    path), else as many as fit."""
    budget = SCORE_BLOCK_ELEMENTS if budget is None else budget
    if num_rows * num_items <= budget:
        return num_items
    return max(MIN_BLOCK_ITEMS, budget // max(num_rows, 1))


@hot
def _count_before(
    scores_NB: torch.Tensor, target_scores_N: torch.Tensor, target_N: torch.Tensor, start: int
) -> torch.Tensor:
    """Per row, the items of one block that ``target_ranks`` puts before the target (never the
    target itself, whatever its score in this product)."""
    ids = torch.arange(start, start + scores_NB.shape[1], device=scores_NB.device)[None, :]
    t, target = target_scores_N[:, None], target_N[:, None]
    before = (scores_NB > t) | ((scores_NB == t) & (ids < target))
    # int32 counts: a bool sum casts its input first, and int64 would double the scores' memory.
    return (before & (ids != target)).sum(dim=1, dtype=torch.int32)


def _target_scores(scores_for: BlockScores, target_N: torch.Tensor, num_items: int, block: int) -> torch.Tensor:
    """Each row's score of its target, read from the block holding it: one product per block
    that holds targets, over those rows (filled up to ``MIN_PRODUCT_ROWS`` rows)."""
    num_rows = target_N.shape[0]
    blocks = torch.div(target_N, block, rounding_mode="floor")
    out: torch.Tensor | None = None
    for b in torch.unique(blocks).tolist():
        start = b * block
        in_block = blocks == b
        rows = in_block.nonzero()[:, 0]
        if num_rows < MIN_PRODUCT_ROWS:
            pick = None
        else:
            filler = (~in_block).nonzero()[:, 0][: max(0, MIN_PRODUCT_ROWS - rows.numel())]
            pick = torch.cat([rows, filler])
        scores = scores_for(pick, start, min(start + block, num_items))
        if pick is not None:
            scores = scores[: rows.numel()]
        else:
            scores = scores[rows]
        picked = scores.gather(1, (target_N[rows] - start)[:, None])[:, 0]
        if out is None:
            out = torch.empty(num_rows, dtype=picked.dtype, device=picked.device)
        out[rows] = picked
    assert out is not None, "no rows to rank"
    return out


def streamed_target_ranks(
    scores_for: BlockScores, target_N: torch.Tensor, num_items: int, block: int, compiled: bool = False
) -> torch.Tensor:
    """``target_ranks`` of the [rows, num_items] scores that ``scores_for`` yields ``block`` items
    at a time: memory holds [rows, block] scores, not [rows, items]. The same ranks exactly: a
    first pass reads each target's score from its own block, a second counts, block by block,
    the items ahead of it under ``target_ranks``' order (a NaN target ranks last). With a single
    block it is ``target_ranks`` of that one product."""
    if block >= num_items:
        return target_ranks(scores_for(None, 0, num_items), target_N, compiled=compiled)
    target_scores = _target_scores(scores_for, target_N, num_items, block)
    before = torch.zeros_like(target_N)
    for start in range(0, num_items, block):
        scores = scores_for(None, start, min(start + block, num_items))
        before += _count_before(scores, target_scores, target_N, start, compiled=compiled)
    return torch.where(target_scores.isnan(), num_items - 1, before)


def cutoffs(k: Cutoffs) -> tuple[int, ...]:
    """The cut-offs of ``train.topk`` (one, or a list whose first picks best epochs)."""
    return (k,) if isinstance(k, int) else tuple(k)


def ranking_sums(ranks_N: torch.Tensor, k: Cutoffs) -> dict[str, float]:
    """Sums over examples of MRR@k, HR@k, NDCG@k and Recall@k at every cut-off, plus the example
    count. With one held-out target per example, Recall@k (targets found / targets) equals HR@k;
    it is reported under its own name for tables that use it."""
    ranks = ranks_N.double()
    sums = {}
    for cut in cutoffs(k):
        hit = ranks < cut
        hits = hit.double().sum().item()
        sums.update(
            {
                f"mrr@{cut}": torch.where(hit, 1.0 / (ranks + 1.0), 0.0).sum().item(),
                f"hr@{cut}": hits,
                f"ndcg@{cut}": torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0).sum().item(),
                f"recall@{cut}": hits,
            }
        )
    sums["count"] = float(ranks.numel())
    return sums


def accuracy_sums(scores_NC: torch.Tensor, target_N: torch.Tensor) -> dict[str, float]:
    # A row with a NaN score is wrong whatever argmax picks.
    correct = (scores_NC.argmax(dim=1) == target_N) & ~scores_NC.isnan().any(dim=1)
    nll = torch.nn.functional.cross_entropy(scores_NC.double(), target_N, reduction="sum").item()
    return {"acc": correct.double().sum().item(), "nll": nll, "count": float(target_N.numel())}


def sum_keys(kind: str, k: Cutoffs) -> tuple[str, ...]:
    """The sums ``accuracy_sums`` (class tasks) or ``ranking_sums`` (the others) return."""
    if kind == "class":
        return ("acc", "nll", "count")
    return (*(f"{name}@{cut}" for cut in cutoffs(k) for name in ITEM_METRICS), "count")


def finalize(sums: dict[str, float]) -> dict[str, float]:
    """Turn accumulated sums into means (the example count stays a count)."""
    count = sums.get("count", 0.0)
    if count == 0:
        raise ValueError("cannot compute metrics over an empty split")
    out = {name: value / count for name, value in sums.items() if name != "count"}
    out["count"] = int(count)
    return out


def primary_metric_name(kind: str, k: Cutoffs) -> str:
    """What fills the forgetting matrix and picks best epochs: accuracy, or MRR at the first cut-off."""
    return "acc" if kind == "class" else f"mrr@{cutoffs(k)[0]}"
