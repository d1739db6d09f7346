"""Apply an ownership view to a model from outside, without touching its code.

The effective kernel of each prunable tensor is built in the forward pass:
``where(trainable, W, frozen_part)`` with ``frozen_part = where(frozen, W, 0).detach()``.
Autograd then gives exactly zero gradient to frozen and excluded weights under any engine
(DDP buckets, ZeRO partitions, bf16 master copies); no gradient hooks are involved.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from conure_dist.continual.ownership import TaskOwnership

VIEW_MODES = ("train", "retrain", "infer", "dense")


class MaskedModel(nn.Module):
    """Wraps a model; ``forward`` runs it with the prunable weights seen through a view."""

    def __init__(self, model: nn.Module, ownership: TaskOwnership) -> None:
        super().__init__()
        self.model = model
        # Plain attributes, not buffers: ownership changes only at prune time and must not be
        # broadcast by DDP on every forward.
        self.ownership = ownership
        self.mode = "infer"
        self.task_id = 1
        self._trainable: dict[str, torch.Tensor] = {}
        self._frozen: dict[str, torch.Tensor] = {}

    def set_view(self, mode: str, task_id: int) -> None:
        """Select the phase; masks are materialised once here, not on every step. ``dense`` reads
        every weight as it is (no ownership): the view of the baselines that share nothing."""
        if mode not in VIEW_MODES:
            raise ValueError(f"unknown view mode '{mode}', expected one of {VIEW_MODES}")
        self.mode, self.task_id = mode, task_id
        params = dict(self.model.named_parameters())
        self._trainable, self._frozen = {}, {}
        if mode == "dense":
            return
        for name in self.ownership.names:
            weight = params[name]
            trainable, frozen = self.ownership.masks(name, mode, task_id)
            self._trainable[name] = trainable.to(weight.device)
            self._frozen[name] = frozen.to(weight.device)

    def trainable_mask(self, name: str) -> torch.Tensor | None:
        """None in the dense view, or for a tensor without ownership: all of it is trainable."""
        return self._trainable.get(name)

    def trainable_part(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a parameter or a value shaped like it) with the entries this phase may not
        train set to zero."""
        mask = self.trainable_mask(name)
        return tensor if mask is None else torch.where(mask, tensor, 0.0)

    def effective_weights(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        out = {}
        if self.mode == "dense":
            return out
        for name in self.ownership.names:
            weight = params[name]
            frozen_part = torch.where(self._frozen[name], weight, 0.0).detach()
            if self.mode == "infer":
                out[name] = frozen_part
            else:
                out[name] = torch.where(self._trainable[name], weight, frozen_part)
        return out

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.effective_weights(), args, kwargs, strict=False)
