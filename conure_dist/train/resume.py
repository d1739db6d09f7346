"""Continuing a run from its newest intact checkpoint: model, ownership, progress and, for a
checkpoint taken inside a phase, the optimizer, RNG and best-epoch state.

Any checkpoint resumes on any number of processes (elastic resume). Batch sizes are global and
the phase's step counts global batches, so the data position carries over; the optimizer state
is whole under DDP (rank 0's ``optimizer.pt``), and ZeRO's per-rank parts are re-partitioned
for the new world (``deepspeed_engine.reshard_zero_state``). Only switching between a sharded
(ZeRO-1/2) and a whole (DDP, ZeRO-0) optimizer state inside a phase is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from conure_dist.checkpoint.checkpointer import Checkpointer
from conure_dist.checkpoint.format import Checkpoint, optimizer_part_name
from conure_dist.config import RunConfig, config_changes
from conure_dist.continual.growth import apply_growth
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.dist import DistInfo
from conure_dist.errors import UserError
from conure_dist.model import ConureModel
from conure_dist.train.batches import sum_digest_over_ranks
from conure_dist.train.deepspeed_engine import SavedShards
from conure_dist.train.engine import Engine, TorchEngine
from conure_dist.train.state import PhaseProgress, PhaseResume, RunState

log = logging.getLogger(__name__)


def check_resumed_config(ckpt: Checkpoint, cfg: RunConfig) -> None:
    """A resumed run keeps its model: a different ``model.*`` is an error naming the keys. Other
    settings of the finished part (seed, data, earlier tasks) may change, with a warning."""
    state = ckpt.meta["state"]
    finished = state["task_index"] + (state["stage"] != "start")  # the task under way counts too
    changed = {k: v for k, v in config_changes(ckpt.meta["config"], cfg.to_dict()).items()
               if not (k.startswith("tasks.") and int(k.split(".")[1]) >= finished)}
    model = [f"{k} is {now}, the checkpoint's {saved}" for k, (saved, now) in changed.items() if k.startswith("model.")]
    if model:
        raise UserError(f"{ckpt.path}: the run's checkpoints hold another model ({', '.join(model)}); "
                         "resume with the checkpoint's model.* settings, or write to another directory")
    relevant = [f"{k}={now} (was {saved})" for k, (saved, now) in changed.items()
                if k == "seed" or k.startswith(("data.", "tasks.", "method."))]
    if relevant:
        log.warning("resuming with settings that differ from the checkpoint's: %s", ", ".join(relevant))


def restore(checkpointer: Checkpointer, model: ConureModel, ownership: TaskOwnership, cfg: RunConfig,
            dist: DistInfo) -> tuple[RunState, PhaseResume | None] | None:
    """Load the newest valid checkpoint into ``model`` and ``ownership``. The configured tasks
    must start with the checkpoint's tasks in the same order; tasks listed after them are new and
    continue the sequence. None when nothing was committed yet."""
    ckpt = checkpointer.latest_valid()
    if ckpt is None:
        log.info("no committed checkpoint under %s: starting fresh", checkpointer.root)
        return None
    task_names = [t.name for t in cfg.tasks]
    saved = [t["name"] for t in ckpt.meta["tasks"]]
    if task_names[: len(saved)] != saved:
        raise UserError(f"{ckpt.path}: the checkpoint's tasks {saved} are not the first tasks of the config "
                         f"{task_names}; a resumed run may only append tasks")
    check_resumed_config(ckpt, cfg)
    apply_growth(model, ownership, ckpt.meta["state"].get("growth", []))
    new_heads = {n for n in model.state_dict() if n.split(".")[:2] in [["heads", t] for t in task_names[len(saved):]]}
    missing, unexpected = model.load_state_dict(ckpt.model, strict=False)
    if unexpected or set(missing) != new_heads:
        raise RuntimeError(f"{ckpt.path}: model state does not match the configured model "
                           f"(missing {sorted(set(missing) - new_heads)}, unexpected {sorted(unexpected)})")
    ownership.load_state_dict(ckpt.ownership)
    if ownership.checksum() != ckpt.meta["ownership_checksum"]:
        raise RuntimeError(f"{ckpt.path}: ownership records do not match their checksum")
    state = RunState.from_json(ckpt.meta["state"])
    for row in state.matrix:
        row.extend([None] * (len(task_names) - len(row)))
    log.info("resumed from %s at task %d (%s)", ckpt.path, state.task_index, state.stage)
    if state.stage.startswith("in_"):
        check_phase_resumable(ckpt, cfg, dist)
    return state, phase_resume_from(ckpt, state, dist)


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
        log.warning("resuming inside a phase on %d processes from a checkpoint of %d with data.partition=%s "
                    "(the checkpoint's run: %s): with range partitioning each rank's share of the data depends on "
                    "the number of processes, so the rest of this epoch draws other batches than the "
                    "uninterrupted run would (some instances twice, some not at all); later epochs are whole. "
                    "data.partition=stride repeats the uninterrupted run's batches on any number of processes",
                    dist.world_size, saved_world, cfg.data.partition, saved_partition)


def _layout_mismatch(ckpt: Checkpoint, sharded_now: bool) -> str | None:
    """Why this run's engine cannot take the checkpoint's optimizer state, or None."""
    sharded = not ckpt.has_part("optimizer.pt")
    if sharded == sharded_now:
        return None
    saved = ckpt.meta["config"].get("dist", {})
    described = f"dist.engine={saved.get('engine', 'ddp')} dist.zero_stage={saved.get('zero_stage', 0)}"
    return (f"{ckpt.path}: this checkpoint, taken inside a phase, holds the optimizer state "
            f"{'sharded by ZeRO-1/2' if sharded else 'whole (DDP or ZeRO-0)'} ({described}), and this run's "
            f"engine keeps it {'sharded' if sharded_now else 'whole'}: resume it with {described} (on any "
            "number of processes), or change engines from a checkpoint taken between phases")


def phase_progress_to_save(progress: PhaseProgress, dist: DistInfo) -> dict[str, Any]:
    """A phase's position as a mid-phase checkpoint keeps it (collective): every rank's part of
    the epoch's data fingerprint summed, since only rank 0 writes it; ``phase_resume_from``
    gives the sum back to rank 0 alone, so that the epoch's fingerprint comes out right on any
    number of processes. The loss total is the global batches' and the same on every rank."""
    saved = dataclasses.asdict(progress)
    saved["data_digest"] = sum_digest_over_ranks(progress.data_digest, dist)
    return saved


def phase_resume_from(ckpt: Checkpoint, state: RunState, dist: DistInfo) -> PhaseResume | None:
    """The optimizer, RNG and best-epoch state of a checkpoint taken inside a phase, for any
    number of processes. An unsharded optimizer state is read whole; a ZeRO one is handed to the
    engine as every saving rank's part (read on demand): the engine reads only its own when
    the world size is the same and re-partitions them otherwise."""
    if not state.stage.startswith("in_"):
        return None
    assert state.phase is not None
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
            return ckpt.read_part("optimizer.pt", weights_only=isinstance(engine, TorchEngine))

        # DeepSpeed's ZeRO state holds Python objects besides tensors; it is our own
        # checksummed file, so it is loaded without the weights-only restriction.
        def read(rank: int) -> dict:
            return ckpt.read_part(optimizer_part_name(rank, True), weights_only=False)

        return {"shards": SavedShards(ckpt.meta["world_size"], read)}

    return PhaseResume(progress=progress, generator_state=tensors["generator"],
                       best_state=tensors["best"] or None, engine_state=engine_state)
