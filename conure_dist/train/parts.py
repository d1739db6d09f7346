"""The stateful parts of a Conure run, as the checkpointer saves and loads them.

Each part registers once (``register_run_parts``) and saves and loads itself, so save and load
are one symmetric act: ``meta.json`` (the run state and what a tool needs to rebuild the model),
``model.pt`` (backbone and heads), ``ownership.pt`` and, inside a phase only, ``phase.pt`` with
the optimizer state. Parts load in that order: the model reads the growth that the run state
records, the ownership checks itself against the checksum that ``meta.json`` holds.

Any checkpoint resumes on any number of processes (elastic resume). Batch sizes are global and
the phase's step counts global batches, so the data position carries over; the optimizer state
is whole under DDP (rank 0's ``optimizer.pt``), and ZeRO's per-rank parts are re-partitioned
for the new world (``deepspeed_engine.reshard_zero_state``). Only switching between a sharded
(ZeRO-1/2) and a whole (DDP, ZeRO-0) optimizer state inside a phase is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from conure_dist.checkpoint.checkpointer import Checkpointer
from conure_dist.checkpoint.format import Checkpoint, CheckpointError, optimizer_part_name
from conure_dist.config import RunConfig, config_changes
from conure_dist.continual.growth import apply_growth
from conure_dist.dist import DistInfo
from conure_dist.errors import UserError
from conure_dist.rundir import result_changes
from conure_dist.train.batches import sum_digest_over_ranks
from conure_dist.train.context import RunContext, task_specs
from conure_dist.train.deepspeed_engine import SavedShards
from conure_dist.train.engine import Engine
from conure_dist.train.phase import Phase
from conure_dist.train.state import PhaseProgress, PhaseResume, RunState

log = logging.getLogger(__name__)


class RunMeta:
    """``meta.json``: the run state (progress and results) and what a tool needs to rebuild the
    model. Loading it checks the configuration against the checkpoint's: the configured tasks
    must start with the checkpoint's, in order (later ones are appended), and the model is the same."""

    def __init__(self, ctx: RunContext, state: RunState, force: bool = False) -> None:
        self.ctx, self.state, self.force = ctx, state, force
        self.loaded: dict[str, Any] | None = None
        """The checkpoint's meta, once loaded (what later parts check themselves against)."""

    def state_dict(self) -> dict[str, Any]:
        ctx = self.ctx
        return {
            "state": self.state.to_json(),
            "config": ctx.cfg.to_dict(),
            "data_root": ctx.cfg.data.root,
            "tasks": [s.__dict__ for s in task_specs(ctx.infos)],
            "num_seq_items": ctx.manifest.num_seq_items,
            "seq_len": ctx.manifest.seq_len,
            "world_size": ctx.dist.world_size,
            "ownership_checksum": ctx.ownership.checksum(),
        }

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        names = [t.name for t in self.ctx.cfg.tasks]
        saved = [t["name"] for t in meta["tasks"]]
        if names[: len(saved)] != saved:
            raise UserError(
                f"the checkpoint's tasks {saved} are not the first tasks of the config {names}; "
                "a resumed run may only append tasks"
            )
        check_resumed_config(meta, self.ctx.cfg, self.force)
        self.state.load_state_dict(meta["state"])
        for row in self.state.matrix:
            row.extend([None] * (len(names) - len(row)))
        self.loaded = meta

    @property
    def appended_tasks(self) -> list[str]:
        """The configured tasks after the loaded checkpoint's."""
        assert self.loaded is not None
        return [t.name for t in self.ctx.cfg.tasks][len(self.loaded["tasks"]) :]


class ModelWeights:
    """``model.pt``: the backbone, grown as the run state records, and every task's head. Loaded
    strictly, but for the heads of tasks appended after the checkpoint's (they keep their fresh
    initial values)."""

    def __init__(self, ctx: RunContext, meta: RunMeta) -> None:
        self.ctx, self.meta = ctx, meta

    def state_dict(self) -> dict[str, Any]:
        return self.ctx.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        model = self.ctx.model
        apply_growth(model, self.ctx.ownership, self.meta.state.growth)
        appended = [["heads", t] for t in self.meta.appended_tasks]
        new_heads = {n for n in model.state_dict() if n.split(".")[:2] in appended}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != new_heads:
            raise CheckpointError(
                f"model state does not match the configured model (missing "
                f"{sorted(set(missing) - new_heads)}, unexpected {sorted(unexpected)})"
            )


class OwnershipRecords:
    """``ownership.pt``: who owns each prunable weight; checked against ``meta.json``'s checksum."""

    def __init__(self, ctx: RunContext, meta: RunMeta) -> None:
        self.ctx, self.meta = ctx, meta

    def state_dict(self) -> dict[str, Any]:
        return self.ctx.ownership.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ownership = self.ctx.ownership
        ownership.load_state_dict(state)
        assert self.meta.loaded is not None
        if ownership.checksum() != self.meta.loaded["ownership_checksum"]:
            raise CheckpointError("ownership records do not match their checksum")


class PhaseState:
    """A phase in progress: ``phase.pt`` (its epoch's RNG state, the best epoch's parameters) and
    its optimizer state (rank 0's whole ``optimizer.pt``, or every rank's ZeRO part: either
    resumes on any number of processes). A checkpoint taken inside a phase saves them (``save_in``);
    loading one keeps them for that phase, which takes them when it starts (``resume_for``)."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, state: RunState) -> None:
        self.cfg, self.dist, self.state = cfg, dist, state
        self.live: Phase | None = None
        """The phase being saved (only while ``save_in`` saves it)."""
        self.pending: PhaseResume | None = None

    def files(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.live is None:
            return {}, {}
        engine = self.live.engine
        mine = (
            {optimizer_part_name(self.dist.rank, engine.sharded_state): engine}
            if engine.sharded_state or self.dist.is_main
            else {}
        )
        return {"phase.pt": self.live.tensors}, mine

    def load_from(self, ckpt: Checkpoint) -> None:
        self.pending = None
        if ckpt.has_part("phase.pt"):
            check_phase_resumable(ckpt, self.cfg, self.dist)
            self.pending = phase_resume_from(ckpt, self.state, self.dist)

    def resume_for(self, mode: str) -> PhaseResume | None:
        """The loaded position of the task's ``mode`` phase (once), or None: it starts afresh."""
        pending = self.pending
        if pending is None or pending.progress.mode != mode:
            return None
        self.pending = None
        return pending

    def save_in(self, phase: Phase, save: Callable[[str], None]) -> None:
        """Save a checkpoint inside ``phase`` (collective) through ``save(tag)``."""
        p = phase.progress
        self.state.enter_phase(phase_progress_to_save(p, self.dist))
        self.live = phase
        try:
            save(f"{phase.info.name}-{phase.mode}-e{p.epoch + 1}-s{p.step}")
        finally:
            self.live = None


def register_run_parts(
    checkpointer: Checkpointer, ctx: RunContext, state: RunState, phases: PhaseState, force: bool = False
) -> None:
    """Register the run's parts, in the order they load (``force``: see ``check_resumed_config``)."""
    meta = RunMeta(ctx, state, force)
    checkpointer.register("meta.json", meta)
    checkpointer.register("model.pt", ModelWeights(ctx, meta))
    checkpointer.register("ownership.pt", OwnershipRecords(ctx, meta))
    checkpointer.register_group(phases)


def check_resumed_config(meta: dict[str, Any], cfg: RunConfig, force: bool = False) -> None:
    """A resumed run keeps its model: a different ``model.*`` is an error naming the keys. Other
    settings that change the results of the part already done (seed, data, the method, tasks
    begun) are an error too, unless ``force`` (then a warning): the report would claim them for
    results made with the checkpoint's. Tasks not begun yet may change freely."""
    begun = RunState.from_json(meta["state"]).tasks_begun
    changed = {
        k: v
        for k, v in config_changes(meta["config"], cfg.to_dict()).items()
        if not (k.startswith("tasks.") and int(k.split(".")[1]) >= begun)
    }
    model = [f"{k} is {now}, the checkpoint's {saved}" for k, (saved, now) in changed.items() if k.startswith("model.")]
    if model:
        raise UserError(
            f"the run's checkpoints hold another model ({', '.join(model)}); "
            "resume with the checkpoint's model.* settings, or write to another directory"
        )
    relevant = [
        f"{k}={now} (was {saved})"
        for k, (saved, now) in result_changes(meta["config"], cfg.to_dict()).items()
        if k in changed
    ]
    if not relevant:
        return
    message = f"resuming with settings that differ from the checkpoint's: {', '.join(relevant)}"
    if not force:
        raise UserError(
            f"{message}; resume with the checkpoint's settings, write to another directory, or add --force "
            "(the report then names the new settings for results partly made with the old)"
        )
    log.warning("%s (--force)", message)


def _sharded(engine: str, zero_stage: int) -> bool:
    return engine == "deepspeed" and zero_stage > 0


def check_phase_resumable(ckpt: Checkpoint, cfg: RunConfig, dist: DistInfo) -> None:
    """Before any work: refuse a mid-phase checkpoint whose optimizer state this run's engine
    cannot take (sharded by ZeRO-1/2 vs whole), and say what a change of world size does to the
    data of the epoch under way."""
    message = _layout_mismatch(ckpt, _sharded(cfg.dist.engine, cfg.dist.zero_stage))
    if message:
        raise UserError(message)
    saved_world = ckpt.meta["world_size"]
    if saved_world == dist.world_size:
        return
    log.info("resuming inside a phase on %d processes from a checkpoint of %d", dist.world_size, saved_world)
    saved_partition = ckpt.meta["config"].get("data", {}).get("partition", "auto")
    # One process reads the one global stream whatever the partition; several read it strided
    # (stride) or each its own range of it (range; auto picks range when a split has at least as
    # many shards as processes), and then the global batches depend on the number of processes.
    if (saved_world > 1 and saved_partition != "stride") or (dist.world_size > 1 and cfg.data.partition != "stride"):
        log.warning(
            "resuming inside a phase on %d processes from a checkpoint of %d with data.partition=%s "
            "(the checkpoint's run: %s): with range partitioning each rank's share of the data depends on "
            "the number of processes, so the rest of this epoch draws other batches than the "
            "uninterrupted run would (some instances twice, some not at all); later epochs are whole. "
            "data.partition=stride repeats the uninterrupted run's batches on any number of processes",
            dist.world_size,
            saved_world,
            cfg.data.partition,
            saved_partition,
        )


def _layout_mismatch(ckpt: Checkpoint, sharded_now: bool) -> str | None:
    """Why this run's engine cannot take the checkpoint's optimizer state, or None."""
    sharded = not ckpt.has_part("optimizer.pt")
    if sharded == sharded_now:
        return None
    saved = ckpt.meta["config"].get("dist", {})
    described = f"dist.engine={saved.get('engine', 'ddp')} dist.zero_stage={saved.get('zero_stage', 0)}"
    return (
        f"{ckpt.path}: this checkpoint, taken inside a phase, holds the optimizer state "
        f"{'sharded by ZeRO-1/2' if sharded else 'whole (DDP or ZeRO-0)'} ({described}), and this run's "
        f"engine keeps it {'sharded' if sharded_now else 'whole'}: resume it with {described} (on any "
        "number of processes), or change engines from a checkpoint taken between phases"
    )


def phase_progress_to_save(progress: PhaseProgress, dist: DistInfo) -> dict[str, Any]:
    """A phase's position as a mid-phase checkpoint keeps it (collective): every rank's part of
    the epoch's data fingerprint summed, since only rank 0 writes it; ``phase_resume_from``
    gives the sum back to rank 0 alone, so that the epoch's fingerprint comes out right on any
    number of processes. The loss total is the global batches' and the same on every rank."""
    saved = dataclasses.asdict(progress)
    saved["data_digest"] = sum_digest_over_ranks(progress.data_digest, dist)
    return saved


def phase_resume_from(ckpt: Checkpoint, state: RunState, dist: DistInfo) -> PhaseResume:
    """The optimizer, RNG and best-epoch state of a checkpoint taken inside a phase, for any
    number of processes. An unsharded optimizer state is read whole; a ZeRO one is handed to the
    engine as every saving rank's part (read on demand): the engine reads only its own when
    the world size is the same and re-partitions them otherwise."""
    assert state.phase is not None, f"{ckpt.path} holds phase.pt but no phase position"
    tensors = ckpt.read_part("phase.pt")
    progress = PhaseProgress(**state.phase)
    if not dist.is_main:
        # The saved fingerprint is the sum of every saving rank's part (rank 0's own part in
        # checkpoints written before that): it counts once, on rank 0.
        progress.data_digest = 0

    def engine_state(engine: Engine) -> dict:
        message = _layout_mismatch(ckpt, engine.sharded_state)
        if message:
            raise UserError(message)
        if not engine.sharded_state:
            return ckpt.read_part("optimizer.pt", engine.state_classes)

        # DeepSpeed's ZeRO state holds a few of its own classes besides tensors: those alone
        # are allowed (a checksum does not vouch for a file whose COMMIT can be rewritten too).
        def read(rank: int) -> dict:
            return ckpt.read_part(optimizer_part_name(rank, True), engine.state_classes)

        return {"shards": SavedShards(ckpt.meta["world_size"], read)}

    return PhaseResume(
        progress=progress,
        generator_state=tensors["generator"],
        best_state=tensors["best"] or None,
        engine_state=engine_state,
    )
