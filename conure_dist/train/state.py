"""What a run carries from task to task and phase to phase, and what a checkpoint restores.

Each piece saves and loads itself (``state_dict`` / ``load_state_dict``, or plain JSON), so the
checkpointer only writes named parts and never needs to know what is in them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from conure_dist.train.engine import Engine


class CapacityError(RuntimeError):
    """No free conv weights are left for a new task."""


class DivergedError(RuntimeError):
    """A training loss became NaN or infinite."""


@dataclass
class PhaseProgress:
    """Where a phase stands; plain JSON in mid-phase checkpoints."""

    mode: str
    epoch: int = 0
    """Epoch in progress (0-based)."""
    step: int = 0
    """Optimizer steps already taken in that epoch (the data position)."""
    loss_total: float = 0.0
    data_digest: int = 0
    """This rank's part of the epoch's data fingerprint so far (``batches.batch_digest``), as an
    unsigned 64-bit integer."""
    best_value: float = float("-inf")
    since_best: int = 0
    """Validations in a row that did not beat ``best_value`` (early stopping: ``train.patience``)."""
    epochs_log: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PhaseTensors:
    """The tensors of a phase in progress (``phase.pt``): the epoch's RNG state and the
    parameters of the best validation epoch so far."""

    generator: torch.Generator | None = None
    best: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "best": self.best or {}}


@dataclass
class PhaseResume:
    """What a mid-phase checkpoint restores besides the model and ownership."""

    progress: PhaseProgress
    generator_state: torch.Tensor
    best_state: dict[str, torch.Tensor] | None
    engine_state: Callable[[Engine], dict]
    """Reads this rank's optimizer part once the engine (and so its sharding) is known."""


@dataclass
class RunState:
    """Progress and results; plain JSON inside every checkpoint."""

    task_index: int = 0
    """Index (0-based) of the task being worked on."""
    stage: str = "start"
    """Stage reached on that task: start, in_train, trained (train phase done, not yet pruned)
    or in_retrain."""
    matrix: list[list[float | None]] = field(default_factory=list)
    metrics: list[dict[str, dict[str, float]]] = field(default_factory=list)
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    before_prune: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each task's test metrics right after its train phase (Conure-: no prune, no retrain)."""
    capacity: list[dict[str, Any]] = field(default_factory=list)
    task_checksums: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    num_checkpoints: int = 0
    global_step: int = 0
    """Optimizer steps taken over all phases (the training curves' x axis), carried by resumes."""
    phase: dict[str, Any] | None = None
    """PhaseProgress of a checkpoint taken inside a phase (stage in_train / in_retrain)."""
    growth: list[dict[str, Any]] = field(default_factory=list)
    """Residual blocks appended to the backbone, in order (``continual.growth``)."""
    prune_search: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per task with ``prune_ratio: auto``: the unpruned validation score, the ratios tried with
    their scores, and the ratio chosen."""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        return cls(**data)
