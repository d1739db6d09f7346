"""Exact ranking metrics over all candidates, and accuracy.

Metrics are accumulated as sums so that evaluation sharded over ranks reduces to exactly the
single-process numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

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
