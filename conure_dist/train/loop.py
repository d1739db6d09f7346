"""Conure's continual loop: for each task train -> prune -> retrain -> evaluate -> checkpoint,
resumable from any checkpoint, inside a phase too."""

from __future__ import annotations

import signal
import time
from typing import Any

from conure_dist.checkpoint.checkpointer import Checkpointer
from conure_dist.config import RunConfig
from conure_dist.continual.audit import verify_run
from conure_dist.continual.growth import grow_for_task
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.dist import DistInfo, barrier
from conure_dist.errors import UserError
from conure_dist.fs import url_of
from conure_dist.train.context import build_context
from conure_dist.train.evaluate import reference_metrics
from conure_dist.train.metrics import primary_metric_name
from conure_dist.train.parts import PhaseState, register_run_parts
from conure_dist.train.preemption import STOP, Preempted
from conure_dist.train.prune_search import choose_prune_ratio
from conure_dist.train.state import CapacityError, RunState


def capacity_entry(task: str, ownership: TaskOwnership) -> dict[str, Any]:
    cap = ownership.capacity()
    return {
        "task": task,
        "owned_fraction": {str(k): v for k, v in cap.owned.items()},
        "free_fraction": cap.free,
        "num_weights": cap.total,
    }


class ContinualLoop:
    """One run of every configured task, from the start or (``resume``) from the newest intact
    checkpoint under ``out``. The run's parts register once with the checkpointer, which loads
    them all before the loop and saves them all at each of its points."""

    def __init__(self, cfg: RunConfig, out: str, dist: DistInfo, resume: bool = False, force: bool = False) -> None:
        self.start = time.perf_counter()
        self.cfg, self.out, self.dist, self.resume = cfg, out, dist, resume
        self.ctx = build_context(cfg, out, dist)
        self.state = RunState()
        self.phases = PhaseState(cfg, dist, self.state)
        self.checkpointer = Checkpointer(
            out, dist, keep=cfg.train.keep_checkpoints, async_writes=cfg.train.async_checkpoint
        )
        register_run_parts(self.checkpointer, self.ctx, self.state, self.phases, force)
        self._load()
        STOP.every_s = None if cfg.train.checkpoint_every_minutes is None else 60 * cfg.train.checkpoint_every_minutes
        STOP.checkpointed()

    def _load(self) -> None:
        """Load every part from the newest intact checkpoint (``resume``), once, before the loop."""
        if self.resume:
            ckpt = self.checkpointer.load()
            if ckpt is not None:  # altered frozen weights are refused, whatever COMMIT says
                verify_run(ckpt, self.ctx.model, self.ctx.ownership)
        elif self.checkpointer.committed():
            raise UserError(
                f"{self.checkpointer.root} already holds checkpoints of a run: add --resume to continue "
                "it, or choose another --out"
            )
        self.state.num_checkpoints = max(self.state.num_checkpoints, self.checkpointer.last_index())
        # Every rank has read the last index before any rank writes the next checkpoint's parts.
        barrier(self.dist)
        self.ctx.global_step = self.state.global_step
        self.elapsed_before = self.state.wall_seconds

    def save(self, tag: str) -> None:
        """Save every registered part as the run's next checkpoint (collective)."""
        self.state.wall_seconds = self._elapsed()
        self.state.global_step = self.ctx.global_step
        self.state.num_checkpoints += 1
        path = self.checkpointer.save(self.state.num_checkpoints, tag)
        STOP.checkpointed()
        self.ctx.logger.log("checkpoint", tag=tag)
        self.ctx.logger.flush()
        self._stop_if_asked(url_of(self.checkpointer.fs, path))

    def _stop_if_asked(self, checkpoint: str | None) -> None:
        """Stop (``Preempted``) if a rank received a stop signal, once ``checkpoint`` (the last
        one written, if any) is committed (collective)."""
        signum = STOP.decide(self.dist, timed=False).stop
        if not signum:
            return
        self.checkpointer.wait()
        self.ctx.logger.log("preempted", signal=signal.Signals(signum).name, checkpoint=checkpoint)
        self.ctx.logger.close()
        raise Preempted(signum, checkpoint)

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the remaining tasks in order and return the report (also written to ``out``)."""
        state = self.state
        self.ctx.logger.log(
            "start",
            config=self.cfg.to_dict(),
            world_size=self.dist.world_size,
            resume=self.resume,
            **state.resume_point(),
        )
        self._stop_if_asked(None)  # a signal while the run was being set up
        for i in range(state.task_index, len(self.cfg.tasks)):
            self._task(i)
        self.checkpointer.wait()  # the last checkpoint is committed before the report appears
        state.wall_seconds = self._elapsed()
        model, ownership = self.ctx.model, self.ctx.ownership
        storage = {
            "num_backbones": 1,
            "stored_parameters": sum(p.numel() for p in model.parameters()),
            "ownership_bytes": sum(o.numel() * o.element_size() for o in ownership.owners.values()),
        }
        return self.ctx.finish(state, storage, self.out)

    def _task(self, i: int) -> None:
        """Conure on task ``i``: train, prune, retrain, evaluate, checkpoint. A resumed run skips
        the steps its checkpoint holds, and continues a phase from where it was saved."""
        if not self.state.done("train"):
            self._train(i)
        if not self.state.done("prune"):
            self._prune(i)
        if self.cfg.tasks[i].retrain_epochs > 0:
            self.state.history.append(self._phase(i, "retrain"))
        self._evaluate(i)
        self.state.next_task()
        self.save(f"{self.ctx.infos[i].name}-done")

    def _phase(self, i: int, mode: str) -> dict[str, Any]:
        return self.ctx.run_phase(
            i,
            mode,
            self.cfg.tasks[i],
            self.phases.resume_for(mode),
            lambda phase: self.phases.save_in(phase, self.save),
        )

    def _train(self, i: int) -> None:
        """Task ``i``'s train phase, on a backbone grown first where it is short of free weights."""
        ctx, name = self.ctx, self.ctx.infos[i].name
        self._grow(i)
        if ctx.ownership.num_free() == 0:
            raise CapacityError(
                f"task '{name}' cannot start: every conv weight is owned by an earlier "
                "task; lower the earlier prune ratios or set continual.min_free_fraction"
            )
        self.state.history.append(self._phase(i, "train"))
        self.state.before_prune[name] = ctx.evaluate_view(i, "train")
        self.state.complete("train")
        self.save(f"{name}-trained")

    def _grow(self, i: int) -> None:
        """Append blocks before task ``i`` if it would start short of free weights (checkpointed:
        a resume rebuilds the same backbone from ``RunState.growth``; growing again adds nothing)."""
        ctx, name = self.ctx, self.ctx.infos[i].name
        events = grow_for_task(ctx.model, ctx.ownership, name, i, self.cfg.seed, self.cfg.continual)
        if events:
            self.state.growth.extend(events)
            for event in events:
                ctx.logger.log("grow", **event)
            self.save(f"{name}-grown")

    def _prune(self, i: int) -> None:
        self.ctx.prune(i, self._prune_ratio(i))
        self.state.complete("prune")

    def _prune_ratio(self, i: int) -> float:
        """Task ``i``'s prune ratio: as configured, or (``auto``) searched once after its train
        phase and kept in the run state, so that a resume does not search again."""
        task_cfg, name = self.cfg.tasks[i], self.ctx.infos[i].name
        if task_cfg.prune_ratio != "auto":
            return task_cfg.prune_ratio
        if name not in self.state.prune_search:
            unpruned = next(
                h["best_valid"] for h in reversed(self.state.history) if h["task"] == name and h["phase"] == "train"
            )
            self.state.prune_search[name] = choose_prune_ratio(self.ctx, i, task_cfg, unpruned)
            self.save(f"{name}-ratio")
        return self.state.prune_search[name]["chosen"]

    def _evaluate(self, i: int) -> None:
        """Every task so far under its own view: a row of the forgetting matrix, the capacity
        left, and the checksum of what task ``i`` froze."""
        ctx, state, cfg, info = self.ctx, self.state, self.cfg, self.ctx.infos[i]
        if info.name not in state.reference:
            state.reference[info.name] = reference_metrics(
                ctx.manifest, info, "test", cfg.train.topk, cfg.train.eval_max_users
            )
        row_metrics = ctx.evaluate_all(i)
        metric_names = [primary_metric_name(t.kind, cfg.train.topk) for t in ctx.infos]
        state.metrics.append(row_metrics)
        state.matrix.append([row_metrics[t.name][metric_names[j]] if j <= i else None for j, t in enumerate(ctx.infos)])
        state.capacity.append(
            {
                **capacity_entry(info.name, ctx.ownership),
                "prune_ratio": self._prune_ratio(i),
                "num_blocks": ctx.model.depth(info.name),
            }
        )
        state.task_checksums[info.name] = ctx.checksum_of_task(i)
        ctx.logger.log(
            "task_done",
            task=info.name,
            test=row_metrics[info.name],
            capacity=state.capacity[-1],
            global_step=ctx.global_step,
        )


def run_conure(cfg: RunConfig, out: str, dist: DistInfo, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Run every configured task in order and return the report (also written to ``out``).
    ``force``: resume although settings that change results differ from the checkpoint's."""
    return ContinualLoop(cfg, out, dist, resume, force).run()
