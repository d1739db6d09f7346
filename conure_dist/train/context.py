"""The pieces a run shares across its tasks (data, model, ownership, logger) and what it does
with them: train a phase, prune, evaluate, checksum a task, report."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from conure_dist import compiled
from conure_dist.config import RunConfig, TaskConfig
from conure_dist.continual.audit import checksum_of_task
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.data.dataset import open_dataset
from conure_dist.data.manifest import Manifest, TaskInfo
from conure_dist.dist import DistInfo, barrier
from conure_dist.errors import UserError
from conure_dist.fs import join
from conure_dist.methods import METHODS
from conure_dist.methods.patches import add_patches
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.report import build_report, write_report
from conure_dist.train.evaluate import evaluate_task
from conure_dist.train.first_task import run_first_phase
from conure_dist.train.logger import JsonlLogger
from conure_dist.train.phase import Phase
from conure_dist.train.profile import StepProfiler
from conure_dist.train.sinks import make_sinks
from conure_dist.train.state import PhaseResume, RunState

log = logging.getLogger(__name__)


def task_specs(infos: list[TaskInfo]) -> list[TaskSpec]:
    return [TaskSpec(t.name, t.kind, t.num_outputs) for t in infos]


def build_model(cfg: RunConfig, num_seq_items: int, specs: list[TaskSpec]) -> ConureModel:
    """The model, initialised from the run's seed, with what its method adds (PeterRec's patches
    for every task after the first, created last; an empty container for the other methods)."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = ConureModel(
        num_seq_items,
        specs,
        m.channels,
        m.kernel_size,
        m.block_dilations,
        m.init_std,
        prune_embedding=m.prune_embedding,
        softmax_kernel=m.softmax_kernel,
    )
    patched = [s.name for s in specs[1:]] if METHODS[cfg.method.name].patches else []
    add_patches(model, patched, cfg.method.patch_dim)
    return model


def sync_ownership(ownership: TaskOwnership, dist: DistInfo) -> None:
    """Broadcast rank 0's ownership and stop on any checksum mismatch between ranks."""
    if not dist.is_distributed:
        return
    for name in ownership.names:
        owner = ownership.owners[name]
        buf = owner.to(dist.device) if dist.backend == "nccl" else owner
        tdist.broadcast(buf, src=0)
        if buf is not owner:
            owner.copy_(buf.cpu())
    local = ownership.checksum()
    gathered: list[str | None] = [None] * dist.world_size
    tdist.all_gather_object(gathered, local)
    if len(set(gathered)) != 1:
        raise RuntimeError(f"ownership records differ between ranks: {gathered}")


@dataclass
class RunContext:
    """Everything the phases share. Built once per run (``build_context``)."""

    cfg: RunConfig
    dist: DistInfo
    manifest: Manifest
    infos: list[TaskInfo]
    model: ConureModel
    masked: MaskedModel
    logger: JsonlLogger
    profiler: StepProfiler | None = None
    out: str | None = None
    """The run's output folder (None: nothing written)."""
    global_step: int = 0
    """Optimizer steps taken by the run so far, over all phases (the curves' x axis)."""

    @property
    def ownership(self) -> TaskOwnership:
        return self.masked.ownership

    def run_phase(
        self,
        task_index: int,
        mode: str,
        task_cfg: TaskConfig,
        resume: PhaseResume | None = None,
        save_mid=None,
        *,
        dense: list[str] | None = None,
        joint_weight: float = 0.0,
    ) -> dict[str, Any]:
        """Train one phase (``Phase``) and return its summary: best validation score, epochs. T1's
        train phase goes through ``train.first_task_cache`` when set (``first_task``)."""

        def train() -> tuple[dict[str, Any], int]:
            phase = Phase(self, task_index, mode, task_cfg, dense=dense, joint_weight=joint_weight)
            return phase.run(resume, save_mid), self.global_step

        if task_index == 0 and mode == "train" and resume is None and self.cfg.train.first_task_cache:
            summary, self.global_step = run_first_phase(
                self.cfg, self.dist, self.model, self.logger, self.out, self.global_step, train
            )
            return summary
        return train()[0]

    def prune(self, task_index: int, ratio: float) -> None:
        """Decided on rank 0 from the fp32 weights, broadcast, then verified on every rank."""
        ownership = self.ownership
        if self.dist.is_main:
            weights = dict(self.model.named_parameters())
            ownership.prune(task_index + 1, {n: weights[n] for n in ownership.names}, ratio)
        sync_ownership(ownership, self.dist)

    def evaluate_view(self, task_index: int, mode: str, split: str = "test") -> dict[str, float]:
        """One task's metrics under a phase's view (e.g. ``train``: before pruning)."""
        self.masked.set_view(mode, task_index + 1)
        return evaluate_task(
            self.masked,
            self.manifest,
            self.infos[task_index],
            split,
            self.cfg.train.eval_batch_size,
            self.cfg.train.topk,
            self.dist,
            self.cfg.train.eval_max_users,
        )

    def evaluate_all(self, upto: int, split: str = "test") -> dict[str, dict[str, float]]:
        """Tasks 0..``upto``, each under its own inference view."""
        return {self.infos[j].name: self.evaluate_view(j, "infer", split) for j in range(upto + 1)}

    def checksum_of_task(self, task_index: int) -> str:
        return checksum_of_task(self.model, self.ownership, self.model.state_dict(), task_index)

    def finish(self, state: RunState, storage: dict[str, int], out: str) -> dict[str, Any]:
        """Write ``report.json`` (rank 0) and return the report once every rank is done."""
        report = build_report(self.cfg, self.infos, state, self.dist, storage)
        if self.dist.is_main:
            write_report(report, out)
        self.logger.log("done", wall_seconds=state.wall_seconds)
        self.logger.close()
        # Every rank leaves together: no rank tears the process group down while another still
        # finishes its last collective.
        barrier(self.dist)
        return report


def check_batch_split(index: int, batch_size: int, world_size: int, grad_accum: int) -> None:
    """A global batch must split into equal shares of at least one sequence per rank and
    micro-batch; the refusal names the value to set (strong and weak scaling: README)."""
    parts = world_size * grad_accum
    if batch_size % parts == 0:
        return
    accum = f" x train.grad_accum {grad_accum}" if grad_accum > 1 else ""
    if batch_size < parts:
        raise UserError(
            f"tasks.{index}.batch_size={batch_size} is a global batch: it gives less than one sequence per rank "
            f"on world size {world_size}{accum}; set tasks.{index}.batch_size={parts} or more (per-rank batch x "
            f"world size, e.g. {parts * max(1, batch_size // grad_accum)} to keep {max(1, batch_size // grad_accum)} "
            f"per rank as on one process) and scale tasks.{index}.lr with it (conure scale --mode weak does both)"
        )
    lower, upper = batch_size // parts * parts, -(-batch_size // parts) * parts
    raise UserError(
        f"tasks.{index}.batch_size={batch_size} is not divisible by the world size {world_size}{accum}; "
        f"set tasks.{index}.batch_size={lower} or {upper}"
    )


def build_context(cfg: RunConfig, out: str | None, dist: DistInfo) -> RunContext:
    """Data (the shards must exist: ``conure run`` builds missing ones first), model, empty
    ownership records and logger of a run (no log without ``out``)."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    for i, task in enumerate(cfg.tasks):  # batch sizes are global: each rank takes an equal share
        check_batch_split(i, task.batch_size, dist.world_size, cfg.train.grad_accum)
    manifest, infos = open_dataset(cfg)
    if cfg.data.partition == "range":
        for i, info in enumerate(infos):
            if info.splits["train"].num_instances < dist.world_size:
                raise UserError(
                    f"tasks.{i}: task '{info.name}' has {info.splits['train'].num_instances} training "
                    f"instances for {dist.world_size} ranks: too few for data.partition=range"
                )
    model = build_model(cfg, manifest.num_seq_items, task_specs(infos))
    if cfg.model.head_prior:
        for info in infos[1:]:
            model.init_head_prior(info.name, torch.from_numpy(manifest.load_train_counts(info.name)))
    model = model.to(dist.device)
    compiled.compile_if(model, cfg.dist.compile, dist.device)
    ownership = TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in model.prunable_names()})
    main = dist.is_main and bool(out)
    if cfg.train.eval_max_users is not None and dist.is_main:
        log.warning(
            "train.eval_max_users=%d: validation, test and reference metrics cover the first %d instances of "
            "each split, not the whole split",
            cfg.train.eval_max_users,
            cfg.train.eval_max_users,
        )
    sinks = make_sinks(cfg.train.sinks, out, cfg.to_dict()) if main else []
    logger = JsonlLogger(join(out, "log.jsonl") if out else os.devnull, enabled=main, sinks=sinks)
    profiler = StepProfiler(*cfg.train.profile_steps, out, dist.rank) if cfg.train.profile_steps and out else None
    return RunContext(cfg, dist, manifest, infos, model, MaskedModel(model, ownership), logger, profiler, out)
