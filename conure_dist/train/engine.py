"""Training engines behind one small interface: ``train_step`` and optimizer state.

The engine is chosen by configuration (``dist.engine``); the task loop never branches on it.
A fresh engine (and optimizer) is built for every phase, so no optimizer moment survives from
a phase in which a weight was trainable into one where it is frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conure_dist.config import DistConfig
from conure_dist.continual.views import MaskedModel
from conure_dist.dist import DistInfo
from conure_dist.train.loss import MicroBatchLoss, autocast_context, training_loss
from conure_dist.train.profile import StepTimer
from conure_dist.train.sparse_sync import RowSparseAllReduce


class Engine(Protocol):
    sharded_state: bool
    """True when every rank holds a different part of the optimizer state (ZeRO)."""
    state_classes: tuple[type, ...]
    """The classes besides tensors and plain containers that its optimizer state holds: the
    only ones a checkpoint's optimizer part may hold when loaded back."""

    def train_step(self, micro_batches: Sequence[tuple]) -> torch.Tensor:
        """One optimizer step over a global batch given as this rank's micro-batches (each the
        model's training inputs; one unless gradients are accumulated); returns the global
        batch's mean loss."""

    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (``train.lr_schedule``)."""

    def close(self) -> None:
        """Release what the engine hooked into the model when its phase ends."""

    def attach_timer(self, timer: StepTimer) -> None:
        """Time the parts of every following step and count its exchanges (``train.step_timing``)."""


class TorchEngine:
    """Plain PyTorch: one process, or DDP when the world has several ranks.

    Under DDP, the trainable tensors named in ``row_sparse`` (the big item tables) are left out
    of DDP's dense buckets and averaged by ``RowSparseAllReduce`` instead; their L2 gradient
    (``l2 * w``, the same on every rank) is added after the exchange so that it does not make
    every row non-zero. The update equals the dense one up to float rounding.
    """

    sharded_state = False
    state_classes: tuple[type, ...] = ()
    timer: StepTimer | None = None

    def __init__(
        self,
        masked: MaskedModel,
        trainable: dict[str, nn.Parameter],
        lr: float,
        l2: float,
        dist: DistInfo,
        precision: str,
        row_sparse: list[str] | tuple[str, ...] = (),
        clip_grad_norm: float | None = None,
        fold_l2: bool | None = None,
    ) -> None:
        self.masked = masked
        self.clip_grad_norm = clip_grad_norm
        self.dist = dist
        self.precision = precision
        self.l2 = l2
        self.trainable = trainable
        sparse = {n: trainable[n] for n in row_sparse if n in trainable} if dist.is_distributed else {}
        self.sparse = RowSparseAllReduce(sparse, dist) if sparse else None
        self.dense = {n: p for n, p in trainable.items() if n not in sparse}
        if dist.is_distributed:
            # The model has no buffers, and ownership lives outside module state: nothing is
            # broadcast per forward. The ignore list is set on every build (phases differ).
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(masked, list(sparse))
            self.module: nn.Module = DistributedDataParallel(
                masked, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
            )
        else:
            self.module = masked
        folded = self._folded(fold_l2)
        self.penalized = {n: p for n, p in self.dense.items() if n not in folded}
        # The L2 penalty is in the loss (weight decay 0), except for the folded tensors: Adam's
        # weight decay adds l2 * w to their gradient, the penalty's own gradient. On CUDA the
        # fused kernel updates every tensor in one pass (T1's item tables alone are 330M values).
        groups = [{"params": [p for n, p in trainable.items() if n not in folded], "weight_decay": 0.0}]
        if folded:
            groups.append({"params": list(folded.values()), "weight_decay": l2})
        self.optimizer = torch.optim.Adam(groups, lr=lr, fused=True if dist.device.type == "cuda" else None)

    def _folded(self, fold_l2: bool | None) -> dict[str, nn.Parameter]:
        """The dense tensors whose L2 term moves into Adam's weight decay (``fold_l2``; default:
        on CUDA, where the penalty's passes over T1's item tables cost milliseconds a step). The
        update is the same where nothing else comes between the gradient and Adam: tensors
        without frozen entries (a masked tensor's frozen entries take no decay), no gradient
        clipping (decay would escape the clipped norm)."""
        if not (fold_l2 if fold_l2 is not None else self.dist.device.type == "cuda"):
            return {}
        if self.l2 == 0.0 or self.clip_grad_norm is not None:
            return {}
        masks = {n: self.masked.trainable_mask(n.removeprefix("model.")) for n in self.dense}
        return {n: p for n, p in self.dense.items() if masks[n] is None or bool(masks[n].all())}

    def train_step(self, micro_batches: Sequence[tuple]) -> torch.Tensor:
        if self.timer is None:
            return self._train_step(micro_batches)
        with self.timer.comm.counting():
            return self._train_step(micro_batches)

    def _train_step(self, micro_batches: Sequence[tuple]) -> torch.Tensor:
        timer = self.timer
        self.optimizer.zero_grad(set_to_none=True)
        if len(micro_batches) == 1:
            with autocast_context(self.dist.device, self.precision):
                loss_sum, count = self.module(*micro_batches[0])
            loss, mean = training_loss(self.masked, self.penalized, self.l2, self.dist, loss_sum, count)
            loss.backward()
        else:
            mean = self._accumulate(micro_batches)
        if timer is not None:
            timer.mark("forward_backward")
        if self.sparse is not None:
            self.sparse()
            if self.l2:
                for name, param in self.sparse.params.items():
                    weight = self.masked.trainable_part(name.removeprefix("model."), param.detach())
                    param.grad.add_(weight, alpha=self.l2)
            if timer is not None:
                timer.mark("communication")
        if self.clip_grad_norm is not None:
            grads = [p for p in self.trainable.values() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.clip_grad_norm)
        self.optimizer.step()
        if timer is not None:
            timer.mark("optimizer")
        return mean

    def _accumulate(self, micro_batches: Sequence[tuple]) -> torch.Tensor:
        """Forward and backward one micro-batch at a time (DDP exchanges only after the last),
        then divide the summed gradients by their number."""
        model = self.masked.model
        micro_loss = MicroBatchLoss([model.example_count(m[0], m[1]) for m in micro_batches], self.dist)
        for i, inputs in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.dist.is_distributed else self.module.no_sync()
            with sync:
                with autocast_context(self.dist.device, self.precision):
                    loss_sum, _ = self.module(*inputs)
                micro_loss(self.masked, self.penalized, self.l2, loss_sum).backward()
        for param in self.trainable.values():
            if param.grad is not None:
                param.grad.div_(micro_loss.k)
        return micro_loss.mean()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "param_order": self._param_order()}

    def load_state_dict(self, state: dict) -> None:
        """The optimizer state; saved under another grouping of the same tensors (with the L2
        term folded on CUDA, or not on CPU) it is regrouped by tensor name first, so a run
        resumes mid-phase on either device."""
        saved, order = state["optimizer"], state.get("param_order")
        if order is not None:
            saved = regrouped(saved, order, self._param_order(), self.optimizer.state_dict()["param_groups"])
        self.optimizer.load_state_dict(saved)

    def _param_order(self) -> list[str]:
        """Trainable tensors' names in the optimizer's order (group by group), which indexes its state."""
        names = {id(p): n for n, p in self.trainable.items()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def close(self) -> None:
        """Nothing to release: DDP's wrapper and the optimizer go with this object."""

    def attach_timer(self, timer: StepTimer) -> None:
        self.timer = timer
        if self.dist.is_distributed:
            self.module.register_comm_hook(None, timer.comm.ddp_hook)


def regrouped(saved: dict, saved_order: list[str], order: list[str], groups: list[dict]) -> dict:
    """An optimizer ``state_dict`` whose per-tensor state was indexed by ``saved_order``, indexed
    by ``order`` and split into ``groups`` (the current optimizer's, with the saved learning rate).
    The same tensors must be trained on both sides."""
    if sorted(saved_order) != sorted(order):
        missing, extra = sorted(set(order) - set(saved_order)), sorted(set(saved_order) - set(order))
        raise ValueError(f"the optimizer state holds other tensors: missing {missing}, not trained now {extra}")
    index = {name: i for i, name in enumerate(saved_order)}
    state = {new: saved["state"][index[name]] for new, name in enumerate(order) if index[name] in saved["state"]}
    lr = saved["param_groups"][0]["lr"]
    return {"state": state, "param_groups": [{**g, "lr": lr} for g in groups]}


def build_engine(
    masked: MaskedModel,
    trainable: dict[str, nn.Parameter],
    lr: float,
    l2: float,
    dist: DistInfo,
    cfg: DistConfig,
    per_rank_batch: int = 1,
    row_sparse: list[str] | tuple[str, ...] = (),
    grad_accum: int = 1,
    clip_grad_norm: float | None = None,
) -> Engine:
    """Wrap the masked model for the configured engine. ``trainable`` names are of ``masked``;
    ``row_sparse`` names the item tables whose gradients DDP exchanges row-sparsely (the others
    join DDP's dense buckets; ``train.exchange_choice`` picks them);
    ``per_rank_batch`` is a rank's share of the global batch, in ``grad_accum`` micro-batches.
    ``TorchEngine`` folds the L2 term of tensors without frozen entries into Adam on CUDA."""
    if cfg.engine == "ddp":
        return TorchEngine(masked, trainable, lr, l2, dist, cfg.precision, row_sparse, clip_grad_norm)
    from conure_dist.train.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(
        masked, trainable, lr, l2, dist, cfg, per_rank_batch // grad_accum, grad_accum, clip_grad_norm
    )
