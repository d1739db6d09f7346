"""Exact ranking metrics over all candidates, and accuracy.

Metrics are accumulated as sums so that evaluation sharded over ranks reduces to exactly the
single-process numbers.
"""

from __future__ import annotations

import torch

from conure_dist.compiled import hot

ITEM_METRICS = ("mrr", "hr", "ndcg")


@hot
def target_ranks(scores_NV: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all candidates under a strict order: by score, ties
    broken by the lower id (as the popularity reference breaks them), so tied scores can never
    flatter a model. A NaN target score ranks last. Compiled (``compiled=True``), one fused pass
    over the scores."""
    target_scores = scores_NV.gather(1, target_N[:, None])
    ids = torch.arange(scores_NV.shape[1], device=scores_NV.device)
    before = (scores_NV > target_scores) | ((scores_NV == target_scores) & (ids[None, :] < target_N[:, None]))
    return torch.where(target_scores[:, 0].isnan(), scores_NV.shape[1] - 1, before.sum(dim=1))


def ranking_sums(ranks_N: torch.Tensor, k: int) -> dict[str, float]:
    """Sums over examples of MRR@k, HR@k and NDCG@k, plus the example count."""
    ranks = ranks_N.double()
    hit = ranks < k
    return {
        "mrr": torch.where(hit, 1.0 / (ranks + 1.0), 0.0).sum().item(),
        "hr": hit.double().sum().item(),
        "ndcg": torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0).sum().item(),
        "count": float(ranks.numel()),
    }


def accuracy_sums(scores_NC: torch.Tensor, target_N: torch.Tensor) -> dict[str, float]:
    # A row with a NaN score is wrong whatever argmax picks.
    correct = (scores_NC.argmax(dim=1) == target_N) & ~scores_NC.isnan().any(dim=1)
    nll = torch.nn.functional.cross_entropy(scores_NC.double(), target_N, reduction="sum").item()
    return {"acc": correct.double().sum().item(), "nll": nll, "count": float(target_N.numel())}


def sum_keys(kind: str) -> tuple[str, ...]:
    """The sums ``accuracy_sums`` (class tasks) or ``ranking_sums`` (the others) return."""
    return ("acc", "nll", "count") if kind == "class" else (*ITEM_METRICS, "count")


def finalize(sums: dict[str, float], k: int) -> dict[str, float]:
    """Turn accumulated sums into means, named with the cut-off (``mrr@5``)."""
    count = sums.get("count", 0.0)
    if count == 0:
        raise ValueError("cannot compute metrics over an empty split")
    out = {}
    for name, value in sums.items():
        if name == "count":
            continue
        out[f"{name}@{k}" if name in ITEM_METRICS else name] = value / count
    out["count"] = int(count)
    return out


def primary_metric_name(kind: str, k: int) -> str:
    return "acc" if kind == "class" else f"mrr@{k}"

