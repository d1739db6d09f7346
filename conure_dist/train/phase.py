"""One phase of one task: train under the phase's view, validate after every epoch, keep the
parameters of the best validation epoch."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from conure_dist.config import RunConfig, TaskConfig, TrainConfig
from conure_dist.continual.views import MaskedModel
from conure_dist.data.manifest import Manifest, TaskInfo
from conure_dist.dist import DistInfo
from conure_dist.methods.joint import JointLossModel
from conure_dist.model import ConureModel
from conure_dist.provenance import environment
from conure_dist.scaling.comm_model import StepExchanges, Topology, ddp_step, num_negatives, zero_step
from conure_dist.scaling.flops import peak_flops, train_flops_per_sequence
from conure_dist.train.batches import (
    JointBatches,
    add_digest,
    batch_digest,
    format_digest,
    micro_batches,
    negative_drawer,
    prefetched,
    steps_per_epoch,
    sum_digest_over_ranks,
    to_device,
    train_batches,
)
from conure_dist.train.engine import build_engine
from conure_dist.train.evaluate import evaluate_task
from conure_dist.train.exchange_choice import job_topology, plan_exchange
from conure_dist.train.logger import JsonlLogger
from conure_dist.train.metrics import primary_metric_name
from conure_dist.train.preemption import STOP, Preempted
from conure_dist.train.profile import StepMeter, StepProfiler, StepTimer
from conure_dist.train.progress import show_progress
from conure_dist.train.samplers import hash_seed, make_generator
from conure_dist.train.schedule import lr_factor
from conure_dist.train.state import DivergedError, PhaseProgress, PhaseResume, PhaseTensors


class PhaseHost(Protocol):
    """What a phase reads from the run it belongs to (``context.RunContext`` provides it): the
    phase depends on this shape, not on the context module."""

    cfg: RunConfig
    dist: DistInfo
    manifest: Manifest
    infos: list[TaskInfo]
    model: ConureModel
    masked: MaskedModel
    logger: JsonlLogger
    profiler: StepProfiler | None
    global_step: int


PHASE_IDS = {"train": 0, "retrain": 1}
log = logging.getLogger(__name__)


def phase_parameters(model: ConureModel, task: str, first_phase: bool, grown: bool = False) -> dict[str, nn.Parameter]:
    """What a Conure phase trains: T1's train phase (``first_phase``) the whole backbone; every
    other phase only the prunable kernels (through the view's masks) and the task's own head,
    plus (``grown``: its train phase) the layer norms and biases of blocks the task appended."""
    wanted = model.prunable_names() + model.head_names(task)
    if first_phase:
        wanted += model.shared_names()
    if grown:
        wanted += model.grown_names(task)
    return select_parameters(model, wanted)


def select_parameters(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    """Exactly the named parameters become trainable; keyed as the MaskedModel names them."""
    wanted = set(names)
    out = {}
    for pname, param in model.named_parameters():
        param.requires_grad_(pname in wanted)
        if pname in wanted:
            out[f"model.{pname}"] = param
    return out


def selection_score(kind: str, train: TrainConfig) -> Callable[[dict[str, float]], float]:
    """What picks a phase's best validation epoch (higher is better): the primary metric, or for
    class tasks with ``train.class_selection: nll`` the negated mean cross-entropy."""
    if kind == "class" and train.class_selection == "nll":
        return lambda valid: -valid["nll"]
    metric = primary_metric_name(kind, train.topk)
    return lambda valid: valid[metric]


class Phase:
    """Train task ``task_index`` in ``mode`` (train or retrain) under Conure's view, or, for the
    baselines, the parameters named in ``dense`` under the dense view (no ownership), with
    ``joint_weight`` times T1's loss on T1 batches added to each step."""

    def __init__(
        self,
        trainer: PhaseHost,
        task_index: int,
        mode: str,
        task_cfg: TaskConfig,
        *,
        dense: list[str] | None = None,
        joint_weight: float = 0.0,
    ) -> None:
        cfg, dist, model = trainer.cfg, trainer.dist, trainer.model
        self.trainer, self.mode, self.task_index = trainer, mode, task_index
        self.info = info = trainer.infos[task_index]
        self.epochs = task_cfg.epochs if mode == "train" else task_cfg.retrain_epochs
        trainer.masked.set_view("dense" if dense is not None else mode, task_index + 1)
        trainer.masked.train()
        self.global_batch = task_cfg.batch_size  # divisible by the world size (build_context checked)
        if dense is None:
            self.trainable = phase_parameters(model, info.name, task_index == 0 and mode == "train", mode == "train")
        else:
            self.trainable = select_parameters(model, dense)
        # MTL (``joint_weight``) trains its joint loss: the same view with T1's loss added.
        trained = JointLossModel(trainer.masked) if joint_weight else trainer.masked
        self.exchange = plan_exchange(
            cfg,
            trainer.manifest,
            trainer.infos,
            info,
            dist,
            self.trainable,
            [f"model.{n}" for n in model.item_table_names()] if cfg.dist.engine == "ddp" else [],
            self.global_batch,
        )
        if self.exchange.predictions:
            record = self.exchange.record()
            trainer.logger.log("sparse_exchange", task=info.name, phase=mode, mode=cfg.dist.sparse_exchange, **record)
            log.info("%s %s: item tables exchanged %s", info.name, mode, self.exchange.summary())
        self.engine = build_engine(
            trained,
            self.trainable,
            task_cfg.lr,
            task_cfg.l2,
            dist,
            cfg.dist,
            per_rank_batch=self.global_batch // dist.world_size,
            row_sparse=self.exchange.row_sparse,
            grad_accum=cfg.train.grad_accum,
            clip_grad_norm=cfg.train.clip_grad_norm,
        )
        self.timer: StepTimer | None = None
        if cfg.train.step_timing:
            self.timer = StepTimer(dist.device, cfg.train.timing_warmup_steps)
            self.engine.attach_timer(self.timer)
        self.lr = task_cfg.lr
        self.steps = steps_per_epoch(cfg, trainer.manifest, info.name, self.global_batch)
        self.draw = negative_drawer(cfg, trainer.manifest, dist, info, self.global_batch)
        self.joint_weight = joint_weight
        self.joint = (
            JointBatches(cfg, trainer.manifest, dist, trainer.infos[0], cfg.tasks[0].batch_size)
            if joint_weight
            else None
        )
        self.score = selection_score(info.kind, cfg.train)
        self.progress = PhaseProgress(mode=mode)
        self.pending: list[torch.Tensor] = []
        """Losses of the steps since the last ``_settle``, still on the device."""
        self.tensors = PhaseTensors()
        """The epoch's generator and the best parameters so far: ``phase.pt`` of a mid-phase checkpoint."""

    def run(self, resume: PhaseResume | None = None, save_mid: Callable[[Phase], None] | None = None) -> dict[str, Any]:
        """Train every epoch (from ``resume``'s position, if given), then load the best epoch's
        parameters and freeze the model. ``save_mid`` is called every ``train.checkpoint_every_steps``,
        on ``train.checkpoint_every_minutes`` and on a stop signal (``preemption``)."""
        if resume is not None:
            self.progress, self.tensors.best = resume.progress, resume.best_state
            self.engine.load_state_dict(resume.engine_state(self.engine))
        elif self.trainer.cfg.train.validation:
            # The starting point competes too: a phase whose epochs all validate worse than where
            # it began (a fresh head at its prior, a pruned task before retraining) keeps it.
            self.validate(0, None)
        patience = self.trainer.cfg.train.patience
        while self.progress.epoch < self.epochs:
            if patience and self.progress.since_best >= patience:
                self.trainer.logger.log(
                    "early_stop",
                    task=self.info.name,
                    phase=self.mode,
                    epoch=self.progress.epoch,
                    best_value=self.progress.best_value,
                )
                break
            generator_state = resume.generator_state if resume is not None and self.progress.step > 0 else None
            self._train_epoch(generator_state, save_mid)
            resume = None
        self.engine.close()
        self._finish()
        if self.timer is not None:
            self.trainer.logger.log("phase_timing", task=self.info.name, phase=self.mode, **self.timing())
        p = self.progress
        best = p.best_value if self.trainer.cfg.train.validation else None
        return {"task": self.info.name, "phase": self.mode, "best_valid": best, "epochs": p.epochs_log}

    def timing(self) -> dict[str, Any]:
        """``train.step_timing``'s figures of this rank, and what the communication model
        predicts for the same exchanges (expected touched rows)."""
        assert self.timer is not None
        dist = self.trainer.dist
        measured = self.timer.report(self.global_batch, dist.world_size)
        topo = job_topology(dist)
        if self.trainer.cfg.dist.engine == "deepspeed":
            trainable = sum(p.numel() * p.element_size() for p in self.trainable.values())
            predicted = zero_step(dist.world_size, trainable, topo)
        else:
            predicted = self._ddp_prediction(topo)
        cfg, info = self.trainer.cfg, self.info
        negatives = num_negatives(info.num_outputs, cfg.train.negative_fraction) if info.kind == "sequence" else 0
        flops = train_flops_per_sequence(cfg, info.kind, self.trainer.manifest.seq_len, info.num_outputs, negatives)
        env = environment(dist.device)
        peak = peak_flops(env["device_name"], cfg.dist.precision)
        per_s = measured["sequences_per_s"]
        return {
            **measured,
            "flops_per_sequence": flops,
            "mfu": flops * per_s / (peak * dist.world_size) if peak and per_s else None,
            "provenance": {**env, "nodes": dist.num_nodes, "ranks_per_node": dist.ranks_per_node or dist.world_size},
            "world_size": dist.world_size,
            "global_batch": self.global_batch,
            "engine": self.trainer.cfg.dist.engine,
            "predicted_bytes_per_step": predicted.by_collective(),
            "predicted_comm_seconds": predicted.seconds(),
            "exchange": self.exchange.record(),
        }

    def _train_epoch(self, generator_state: torch.Tensor | None, save_mid: Callable[[Phase], None] | None) -> None:
        trainer, progress = self.trainer, self.progress
        epoch = progress.epoch
        seed = (trainer.cfg.seed, self.task_index + 1, PHASE_IDS[self.mode], epoch)
        generator = self.tensors.generator = make_generator(*seed)
        if generator_state is not None:
            generator.set_state(generator_state)
        batches = train_batches(
            trainer.cfg,
            trainer.manifest,
            trainer.dist,
            self.info.name,
            self.global_batch,
            seed=hash_seed(*seed),
            epoch=epoch,
            num_steps=self.steps,
            start_step=progress.step,
        )
        device = trainer.dist.device
        depth = (
            trainer.cfg.data.prefetch if trainer.cfg.data.prefetch is not None else (4 if device.type == "cuda" else 0)
        )
        bar = show_progress(
            prefetched(batches, depth, device),
            total=self.steps,
            initial=progress.step,
            desc=f"{self.info.name} {self.mode} {epoch + 1}/{self.epochs}",
            enabled=trainer.cfg.train.progress and trainer.dist.is_main,
        )
        train = trainer.cfg.train
        scheduled = train.lr_schedule != "constant" or train.warmup_steps > 0
        meter, lr = StepMeter(self.global_batch, trainer.dist.device), self.lr
        timer = self.timer
        if timer is not None:
            timer.mark_start()
        for batch in bar:
            if timer is not None:
                timer.mark("data_wait")
            if scheduled:
                step = epoch * self.steps + progress.step
                lr = self.lr * lr_factor(step, self.epochs * self.steps, train.lr_schedule, train.warmup_steps)
                self.engine.set_lr(lr)
            if trainer.profiler is not None:
                trainer.profiler.before_step(trainer.global_step)
            self._step(batch, generator)
            if timer is not None:
                timer.end_step()
            if trainer.profiler is not None:
                trainer.profiler.after_step(trainer.global_step)
            trainer.global_step += 1
            if progress.step % train.log_every == 0 or progress.step == self.steps:  # and each epoch's last
                meter.add(self._settle())
                bar.set_postfix(loss=f"{progress.loss_total / progress.step:.4f}")
                trainer.logger.log(
                    "step",
                    task=self.info.name,
                    phase=self.mode,
                    epoch=epoch + 1,
                    step=progress.step,
                    global_step=trainer.global_step,
                    **meter.report(lr),
                )
            if progress.step < self.steps:
                self._at_step_boundary(save_mid, meter)
        meter.add(self._settle())
        loss = progress.loss_total / max(progress.step, 1)
        validate = train.validation and ((epoch + 1) % train.eval_every == 0 or epoch + 1 == self.epochs)
        if validate:
            self.validate(epoch + 1, loss, self._epoch_digest())
        else:  # between validations (``train.eval_every``), or none (``train.validation: false``): the loss
            self._log_epoch({"epoch": epoch + 1, "loss": loss, "data": self._epoch_digest(), "valid": {}})
        progress.epoch, progress.step, progress.loss_total, progress.data_digest = epoch + 1, 0, 0.0, 0

    def _at_step_boundary(self, save_mid: Callable[[Phase], None] | None, meter: StepMeter) -> None:
        """Checkpoint inside the phase every ``train.checkpoint_every_steps`` steps, when
        ``train.checkpoint_every_minutes`` have passed, or on a stop signal (then ``save_mid``
        stops the run once the checkpoint is committed; with nothing to save it stops at once)."""
        every = self.trainer.cfg.train.checkpoint_every_steps
        decision = STOP.decide_at_step(self.trainer.dist, self.progress.step, self.trainer.cfg.train.log_every)
        if save_mid is None:
            if decision.stop:
                raise Preempted(decision.stop, None)
            return
        if decision.stop or decision.due or (every and self.progress.step % every == 0):
            meter.add(self._settle())
            save_mid(self)

    def _step(self, batch: Any, generator: torch.Generator) -> None:
        """One optimizer step. Its loss (the global batch's mean) stays on the device until
        ``_settle``: no host synchronisation per step."""
        dist = self.trainer.dist
        seq = batch.seq.to(dist.device, non_blocking=True)
        target = None if batch.target is None else batch.target.to(dist.device, non_blocking=True)
        joint = None
        if self.joint is not None:  # drawn first: the generator's order is part of the run
            joint = self.joint(generator)
        negatives = self.draw(generator)
        on_device = None if negatives is None else to_device(negatives, dist.device)
        joint_task = None if joint is None else (self.trainer.infos[0].name, *joint, self.joint_weight)
        loss = self.engine.train_step(
            micro_batches(
                self.trainer.cfg.train.grad_accum,
                seq,
                self.info.name,
                target,
                on_device,
                self.info.kind == "sequence",
                joint_task,
            )
        )
        # On the CPU while the device runs the step.
        digest = batch_digest(batch.user, negatives, self.info.kind == "sequence", self.progress.step, dist)
        self.progress.data_digest = add_digest(self.progress.data_digest, digest)
        self.pending.append(loss.detach())
        self.progress.step += 1

    def _ddp_prediction(self, topo: Topology) -> StepExchanges:
        """The model's exchanges of this phase's DDP steps, with expected touched rows."""
        dist = self.trainer.dist
        dense = getattr(self.engine, "dense", self.trainable)
        sparse = [t for t in self.exchange.tables if t.name in self.exchange.row_sparse]
        rows = {p.table: p for p in self.exchange.predictions}
        return ddp_step(
            dist.world_size,
            sum(p.numel() * p.element_size() for p in dense.values()),
            sparse,
            [[rows[t.name].rows_local for t in sparse]] * dist.world_size,
            [rows[t.name].rows_union for t in sparse],
            self.trainer.cfg.train.grad_accum,
            topo,
        )

    def _settle(self) -> list[float]:
        """The losses of the steps since the last call, read from the device at once; a loss that
        is not finite stops the run, naming its step (every rank sees the same global mean)."""
        if not self.pending:
            return []
        values = torch.stack(self.pending).double().cpu().tolist()
        first = self.progress.step - len(values)
        self.pending = []
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise DivergedError(
                    f"task '{self.info.name}' ({self.mode} phase, epoch {self.progress.epoch + 1}, "
                    f"step {first + i + 1}): the training loss is {value}; lower "
                    f"tasks.{self.task_index}.lr"
                )
            self.progress.loss_total += value
        return values

    def _epoch_digest(self) -> str:
        """The epoch's data fingerprint over all ranks: equal for two runs exactly when they
        trained on the same global batches with the same negatives, in the same order."""
        return format_digest(sum_digest_over_ranks(self.progress.data_digest, self.trainer.dist))

    def validate(self, epoch: int, loss: float | None, data: str | None = None) -> None:
        """Score the current parameters on the validation split; keep them if best so far."""
        trainer = self.trainer
        valid = evaluate_task(
            trainer.masked,
            trainer.manifest,
            self.info,
            "valid",
            trainer.cfg.train.eval_batch_size,
            trainer.cfg.train.topk,
            trainer.dist,
            trainer.cfg.train.eval_max_users,
        )
        self._log_epoch({"epoch": epoch, "loss": loss, "data": data, "valid": valid})
        score = self.score(valid)
        if score > self.progress.best_value:
            self.progress.best_value, self.progress.since_best = score, 0
            self.tensors.best = {n: p.detach().clone() for n, p in self.trainable.items()}
        else:
            self.progress.since_best += 1

    def _log_epoch(self, entry: dict[str, Any]) -> None:
        self.progress.epochs_log.append(entry)
        trainer = self.trainer
        trainer.logger.log("epoch", task=self.info.name, phase=self.mode, global_step=trainer.global_step, **entry)

    def _finish(self) -> None:
        """Load the best epoch's parameters; nothing stays trainable."""
        if self.tensors.best:
            with torch.no_grad():
                for name, param in self.trainable.items():
                    param.copy_(self.tensors.best[name])
        for param in self.trainer.model.parameters():
            param.requires_grad_(False)
