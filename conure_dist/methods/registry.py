"""One record per training method: Conure, Conure- and the baselines it is compared with.

Every method trains T1 on the whole model first (Conure's first phase). A record then says what
happens for each later task, as data that the runners read, instead of tests on the method's name:

=============  =================  ==============  =======================  ===========  =====
method         trains             starts from     serves task t with       backbones    ckpts
=============  =================  ==============  =======================  ===========  =====
conure         free_weights       current         its owned weights        1            yes
conure_minus   free_weights       current         (scored before pruning)  1            yes
finetune       whole_model        current         the one shared model     1 (forgets)  no
stl            whole_model        first_task      its own copy             N            no
finesmax       head               current         T1's backbone            1            no
sinmo          whole_model        fresh_init      its own copy             N            no
peterrec       head_and_patches   current         T1's backbone + patches  1            no
mtl            whole_model        first_task      its own copy             N            no
               (+ w x T1's loss, T1's head copied per task)
=============  =================  ==============  =======================  ===========  =====

This module imports nothing of the project: the config validates ``method.name`` against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Trains = Literal["free_weights", "whole_model", "head", "head_and_patches"]
StartsFrom = Literal["current", "first_task", "fresh_init"]
ServeView = Literal["infer", "dense"]
Runner = Literal["continual", "baseline"]


@dataclass(frozen=True)
class Method:
    """What a method trains, serves, stores and reports for every task after the first."""

    name: str
    trains: Trains
    """What trains for a later task: Conure's free conv weights (and the task's head); the whole
    model; the task's head only; the head and the task's PeterRec patches."""
    starts_from: StartsFrom
    """The backbone weights a later task starts from: the current ones, a copy of T1's, or a fresh
    initialisation (seeded per task)."""
    serve_view: ServeView
    """The ``MaskedModel`` view that serves each task: Conure's inference view (the weights the
    task and earlier ones own), or the dense backbone as it is."""
    backbone_per_task: bool
    """Each task keeps (and is served by) its own copy of the backbone."""
    keeps_checkpoints: bool
    """Checkpoints are written, so an interrupted run resumes (``--resume``)."""
    runner: Runner
    """The loop that runs it: ``continual`` (Conure's: train, prune, retrain; ``train.loop``) or
    ``baseline`` (one train phase per task; ``train.baselines``)."""
    before_pruning: bool = False
    """The report scores each task as it was before its own pruning and retraining (Conure-)."""
    report_from: str | None = None
    """A method whose run yields this one's report too (seen before pruning): an experiment that
    lists both runs it once."""
    joint_weight: str | None = None
    """The ``method`` config field that weights T1's loss, added to every later task's loss (MTL);
    None: no joint loss."""
    compared_with: tuple[str, ...] = ()
    """The methods an experiment's report pairs this one against, task by task."""

    @property
    def patches(self) -> bool:
        """Later tasks get PeterRec's model patches around the backbone's convs."""
        return self.trains == "head_and_patches"

    @property
    def trains_backbone(self) -> bool:
        """A later task trains every backbone weight (not Conure's free ones only)."""
        return self.trains == "whole_model"

    @property
    def partitions_backbone(self) -> bool:
        """Tasks share one backbone through ownership (Conure): the only kind that can grow it."""
        return self.trains == "free_weights"

    @property
    def forgets(self) -> bool:
        """Later tasks retrain the one backbone that serves every task: earlier tasks drift."""
        return self.trains_backbone and not self.backbone_per_task


_CONURE = dict(
    trains="free_weights",
    starts_from="current",
    serve_view="infer",
    backbone_per_task=False,
    keeps_checkpoints=True,
    runner="continual",
)
_BASELINE = dict(serve_view="dense", keeps_checkpoints=False, runner="baseline")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("conure", **_CONURE, compared_with=("finesmax", "stl")),
        Method("conure_minus", **_CONURE, before_pruning=True, report_from="conure"),
        Method("finetune", **_BASELINE, trains="whole_model", starts_from="current", backbone_per_task=False),
        Method("stl", **_BASELINE, trains="whole_model", starts_from="first_task", backbone_per_task=True),
        Method("finesmax", **_BASELINE, trains="head", starts_from="current", backbone_per_task=False),
        Method("sinmo", **_BASELINE, trains="whole_model", starts_from="fresh_init", backbone_per_task=True),
        Method("peterrec", **_BASELINE, trains="head_and_patches", starts_from="current", backbone_per_task=False),
        Method(
            "mtl",
            **_BASELINE,
            trains="whole_model",
            starts_from="first_task",
            backbone_per_task=True,
            joint_weight="mtl_t1_weight",
        ),
    )
}
"""Every method, by name, in the order the config lists them."""

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)

DEFAULT_METHOD = METHOD_NAMES[0]
"""What a config that names no method runs (and what a checkpoint without one was trained with)."""
