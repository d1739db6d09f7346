"""The multi-task model: one NextItNet backbone and one head per task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from conure_dist.model.backbone import NextItNet
from conure_dist.model.heads import ClassHead, ItemHead, SampledSoftmaxHead

SOFTMAX_CHUNK = 8192
"""Negatives per chunk of the streamed sampled softmax."""

TaskKind = Literal["sequence", "item", "class"]


@dataclass(frozen=True)
class TaskSpec:
    """What the model needs to know of a task: its kind and output size."""

    name: str
    kind: TaskKind
    num_outputs: int


class ConureModel(nn.Module):
    """Backbone + heads. ``forward`` returns a loss (with targets) or scores over all candidates.

    Sequence (T1) tasks read ``seq[:, :-1]`` and predict every next item; their scores are for
    the item after the last input position. Item and class tasks read the whole sequence and use
    the hidden state of its last position.

    ``fast`` (the default) computes last-position states on the receptive field only and streams
    T1's sampled softmax over the negatives in chunks; ``fast=False`` is the plain eager path
    (full hidden states, materialized logits) that the fast one is tested and benchmarked against.
    """

    def __init__(
        self,
        num_seq_items: int,
        tasks: list[TaskSpec],
        channels: int,
        kernel_size: int,
        block_dilations: list[int],
        init_std: float = 0.02,
        fast: bool = True,
        prune_embedding: bool = False,
        softmax_kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.fast = fast
        self.compiled = False
        """Set by ``conure_dist.compiled.compile_model``: the backbone and hot kernels run compiled."""
        self.prune_embedding = prune_embedding
        self.masked_rows: bool | None = None
        """How a sequence task's loss leaves out the positions it does not predict: ``True`` scores
        every position and zeroes those rows' losses (the same loss and gradients, to rounding,
        with static shapes: no host synchronisation); ``False`` selects the predicted rows
        first (fewer rows); ``None`` (default) the first on CUDA, the second elsewhere."""
        self.backbone = NextItNet(num_seq_items, channels, kernel_size, block_dilations, init_std)
        self.kinds: dict[str, TaskKind] = {}
        heads = {}
        for spec in tasks:
            self.kinds[spec.name] = spec.kind
            if spec.kind == "sequence":
                heads[spec.name] = SampledSoftmaxHead(
                    spec.num_outputs, channels, init_std, chunk=SOFTMAX_CHUNK if fast else None, kernel=softmax_kernel
                )
            elif spec.kind == "item":
                heads[spec.name] = ItemHead(spec.num_outputs, channels, init_std, kernel=softmax_kernel)
            else:
                heads[spec.name] = ClassHead(spec.num_outputs, channels)
        self.heads = nn.ModuleDict(heads)
        self.base_blocks = len(block_dilations)
        self.growth: list[tuple[str, list[int]]] = []
        """Blocks appended after construction, in order: (the task that added them, their
        dilations). A task runs the base blocks and those added by itself and earlier tasks
        (``grow``; a saved run's are rebuilt by ``continual.growth.apply_growth``)."""

    def forward(
        self,
        seq_BL: torch.Tensor,
        task: str,
        target_B: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores over all candidates, or with ``target_B`` (for sequence tasks: ``negatives``)
        the pair (sum of the examples' losses, number of examples) so that the caller can
        normalise by the count over all ranks."""
        head = self.heads[task]
        if self.kinds[task] == "sequence":
            inputs = seq_BL[:, :-1]
            if negatives is None:
                return head.scores(self._last_hidden(inputs, task))
            hidden = self.backbone(inputs, depth=self._depth_arg(task))
            keep = _predicted(seq_BL)
            if self.masked_rows if self.masked_rows is not None else hidden.is_cuda:
                # Every position scored, padding's losses zeroed: no boolean indexing, whose
                # output size the host would wait for each step.
                loss_sum = head.loss(hidden.flatten(0, 1), seq_BL[:, 1:].flatten(), negatives, keep.flatten())
            else:
                loss_sum = head.loss(hidden[keep], seq_BL[:, 1:][keep], negatives)
            count = keep.sum()
        else:
            hidden = self._last_hidden(seq_BL, task)
            if target_B is None:
                return head.scores(hidden)
            loss_sum = head.loss(hidden, target_B, negatives)
            count = torch.tensor(target_B.shape[0], device=target_B.device)
        return loss_sum, count

    def represent(self, seq_BL: torch.Tensor, task: str) -> torch.Tensor:
        """The hidden vectors [B, C] that ``task``'s head scores for ``seq_BL``, which is read as
        ``forward`` reads it (a sequence task drops the last position): ``forward(seq, task)``
        without targets is ``heads[task].scores(represent(seq, task))``. ``conure embed``'s user
        vectors."""
        inputs = seq_BL[:, :-1] if self.kinds[task] == "sequence" else seq_BL
        return self._last_hidden(inputs, task)

    def example_count(self, seq_BL: torch.Tensor, task: str) -> torch.Tensor:
        """The number of examples a training batch of ``task`` holds, as ``forward`` counts them
        (predicted positions of the sequence task, else instances), without running the model."""
        if self.kinds[task] == "sequence":
            return _predicted(seq_BL).sum()
        return torch.tensor(seq_BL.shape[0], device=seq_BL.device)

    def init_head_prior(self, task: str, train_counts: torch.Tensor) -> None:
        """Start an item or class head as its task's trivial predictor (see the heads)."""
        if self.kinds[task] == "sequence":
            raise ValueError(f"task '{task}': the sequence head has no prior start")
        self.heads[task].init_prior(train_counts)

    def _last_hidden(self, seq_BL: torch.Tensor, task: str) -> torch.Tensor:
        depth = self._depth_arg(task)
        if self.fast:
            return self.backbone(seq_BL, last_only=True, depth=depth)
        return self.backbone(seq_BL, depth=depth)[:, -1]

    # -- capacity growth ---------------------------------------------------------------------
    def grow(self, task: str, dilations: list[int], generator: torch.Generator) -> list[str]:
        """Append residual blocks that ``task`` and every later task run, and earlier tasks skip
        (so their outputs do not change by a bit). They start as the identity (see
        ``NextItNet.append_blocks``). Returns the names of their conv kernels (to be owned)."""
        if task not in self.kinds:
            raise ValueError(f"cannot grow for unknown task '{task}' (tasks: {', '.join(self.kinds)})")
        order = list(self.kinds)
        if self.growth and order.index(task) < order.index(self.growth[-1][0]):
            raise ValueError(f"task '{task}' comes before '{self.growth[-1][0]}', which already grew the backbone")
        indices = self.backbone.append_blocks(list(dilations), generator)
        self.growth.append((task, list(dilations)))
        return [f"backbone.blocks.{i}.{conv}.weight" for i in indices for conv in ("conv1", "conv2")]

    def depth(self, task: str) -> int:
        """How many residual blocks ``task`` runs."""
        order = list(self.kinds)
        position = order.index(task)
        return self.base_blocks + sum(len(d) for t, d in self.growth if order.index(t) <= position)

    def block_dilations(self, task: str) -> list[int]:
        """The dilations of the blocks ``task`` runs, in order."""
        return [block.conv1.dilation for block in self.backbone.blocks[: self.depth(task)]]

    def _depth_arg(self, task: str) -> int | None:
        return self.depth(task) if self.growth else None

    def grown_blocks(self, task: str) -> list[int]:
        """Indices of the blocks that ``task`` appended (none unless it grew the backbone)."""
        start, out = self.base_blocks, []
        for owner, dilations in self.growth:
            if owner == task:
                out += range(start, start + len(dilations))
            start += len(dilations)
        return out

    def grown_names(self, task: str) -> list[str]:
        """The non-prunable parameters (layer norms, conv biases) of the blocks ``task`` appended:
        trained in its train phase, then frozen like T1's shared parameters."""
        prunable = set(self.prunable_names())
        return [
            f"backbone.blocks.{b}.{n}"
            for b in self.grown_blocks(task)
            for n, _ in self.backbone.blocks[b].named_parameters()
            if f"backbone.blocks.{b}.{n}" not in prunable
        ]

    def prunable_names(self, task: str | None = None) -> list[str]:
        """Parameter names (of this module) that Conure partitions between tasks: the conv
        kernels, and the item embedding when ``prune_embedding`` is set; with ``task``, only
        those it runs (not the blocks a later task appended)."""
        embedding = ["backbone.embedding.weight"] if self.prune_embedding else []
        depth = None if task is None else self.depth(task)
        return [*embedding, *(f"backbone.{n}" for n in self.backbone.conv_weight_names(depth))]

    def shared_names(self) -> list[str]:
        """Backbone parameters trained in T1's first phase and frozen afterwards (not those of
        blocks appended later: see ``grown_names``)."""
        prunable = set(self.prunable_names())
        grown = {f"blocks.{b}." for b in range(self.base_blocks, len(self.backbone.blocks))}
        return [
            f"backbone.{n}"
            for n, _ in self.backbone.named_parameters()
            if f"backbone.{n}" not in prunable and not any(n.startswith(g) for g in grown)
        ]

    def item_table_names(self) -> list[str]:
        """The vocabulary-sized tables of T1 (embedding, sampled-softmax weight and bias): a step
        touches few of their rows."""
        seq_heads = [
            f"heads.{t}.{n}"
            for t, k in self.kinds.items()
            if k == "sequence"
            for n, _ in self.heads[t].named_parameters()
        ]
        return ["backbone.embedding.weight", *seq_heads]

    def frozen_with(self, task: str) -> list[str]:
        """The parameters besides its owned kernel positions that a finished task froze: its head,
        T1's shared backbone parameters (first task) and the blocks it appended."""
        first = list(self.kinds)[0] == task
        return self.head_names(task) + (self.shared_names() if first else []) + self.grown_names(task)

    def head_names(self, task: str) -> list[str]:
        return [f"heads.{task}.{n}" for n, _ in self.heads[task].named_parameters()]


def _predicted(seq_BL: torch.Tensor) -> torch.Tensor:
    """bool [B, L-1]: the positions the sequence task predicts: real items from real context
    (left padding carries no signal)."""
    return (seq_BL[:, 1:] != 0) & (seq_BL[:, :-1] != 0)
