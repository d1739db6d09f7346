"""Recompute the stored checksums of every finished task's frozen weights and ownership."""

from __future__ import annotations

from dataclasses import dataclass

from conure_dist.checkpoint.format import Checkpoint
from conure_dist.continual.growth import apply_growth
from conure_dist.continual.ownership import TaskOwnership, task_checksum
from conure_dist.model import ConureModel, TaskSpec


@dataclass
class AuditResult:
    task: str
    stored: str
    recomputed: str

    @property
    def ok(self) -> bool:
        return self.stored == self.recomputed


def model_from_checkpoint(ckpt: Checkpoint) -> tuple[ConureModel, TaskOwnership]:
    """Rebuild the model from a checkpoint alone (no data needed) and load its weights strictly."""
    cfg = ckpt.meta["config"]["model"]
    specs = [TaskSpec(**s) for s in ckpt.meta["tasks"]]
    model = ConureModel(
        ckpt.meta["num_seq_items"],
        specs,
        cfg["channels"],
        cfg["kernel_size"],
        cfg["block_dilations"],
        cfg["init_std"],
        prune_embedding=cfg.get("prune_embedding", False),
    )
    apply_growth(model, None, ckpt.meta["state"].get("growth", []))
    model.load_state_dict(ckpt.model, strict=True)
    return model, TaskOwnership.from_state_dict(ckpt.ownership)


def checksum_of_task(model: ConureModel, ownership: TaskOwnership, state: dict, task_index: int) -> str:
    """``task_checksum`` of the model's task ``task_index`` (0-based, in the model's task order):
    the kernels it runs and owns, and what it froze besides (``ConureModel.frozen_with``)."""
    name = list(model.kinds)[task_index]
    return task_checksum(ownership, state, task_index + 1, model.frozen_with(name), model.prunable_names(name))


def audit_checkpoint(ckpt: Checkpoint) -> list[AuditResult]:
    """One result per finished task; a changed frozen weight or ownership entry fails its task."""
    model, ownership = model_from_checkpoint(ckpt)
    state = model.state_dict()
    names = [s["name"] for s in ckpt.meta["tasks"]]
    results = []
    for index, name in enumerate(names):
        stored = ckpt.meta["state"]["task_checksums"].get(name)
        if stored is None:
            continue
        results.append(AuditResult(name, stored, checksum_of_task(model, ownership, state, index)))
    return results
