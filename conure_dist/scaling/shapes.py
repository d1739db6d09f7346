"""What each phase of a run trains, from its config alone: the model is built on the ``meta``
device (no memory, no data), and each phase's trainable tensors are split into the item tables
(exchanged row-sparsely or densely) and the rest (DDP's dense buckets)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conure_dist.config import RunConfig
from conure_dist.model import TaskSpec
from conure_dist.scaling.comm_model import Table


@dataclass(frozen=True)
class PhaseShape:
    task: str
    kind: str
    mode: str
    dense_bytes: int
    """fp32 gradient bytes of the trainable tensors that are not item tables."""
    tables: tuple[Table, ...]
    """The trainable item tables (T1's embedding, softmax weight and bias)."""
    trainable_parameters: int

    @property
    def table_bytes(self) -> int:
        return sum(t.bytes for t in self.tables)


def phase_shapes(cfg: RunConfig, num_seq_items: int, specs: list[TaskSpec]) -> list[PhaseShape]:
    """Every phase of ``cfg``'s tasks in order (train, and retrain where configured), before any
    growth of the backbone."""
    from conure_dist.train.context import build_model
    from conure_dist.train.phase import phase_parameters

    with torch.device("meta"):
        model = build_model(cfg, num_seq_items, specs)
    tables = {f"model.{n}" for n in model.item_table_names()}
    shapes = []
    for i, (spec, task) in enumerate(zip(specs, cfg.tasks, strict=True)):
        modes = ["train"] + (["retrain"] if task.retrain_epochs > 0 else [])
        for mode in modes:
            trainable = phase_parameters(model, spec.name, i == 0 and mode == "train")
            dense = sum(p.numel() * 4 for n, p in trainable.items() if n not in tables)
            item = tuple(Table(n, p.shape[0], p[0].numel()) for n, p in trainable.items() if n in tables)
            count = sum(p.numel() for p in trainable.values())
            shapes.append(PhaseShape(spec.name, spec.kind, mode, dense, item, count))
    for p in model.parameters():
        p.requires_grad_(False)
    return shapes
