"""Evaluation: exact metrics over all candidates, sharded over ranks and summed."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as tdist

from conure_dist.continual.views import MaskedModel
from conure_dist.data.manifest import Manifest, TaskInfo
from conure_dist.data.stream import iter_batches
from conure_dist.dist import DistInfo
from conure_dist.train.metrics import (
    Cutoffs,
    accuracy_sums,
    finalize,
    ranking_sums,
    sum_keys,
    target_ranks,
)


def _targets(task: TaskInfo, seq: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    return seq[:, -1] if task.kind == "sequence" else target


def _reduce(sums: dict[str, float], keys: tuple[str, ...], dist: DistInfo) -> dict[str, float]:
    """Sum over ranks. Every rank sends the same keys, zeros where it saw no instance, and the
    tensor lives on the rank's device (an NCCL group reduces CUDA tensors only)."""
    if not dist.is_distributed:
        return sums
    values = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=dist.device)
    tdist.all_reduce(values)
    return dict(zip(keys, values.cpu().tolist(), strict=True))


@torch.no_grad()
def evaluate_task(
    model: MaskedModel,
    manifest: Manifest,
    task: TaskInfo,
    split: str,
    batch_size: int,
    k: Cutoffs,
    dist: DistInfo,
) -> dict[str, float]:
    """Metrics of ``task`` on ``split`` under the model's current view (every instance once)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    per_rank = max(1, batch_size // dist.world_size)
    fused = getattr(model.model, "compiled", False)  # compiled models rank in one fused kernel
    for batch in iter_batches(manifest, task.name, split, per_rank, shuffle=False, seed=0, epoch=0,
                              rank=dist.rank, world_size=dist.world_size):
        seq = batch.seq.to(dist.device)
        target = _targets(task, seq, None if batch.target is None else batch.target.to(dist.device))
        scores = model(seq, task.name).float()
        part = accuracy_sums(scores, target) if task.kind == "class" else ranking_sums(target_ranks(scores, target, compiled=fused), k)
        for key, value in part.items():
            sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    return finalize(_reduce(sums, sum_keys(task.kind, k), dist))


@torch.no_grad()
def collect_scores(model: MaskedModel, manifest: Manifest, task: TaskInfo, split: str, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """All scores (logits) of a split in manifest order, on one process: for no-forgetting checks."""
    model.eval()
    out = [model(b.seq.to(device), task.name).float().cpu()
           for b in iter_batches(manifest, task.name, split, batch_size, shuffle=False, seed=0, epoch=0)]
    return torch.cat(out)


def reference_metrics(manifest: Manifest, task: TaskInfo, split: str, k: Cutoffs) -> dict[str, float]:
    """The trivial predictor on the same split: most popular training items, or majority class."""
    counts = manifest.load_train_counts(task.name).astype(np.int64)
    if task.kind == "sequence":
        counts[0] = -1  # padding is never a candidate
    # A strict order (frequency, then id) so ties cannot flatter the reference.
    order = np.lexsort((np.arange(len(counts)), -counts))
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(len(order))
    sums: dict[str, float] = {}
    for batch in iter_batches(manifest, task.name, split, 4096, shuffle=False, seed=0, epoch=0):
        target = _targets(task, batch.seq, batch.target)
        if task.kind == "class":
            part = {"acc": float((target == int(order[0])).sum()), "count": float(len(target))}
        else:
            part = ranking_sums(torch.from_numpy(rank_of[target.numpy()]), k)
        for key, value in part.items():
            sums[key] = sums.get(key, 0.0) + value
    return finalize(sums)
