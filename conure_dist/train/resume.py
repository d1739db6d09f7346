"""Continuing a run from its newest intact checkpoint: model, ownership, progress and, for a
checkpoint taken inside a phase, the optimizer, RNG and best-epoch state."""

from __future__ import annotations

import logging

from conure_dist.config import RunConfig, config_changes
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.dist import DistInfo
from conure_dist.model import ConureModel
from conure_dist.train.checkpoint import Checkpoint, Checkpointer, optimizer_part_name
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
        raise ValueError(f"{ckpt.path}: the run's checkpoints hold another model ({', '.join(model)}); "
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
        raise ValueError(f"{ckpt.path}: the checkpoint's tasks {saved} are not the first tasks of the config "
                         f"{task_names}; a resumed run may only append tasks")
    check_resumed_config(ckpt, cfg)
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
    return state, phase_resume_from(ckpt, state, dist)


def phase_resume_from(ckpt: Checkpoint, state: RunState, dist: DistInfo) -> PhaseResume | None:
    """The optimizer, RNG and best-epoch state of a checkpoint taken inside a phase."""
    if not state.stage.startswith("in_"):
        return None
    if ckpt.meta["world_size"] != dist.world_size and not ckpt.has_part("optimizer.pt"):
        raise ValueError(f"{ckpt.path}: its optimizer state is sharded over {ckpt.meta['world_size']} ranks; "
                         f"resume it with the same number of processes (not {dist.world_size})")
    tensors = ckpt.read_part("phase.pt")

    def engine_state(engine: Engine) -> dict:
        # DeepSpeed's ZeRO state holds Python objects besides tensors; it is our own
        # checksummed file, so it is loaded without the weights-only restriction.
        name = optimizer_part_name(dist.rank, engine.sharded_state)
        return ckpt.read_part(name, weights_only=isinstance(engine, TorchEngine))

    return PhaseResume(progress=PhaseProgress(**state.phase), generator_state=tensors["generator"],
                       best_state=tensors["best"] or None, engine_state=engine_state)
