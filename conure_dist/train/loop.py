"""Conure's continual loop: for each task train -> prune -> retrain -> evaluate -> checkpoint,
resumable from any checkpoint, inside a phase too."""

from __future__ import annotations

import time
from typing import Any

from conure_dist.checkpoint.checkpointer import Checkpointer
from conure_dist.checkpoint.format import optimizer_part_name
from conure_dist.config import RunConfig
from conure_dist.continual.growth import grow_for_task
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.dist import DistInfo, barrier
from conure_dist.errors import UserError
from conure_dist.train.context import build_context, task_specs
from conure_dist.train.evaluate import reference_metrics
from conure_dist.train.metrics import primary_metric_name
from conure_dist.train.phase import Phase
from conure_dist.train.prune_search import choose_prune_ratio
from conure_dist.train.resume import phase_progress_to_save, restore
from conure_dist.train.state import CapacityError, PhaseResume, RunState


def capacity_entry(task: str, ownership: TaskOwnership) -> dict[str, Any]:
    cap = ownership.capacity()
    return {"task": task, "owned_fraction": {str(k): v for k, v in cap.owned.items()}, "free_fraction": cap.free,
            "num_weights": cap.total}


class ContinualLoop:
    """One run of every configured task, from the start or (``resume``) from the newest intact
    checkpoint under ``out``."""

    def __init__(self, cfg: RunConfig, out: str, dist: DistInfo, resume: bool = False) -> None:
        self.start = time.perf_counter()
        self.cfg, self.out, self.dist, self.resume = cfg, out, dist, resume
        self.trainer = build_context(cfg, out, dist)
        self.checkpointer = Checkpointer(out, dist, keep=cfg.train.keep_checkpoints,
                                         async_writes=cfg.train.async_checkpoint)
        self.state, self.phase_resume = RunState(), None
        if resume:
            restored = restore(self.checkpointer, self.trainer.model, self.trainer.ownership, cfg, dist)
            if restored is not None:
                self.state, self.phase_resume = restored
        elif self.checkpointer.committed():
            raise UserError(f"{self.checkpointer.root} already holds checkpoints of a run: add --resume to continue "
                             "it, or choose another --out")
        self.state.num_checkpoints = max(self.state.num_checkpoints, self.checkpointer.last_index())
        # Every rank has read the last index before any rank writes the next checkpoint's parts.
        barrier(dist)
        self.trainer.global_step = self.state.global_step
        self.elapsed_before = self.state.wall_seconds

    # -- checkpoints -------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """``meta.json``: progress and results, and what a tool needs to rebuild the model."""
        trainer = self.trainer
        return {"state": self.state.to_json(), "config": self.cfg.to_dict(), "data_root": self.cfg.data.root,
                "tasks": [s.__dict__ for s in task_specs(trainer.infos)],
                "num_seq_items": trainer.manifest.num_seq_items, "seq_len": trainer.manifest.seq_len,
                "world_size": self.dist.world_size, "ownership_checksum": trainer.ownership.checksum()}

    def checkpoint(self, tag: str, parts: dict[str, Any] | None = None, rank_parts: dict[str, Any] | None = None) -> None:
        """Save the model, ownership and progress, plus ``parts`` (rank 0) and ``rank_parts``."""
        self.state.wall_seconds = self._elapsed()
        self.state.global_step = self.trainer.global_step
        self.state.num_checkpoints += 1
        main = {"model.pt": self.trainer.model, "ownership.pt": self.trainer.ownership, "meta.json": self.meta(),
                **(parts or {})}
        self.checkpointer.save(self.state.num_checkpoints, tag, main, rank_parts)
        self.trainer.logger.log("checkpoint", tag=tag)
        self.trainer.logger.flush()

    def checkpoint_phase(self, phase: Phase) -> None:
        """A checkpoint inside a phase: its position, RNG, best parameters and optimizer state
        (rank 0's whole, or every rank's ZeRO part: either resumes on any number of processes)."""
        p = phase.progress
        self.state.stage, self.state.phase = f"in_{phase.mode}", phase_progress_to_save(p, self.dist)
        engine = phase.engine
        optimizer = {optimizer_part_name(self.dist.rank, engine.sharded_state): engine} \
            if engine.sharded_state or self.dist.is_main else None
        self.checkpoint(f"{phase.info.name}-{phase.mode}-e{p.epoch + 1}-s{p.step}", {"phase.pt": phase.tensors},
                        optimizer)

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the remaining tasks in order and return the report (also written to ``out``)."""
        state = self.state
        position = None if state.phase is None else {"epoch": state.phase["epoch"], "step": state.phase["step"]}
        self.trainer.logger.log("start", config=self.cfg.to_dict(), world_size=self.dist.world_size,
                                resume=self.resume, task_index=state.task_index, stage=state.stage, position=position)
        for i in range(state.task_index, len(self.cfg.tasks)):
            self._task(i)
        self.checkpointer.wait()  # the last checkpoint is committed before the report appears
        state.wall_seconds = self._elapsed()
        model, ownership = self.trainer.model, self.trainer.ownership
        storage = {"num_backbones": 1, "stored_parameters": sum(p.numel() for p in model.parameters()),
                   "ownership_bytes": sum(o.numel() * o.element_size() for o in ownership.owners.values())}
        return self.trainer.finish(state, storage, self.out)

    def _grow(self, i: int) -> None:
        """Append blocks before task ``i`` if it would start short of free weights (checkpointed:
        a resume rebuilds the same backbone from ``RunState.growth``)."""
        trainer, name = self.trainer, self.trainer.infos[i].name
        events = grow_for_task(trainer.model, trainer.ownership, name, i, self.cfg.seed, self.cfg.continual)
        if events:
            self.state.growth.extend(events)
            for event in events:
                trainer.logger.log("grow", **event)
            self.checkpoint(f"{name}-grown")

    def _prune_ratio(self, i: int) -> float:
        """Task ``i``'s prune ratio: as configured, or (``auto``) searched once after its train
        phase and kept in the run state, so that a resume does not search again."""
        task_cfg, name = self.cfg.tasks[i], self.trainer.infos[i].name
        if task_cfg.prune_ratio != "auto":
            return task_cfg.prune_ratio
        if name not in self.state.prune_search:
            unpruned = next(h["best_valid"] for h in reversed(self.state.history)
                            if h["task"] == name and h["phase"] == "train")
            self.state.prune_search[name] = choose_prune_ratio(self.trainer, i, task_cfg, unpruned)
            self.checkpoint(f"{name}-ratio")
        return self.state.prune_search[name]["chosen"]

    def _resume_for(self, stage: str) -> PhaseResume | None:
        return self.phase_resume if self.state.stage == stage else None

    def _task(self, i: int) -> None:
        trainer, state, cfg = self.trainer, self.state, self.cfg
        task_cfg, info, ownership = cfg.tasks[i], trainer.infos[i], trainer.ownership
        if state.stage in ("start", "in_train"):
            if state.stage == "start":
                self._grow(i)
            if state.stage == "start" and ownership.num_free() == 0:
                raise CapacityError(f"task '{info.name}' cannot start: every conv weight is owned by an earlier "
                                    "task; lower the earlier prune ratios or set continual.min_free_fraction")
            state.history.append(trainer.run_phase(i, "train", task_cfg, self._resume_for("in_train"),
                                                   self.checkpoint_phase))
            state.before_prune[info.name] = trainer.evaluate_view(i, "train")
            state.stage, state.phase = "trained", None
            self.checkpoint(f"{info.name}-trained")
        if ownership.last_task() < i + 1:
            trainer.prune(i, self._prune_ratio(i))
        if task_cfg.retrain_epochs > 0:
            state.history.append(trainer.run_phase(i, "retrain", task_cfg, self._resume_for("in_retrain"),
                                                   self.checkpoint_phase))
        if info.name not in state.reference:
            state.reference[info.name] = reference_metrics(trainer.manifest, info, "test", cfg.train.topk)
        row_metrics = trainer.evaluate_all(i)
        metric_names = [primary_metric_name(t.kind, cfg.train.topk) for t in trainer.infos]
        state.metrics.append(row_metrics)
        state.matrix.append([row_metrics[t.name][metric_names[j]] if j <= i else None
                             for j, t in enumerate(trainer.infos)])
        state.capacity.append({**capacity_entry(info.name, ownership), "prune_ratio": self._prune_ratio(i),
                               "num_blocks": trainer.model.depth(info.name)})
        state.task_checksums[info.name] = trainer.checksum_of_task(i)
        trainer.logger.log("task_done", task=info.name, test=row_metrics[info.name], capacity=state.capacity[-1],
                           global_step=trainer.global_step)
        state.task_index, state.stage, state.phase = i + 1, "start", None
        self.checkpoint(f"{info.name}-done")


def run_conure(cfg: RunConfig, out: str, dist: DistInfo, resume: bool = False) -> dict[str, Any]:
    """Run every configured task in order and return the report (also written to ``out``)."""
    return ContinualLoop(cfg, out, dist, resume).run()
