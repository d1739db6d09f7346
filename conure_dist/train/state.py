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
    """Progress and results; plain JSON inside every checkpoint (``meta.json``'s ``state``).

    The cursor (``task_index``, ``stage``, ``phase``) says where the run stands, and each step of
    a task asks it whether it is already done (``done``): a resumed run skips what its checkpoint
    holds. ``stage`` is the cursor's form on disk, kept as earlier checkpoints wrote it."""

    task_index: int = 0
    """Index (0-based) of the task being worked on."""
    stage: str = "start"
    """Stage reached on that task: start, in_train, trained (train phase done, not yet pruned)
    or in_retrain (pruned)."""
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

    def state_dict(self) -> dict[str, Any]:
        return self.to_json()

    def load_state_dict(self, data: dict[str, Any]) -> None:
        """Take a checkpoint's state in place (every field: strict, as ``from_json``)."""
        self.__dict__.update(RunState.from_json(data).__dict__)

    # -- the cursor ---------------------------------------------------------------------
    def done(self, step: str) -> bool:
        """Whether ``step`` (train, prune) of the task under way is already done."""
        return TASK_STEPS.index(step) < _STEPS_DONE[self.stage]

    def complete(self, step: str) -> None:
        """``step`` of the task under way is done (a phase's position, if any, is over)."""
        self.stage, self.phase = _STAGE_AFTER[step], None

    def enter_phase(self, progress: dict[str, Any]) -> None:
        """A checkpoint inside a phase will hold its position ``progress`` (``PhaseProgress``)."""
        self.stage, self.phase = f"in_{progress['mode']}", progress

    def next_task(self) -> None:
        self.task_index, self.stage, self.phase = self.task_index + 1, "start", None

    @property
    def tasks_begun(self) -> int:
        """Tasks finished or under way (one whose work has left a trace in the model)."""
        return self.task_index + (self.stage != "start")

    def resume_point(self) -> dict[str, Any]:
        """Where a (resumed) run starts, as its ``start`` log event names it."""
        position = None if self.phase is None else {"epoch": self.phase["epoch"], "step": self.phase["step"]}
        return {"task_index": self.task_index, "stage": self.stage, "position": position}


TASK_STEPS = ("train", "prune")
"""The steps of a task whose completion a checkpoint can record before the task is done."""
_STEPS_DONE = {"start": 0, "in_train": 0, "trained": 1, "in_retrain": 2}
_STAGE_AFTER = {"train": "trained", "prune": "in_retrain"}
