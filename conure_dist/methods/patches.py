"""PeterRec's model patches, added to a ``ConureModel`` from outside it.

PeterRec (Yuan et al., SIGIR 2020) keeps T1's backbone frozen and gives each later task a small
bottleneck after every conv: ``h + W2 relu(W1 h)``. ``add_patches`` creates them as the model's
``patches`` submodule (state-dict keys ``patches.<task>.<i>.{down,up}.{weight,bias}``, patch ``2b``
after block b's conv1, ``2b + 1`` after its conv2) and applies them with forward hooks: the
model's own code knows nothing of them, as it knows nothing of Conure's masks.

A call of the model for task t (``forward``: training, validation, evaluation, scoring) runs
t's patches; a task without patches (T1) runs none. ``ConureModel.represent``, which bypasses
``forward``, runs none either: ``conure embed`` and the serving paths refuse patched models.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from conure_dist.model import ConureModel


class ModelPatch(nn.Module):
    """PeterRec's model patch: the bottleneck ``W2 relu(W1 h)`` added to a conv's output ``h``.
    ``W2`` starts at zero, so a new patch leaves the pretrained network unchanged."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(channels, dim)
        self.up = nn.Linear(dim, channels)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(h)))


class _Patching:
    """The hooks: the model's pre-hook notes which task a call runs; each conv's hook adds that
    task's patch to the conv's output."""

    def __init__(self, patches: nn.ModuleDict) -> None:
        self.patches = patches
        self.task: str | None = None

    def enter(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        task = args[1] if len(args) > 1 else kwargs["task"]  # ConureModel.forward(seq, task, ...)
        self.task = task if task in self.patches else None

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.task = None

    def conv_hook(self, index: int):
        def add_patch(conv: nn.Module, args: tuple, h: torch.Tensor) -> torch.Tensor | None:
            if self.task is None:
                return None
            return h + self.patches[self.task][index](h)

        return add_patch


def add_patches(model: ConureModel, tasks: list[str], dim: int) -> None:
    """Give each of ``tasks`` one ``dim``-wide patch after every conv of ``model``'s backbone.

    Call it right after building the model: the patches draw their initial values from torch's
    global generator, after the backbone and heads (as PeterRec's patches always have here).

    With no ``tasks`` the container is still registered, empty: the model's state-dict metadata,
    and so the bytes of a checkpoint's ``model.pt``, stay those of the runs written when every
    model held one."""
    convs = [conv for block in model.backbone.blocks for conv in (block.conv1, block.conv2)]
    channels = model.backbone.embedding.embedding_dim
    model.patches = nn.ModuleDict({task: nn.ModuleList(ModelPatch(channels, dim) for _ in convs) for task in tasks})
    if not tasks:
        return
    patching = _Patching(model.patches)
    model.register_forward_pre_hook(patching.enter, with_kwargs=True)
    model.register_forward_hook(patching.leave)
    for i, conv in enumerate(convs):
        conv.register_forward_hook(patching.conv_hook(i))


def patched_tasks(model: nn.Module) -> list[str]:
    """The tasks that carry patches (none for a model ``add_patches`` never touched)."""
    patches = getattr(model, "patches", None)
    return list(patches) if isinstance(patches, nn.ModuleDict) else []


def patch_names(model: nn.Module, task: str) -> list[str]:
    """The parameter names (of ``model``) of ``task``'s patches; none for an unpatched task."""
    if task not in patched_tasks(model):
        return []
    return [f"patches.{task}.{n}" for n, _ in model.patches[task].named_parameters()]
