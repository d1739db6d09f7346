"""What every engine back-propagates: the loss normalized over the global batch, the masked L2
penalty of the paper, and the autocast context of the configured precision."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as tdist
from torch import nn

from conure_dist.continual.views import MaskedModel
from conure_dist.dist import DistInfo


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def l2_penalty(masked: MaskedModel, trainable: dict[str, nn.Parameter], l2: float) -> torch.Tensor | None:
    """0.5 * l2 * ||w||^2 over the entries trainable in this phase (the paper's regularizer).

    Prunable tensors are masked first, so the penalty's gradient on a frozen entry is exactly
    zero: it moves no frozen weight, under any engine.
    """
    if l2 == 0.0 or not trainable:
        return None
    total = None
    for name, param in trainable.items():
        term = masked.trainable_part(name.removeprefix("model."), param).float().pow(2).sum()
        total = term if total is None else total + term
    return 0.5 * l2 * total


def normalized_loss(loss_sum: torch.Tensor, count: torch.Tensor, dist: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss to back-propagate, and the global batch's mean loss for logging.

    Data parallelism averages gradients over ranks, so each rank divides its sum by the global
    count / world size: the averaged gradient is then exactly that of the global batch mean,
    whatever the number of examples (e.g. non-padding positions) on each rank. The same
    exchange sums the ranks' losses, so every rank logs the global mean (what one process
    logs), and a rank whose loss is not finite makes it non-finite everywhere: all ranks stop at the
    same step.
    """
    count = count.detach().to(torch.float64)
    if dist.is_distributed:
        total = torch.stack([count, loss_sum.detach().to(torch.float64)])
        tdist.all_reduce(total)
        global_mean = total[1] / total[0].clamp(min=1)
        return loss_sum * (dist.world_size / total[0].clamp(min=1)).to(loss_sum.dtype), global_mean
    return loss_sum / count.clamp(min=1).to(loss_sum.dtype), loss_sum.detach() / count.clamp(min=1)


def training_loss(
    masked: MaskedModel,
    trainable: dict[str, nn.Parameter],
    l2: float,
    dist: DistInfo,
    loss_sum: torch.Tensor,
    count: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What every engine back-propagates (normalized loss plus masked L2 over ``trainable``),
    and the logged mean."""
    loss, mean = normalized_loss(loss_sum, count, dist)
    penalty = l2_penalty(masked, trainable, l2)
    return (loss if penalty is None else loss + penalty), mean


class MicroBatchLoss:
    """The loss of one micro-batch of a step split into ``k`` (gradient accumulation), scaled so
    that the gradients summed over micro-batches and averaged over ranks, then divided by ``k``,
    are those of the global batch mean: each micro-batch is treated as one of world size x k
    data-parallel ranks. ``counts`` are the micro-batches' example counts on this rank."""

    def __init__(self, counts: list[torch.Tensor], dist: DistInfo) -> None:
        self.dist, self.k = dist, len(counts)
        total = torch.stack([c.detach().to(torch.float64) for c in counts]).sum()
        if dist.is_distributed:
            tdist.all_reduce(total)
        self.total_count = total.clamp(min=1)
        self.scale = dist.world_size * self.k / self.total_count
        self.loss_total = torch.zeros((), dtype=torch.float64, device=total.device)

    def __call__(
        self, masked: MaskedModel, trainable: dict[str, nn.Parameter], l2: float, loss_sum: torch.Tensor
    ) -> torch.Tensor:
        """What to back-propagate for one micro-batch (its scaled loss plus the L2 penalty, as
        every data-parallel rank adds it)."""
        self.loss_total += loss_sum.detach().to(torch.float64)
        penalty = l2_penalty(masked, trainable, l2)
        loss = loss_sum * self.scale.to(loss_sum.dtype)
        return loss if penalty is None else loss + penalty

    def mean(self) -> torch.Tensor:
        """The global batch's mean loss, once every micro-batch went through (collective)."""
        if self.dist.is_distributed:
            tdist.all_reduce(self.loss_total)
        return self.loss_total / self.total_count
