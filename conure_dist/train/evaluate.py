"""Evaluation: exact metrics over all candidates, sharded over ranks and summed.

Item ranks come from the scores streamed a block of items at a time (``streamed_target_ranks``:
memory grows with [users, block], not with the vocabulary), or where the head's ``kernel``
picks it (``conure_dist.kernels.dispatch``) from the fused ranking kernel, which reads the
hidden vectors and the item table and never writes the [users, items] scores. Under ``auto``
that is a CUDA GPU with 16-bit products (evaluation under bf16 autocast); fp32 evaluation keeps
the streamed scores.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.func import functional_call

from conure_dist.continual.views import MaskedModel
from conure_dist.data.manifest import Manifest, TaskInfo
from conure_dist.data.stream import iter_batches
from conure_dist.dist import DistInfo
from conure_dist.kernels import fused_target_ranks, product_dtype, use_triton
from conure_dist.model.heads import ItemHead, SampledSoftmaxHead
from conure_dist.train.metrics import (
    Cutoffs,
    accuracy_sums,
    finalize,
    item_block,
    ranking_sums,
    streamed_target_ranks,
    sum_keys,
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


class _Represent(nn.Module):
    """``ConureModel.represent`` for one task as a module's forward, so that ``functional_call``
    runs it with a view's weights as ``MaskedModel`` runs the model's forward."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, seq_BL: torch.Tensor) -> torch.Tensor:
        return self.model.represent(seq_BL, self.task)


def fused_ranking(model: MaskedModel, task: TaskInfo, device: torch.device) -> bool:
    """Whether ``task``'s ranks come from the fused kernel: an item-ranking head whose ``kernel``
    picks Triton on ``device``."""
    head = model.model.heads[task.name] if task.kind != "class" else None
    return isinstance(head, SampledSoftmaxHead | ItemHead) and use_triton(
        head.kernel, device, product_dtype(device, head.weight.dtype), "rank", head.weight.shape[1]
    )


def _hidden(model: MaskedModel, task: TaskInfo, seq: torch.Tensor) -> torch.Tensor:
    """The task's hidden vectors of ``seq`` under the model's current view (its effective weights)."""
    weights = {f"model.{name}": w for name, w in model.effective_weights().items()}
    return functional_call(_Represent(model.model, task.name), weights, (seq,), strict=False)


def fused_table(model: MaskedModel, task: TaskInfo, device: torch.device) -> torch.Tensor | None:
    """The item table the fused rank kernel reads for ``task``, in the products' dtype, cast once
    for a whole evaluation rather than for every batch (T1's is 646K x 256); None where the
    ranks do not come from the kernel (``fused_ranking``)."""
    if not fused_ranking(model, task, device):
        return None
    weight = model.model.heads[task.name].weight
    return weight.to(product_dtype(device, weight.dtype)).contiguous()


def fused_ranks(
    model: MaskedModel, task: TaskInfo, seq: torch.Tensor, target: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """``target_ranks`` of the task's scores under the model's current view, from the hidden
    vectors and the head's ``table`` (``fused_table``; ``conure_dist.kernels.topk``)."""
    hidden, head = _hidden(model, task, seq), model.model.heads[task.name]
    return fused_target_ranks(hidden, table, head.bias, target, padding_first=isinstance(head, SampledSoftmaxHead))


def streamed_ranks(
    model: MaskedModel, task: TaskInfo, seq: torch.Tensor, target: torch.Tensor, compiled: bool
) -> torch.Tensor:
    """``target_ranks`` of the task's scores under the model's current view, scored a block of
    items at a time (``streamed_target_ranks``): memory grows with [users, block], not with the
    vocabulary, and the ranks equal those of the materialized scores."""
    hidden, head = _hidden(model, task, seq), model.model.heads[task.name]
    num_items = head.weight.shape[0]

    def scores_for(rows: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        return head.block_scores(hidden if rows is None else hidden[rows], start, stop).float()

    return streamed_target_ranks(scores_for, target, num_items, item_block(len(target), num_items), compiled=compiled)


def _batch_sums(
    model: MaskedModel,
    task: TaskInfo,
    seq: torch.Tensor,
    target: torch.Tensor,
    k: Cutoffs,
    table: torch.Tensor | None,
    compiled: bool,
) -> dict[str, float]:
    """One batch's metric sums: accuracy, or ranking metrics from fused ranks (against ``table``,
    ``fused_table``) or streamed scores (``table`` None)."""
    if table is not None:
        return ranking_sums(fused_ranks(model, task, seq, target, table), k)
    if task.kind == "class":
        return accuracy_sums(model(seq, task.name).float(), target)
    return ranking_sums(streamed_ranks(model, task, seq, target, compiled), k)


@torch.no_grad()
def evaluate_task(
    model: MaskedModel,
    manifest: Manifest,
    task: TaskInfo,
    split: str,
    batch_size: int,
    k: Cutoffs,
    dist: DistInfo,
    max_instances: int | None = None,
) -> dict[str, float]:
    """Metrics of ``task`` on ``split`` under the model's current view (every instance once, or
    the first ``max_instances`` of the split: ``train.eval_max_users``)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    per_rank = max(1, batch_size // dist.world_size)
    compiled = getattr(model.model, "compiled", False)  # compiled models rank in one compiled pass
    table = fused_table(model, task, dist.device)
    for batch in iter_batches(
        manifest,
        task.name,
        split,
        per_rank,
        shuffle=False,
        seed=0,
        epoch=0,
        rank=dist.rank,
        world_size=dist.world_size,
        max_instances=max_instances,
    ):
        seq = batch.seq.to(dist.device)
        target = _targets(task, seq, None if batch.target is None else batch.target.to(dist.device))
        part = _batch_sums(model, task, seq, target, k, table, compiled)
        for key, value in part.items():
            sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    return finalize(_reduce(sums, sum_keys(task.kind, k), dist))


def reference_metrics(
    manifest: Manifest, task: TaskInfo, split: str, k: Cutoffs, max_instances: int | None = None
) -> dict[str, float]:
    """The trivial predictor on the same split (the same instances as ``evaluate_task`` with the
    same ``max_instances``): most popular training items, or majority class."""
    counts = manifest.load_train_counts(task.name).astype(np.int64)
    if task.kind == "sequence":
        counts[0] = -1  # padding is never a candidate
    # A strict order (frequency, then id) so ties cannot flatter the reference.
    order = np.lexsort((np.arange(len(counts)), -counts))
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(len(order))
    sums: dict[str, float] = {}
    for batch in iter_batches(
        manifest, task.name, split, 4096, shuffle=False, seed=0, epoch=0, max_instances=max_instances
    ):
        target = _targets(task, batch.seq, batch.target)
        if task.kind == "class":
            part = {"acc": float((target == int(order[0])).sum()), "count": float(len(target))}
        else:
            part = ranking_sums(torch.from_numpy(rank_of[target.numpy()]), k)
        for key, value in part.items():
            sums[key] = sums.get(key, 0.0) + value
    return finalize(sums)
