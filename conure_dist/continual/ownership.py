"""Which task owns which prunable weight.

One uint8 ``owner`` tensor per prunable weight tensor: 0 = free, t = kept by task t (1-based).
The per-task masks of Conure are nested (a weight kept by task s serves every task >= s and no
task < s), so this single record describes all of them and its size does not grow with the
number of tasks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

MAX_TASKS = 255


@dataclass(frozen=True)
class Capacity:
    """Fractions of all prunable weights: owned per task id, and still free."""

    owned: dict[int, float]
    free: float
    total: int


class TaskOwnership:
    """Ownership records for a set of named tensors."""

    def __init__(self, owners: dict[str, torch.Tensor]) -> None:
        for name, owner in owners.items():
            if owner.dtype != torch.uint8:
                raise ValueError(f"ownership of '{name}' must be uint8, got {owner.dtype}")
        self.owners = dict(owners)

    @classmethod
    def empty(cls, shapes: dict[str, torch.Size]) -> TaskOwnership:
        return cls({name: torch.zeros(shape, dtype=torch.uint8) for name, shape in shapes.items()})

    def add(self, shapes: dict[str, torch.Size]) -> None:
        """Records for new tensors (a grown backbone's kernels), all free."""
        for name, shape in shapes.items():
            if name in self.owners:
                raise ValueError(f"ownership of '{name}' already exists")
            self.owners[name] = torch.zeros(shape, dtype=torch.uint8)

    @property
    def names(self) -> list[str]:
        return list(self.owners)

    def num_free(self) -> int:
        return sum(int((o == 0).sum()) for o in self.owners.values())

    def last_task(self) -> int:
        return max((int(o.max()) for o in self.owners.values()), default=0)

    def capacity(self) -> Capacity:
        total = sum(o.numel() for o in self.owners.values())
        counts = torch.zeros(MAX_TASKS + 1, dtype=torch.int64)
        for owner in self.owners.values():
            counts += torch.bincount(owner.flatten().long(), minlength=MAX_TASKS + 1)
        owned = {t: counts[t].item() / total for t in range(1, MAX_TASKS + 1) if counts[t] > 0}
        return Capacity(owned=owned, free=counts[0].item() / total, total=total)

    def prune(self, task_id: int, weights: dict[str, torch.Tensor], prune_ratio: float) -> None:
        """Give task ``task_id`` the largest-magnitude (1 - prune_ratio) of the free weights.

        Decided per tensor from the fp32 weights; the rest stays free for later tasks.
        """
        if not 1 <= task_id <= MAX_TASKS:
            raise ValueError(f"task id must be in 1..{MAX_TASKS}, got {task_id}")
        if task_id <= self.last_task():
            raise ValueError(f"task {task_id} is not after the last owning task {self.last_task()}")
        for name, owner in self.owners.items():
            flat_owner = owner.view(-1)
            free_idx = (flat_owner == 0).nonzero().squeeze(1)
            num_keep = int(round((1.0 - prune_ratio) * free_idx.numel()))
            if num_keep == 0:
                continue
            magnitude = weights[name].detach().float().reshape(-1).cpu()[free_idx].abs()
            # Sort by magnitude, ties broken by position, so every rank decides the same way.
            order = torch.sort(magnitude, descending=True, stable=True).indices[:num_keep]
            flat_owner[free_idx[order]] = task_id

    def masks(self, name: str, mode: str, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean (trainable, frozen) masks of ``name`` for a phase of task ``task_id``.

        train:   trainable = free weights;         frozen = weights of tasks < t
        retrain: trainable = weights of task t;    frozen = weights of tasks < t
        infer:   trainable = none;                 frozen = weights of tasks <= t
        Anything neither trainable nor frozen is excluded (read as zero).
        """
        owner = self.owners[name]
        earlier = (owner > 0) & (owner < task_id)
        if mode == "train":
            return owner == 0, earlier
        if mode == "retrain":
            return owner == task_id, earlier
        if mode == "infer":
            return torch.zeros_like(earlier), earlier | (owner == task_id)
        raise ValueError(f"unknown view mode '{mode}'")

    def checksum(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.owners):
            digest.update(name.encode())
            digest.update(self.owners[name].contiguous().numpy().tobytes())
        return digest.hexdigest()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: owner.clone() for name, owner in self.owners.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved records into these (same names and shapes) in place: the views keep them."""
        if set(state) != set(self.owners):
            raise ValueError(f"ownership records for {sorted(state)}, expected {sorted(self.owners)}")
        for name, owner in state.items():
            self.owners[name].copy_(owner)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> TaskOwnership:
        return cls({name: owner.clone() for name, owner in state.items()})


def task_checksum(
    ownership: TaskOwnership,
    state: dict[str, torch.Tensor],
    task_id: int,
    extra_names: list[str],
    names: list[str] | None = None,
) -> str:
    """sha256 over what task ``task_id`` froze: its ownership positions, the weight values there,
    and the whole of ``extra_names`` (its head; for T1 also the shared backbone parameters).
    ``names``: the owned tensors the task reads (default all; a grown backbone's later blocks are
    not read by earlier tasks, so they leave those tasks' checksums unchanged)."""
    digest = hashlib.sha256()
    for name in sorted(ownership.owners if names is None else names):
        mine = ownership.owners[name] == task_id
        digest.update(name.encode())
        digest.update(mine.numpy().tobytes())
        digest.update(state[name].detach().cpu().float()[mine].numpy().tobytes())
    for name in sorted(extra_names):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()
