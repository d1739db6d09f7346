"""MTL's joint loss, applied from outside the model, around the view the engines train.

A method whose record names a ``joint_weight`` (MTL) trains each later task t on t's batches
and, in the same step, T1's: each training call gets a fifth input, ``(T1's name, a T1 batch,
its negatives, weight)`` (``train.batches.micro_batches``), and returns t's loss sum plus
``weight`` times T1's mean loss scaled to t's example count. Normalised by t's count (as the
engines do), the step minimises ``mean loss of t + weight x mean loss of T1``.
"""

from __future__ import annotations

import torch

from conure_dist.continual.views import MaskedModel


class JointLossModel(MaskedModel):
    """A ``MaskedModel`` over the same model, ownership and view as ``masked`` whose training
    call adds T1's weighted loss (see the module). Its parameters are named as ``masked``'s, so
    an engine trains it exactly as it trains ``masked``."""

    def __init__(self, masked: MaskedModel) -> None:
        super().__init__(masked.model, masked.ownership)
        self.set_view(masked.mode, masked.task_id)

    def forward(
        self,
        seq_BL: torch.Tensor,
        task: str,
        target_B: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
        joint: tuple[str, torch.Tensor, torch.Tensor, float] | None = None,
    ):
        if joint is None:
            return super().forward(seq_BL, task, target_B, negatives)
        loss_sum, count = super().forward(seq_BL, task, target_B, negatives)
        other, other_seq, other_negatives, weight = joint
        other_sum, other_count = super().forward(other_seq, other, None, other_negatives)
        return loss_sum + weight * other_sum * (count / other_count.clamp(min=1)), count
