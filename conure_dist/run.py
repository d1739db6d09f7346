"""The continual task loop: for each task, train -> prune -> retrain -> evaluate -> checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from tqdm import tqdm

from conure_dist import compiled
from conure_dist.config import RunConfig, TaskConfig, TrainConfig, config_changes
from conure_dist.continual.ownership import TaskOwnership, task_checksum
from conure_dist.continual.views import MaskedModel
from conure_dist.data.manifest import Manifest, TaskInfo, manifest_exists
from conure_dist.data.stream import iter_batches, num_steps_per_epoch
from conure_dist.dist import DistInfo
from conure_dist.fs import join
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.train.checkpoint import Checkpoint, Checkpointer, optimizer_part_name
from conure_dist.train.engine import Engine, TorchEngine, build_engine
from conure_dist.train.evaluate import evaluate_task, reference_metrics
from conure_dist.train.logger import JsonlLogger
from conure_dist.train.metrics import primary_metric_name
from conure_dist.train.samplers import (
    PopularityNegativeSampler,
    SharedNegativeSampler,
    make_generator,
)

log = logging.getLogger(__name__)

PHASE_IDS = {"train": 0, "retrain": 1}


@dataclass
class PhaseProgress:
    """Where a phase stands; plain JSON in mid-phase checkpoints."""

    mode: str
    epoch: int = 0
    """Epoch in progress (0-based)."""
    step: int = 0
    """Optimizer steps already taken in that epoch (the data position)."""
    loss_total: float = 0.0
    best_value: float = float("-inf")
    epochs_log: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PhaseResume:
    """What a mid-phase checkpoint restores besides the model and ownership."""

    progress: PhaseProgress
    generator_state: torch.Tensor
    best_state: dict[str, torch.Tensor] | None
    engine_state: Callable[[Engine], dict]
    """Reads this rank's optimizer part once the engine (and so its sharding) is known."""


class CapacityError(RuntimeError):
    """No free conv weights are left for a new task."""


class DivergedError(RuntimeError):
    """A training loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# Set-up


def barrier(dist: DistInfo) -> None:
    if dist.is_distributed:
        tdist.barrier()


def prepare_data(cfg: RunConfig, dist: DistInfo) -> Manifest:
    """Load the manifest under ``data.root``, generating the shards first when there are none.

    Only rank 0 looks and generates; every rank then meets at the same barrier (a rank must not
    skip it because the manifest appeared in the meantime)."""
    root = cfg.data.root
    if dist.is_main and cfg.data.source != "none" and not manifest_exists(root):
        generate_shards(cfg)
    barrier(dist)
    if not manifest_exists(root):
        raise FileNotFoundError(
            f"no manifest.json under data.root={root}; build shards with `conure data ...` "
            "or set data.source to 'synthetic' or 'movielens'"
        )
    manifest = Manifest.load(root)
    if cfg.data.source != "none":
        differ = {key: (have, want) for key, (have, want) in _built_with(cfg, manifest).items() if have != want}
        if differ:
            listed = ", ".join(f"{key}={want} (the shards have {have})" for key, (have, want) in differ.items())
            raise ValueError(f"data.root={root} holds shards built otherwise than this config asks: {listed}; "
                             "point data.root to another directory, or delete it to rebuild")
    return manifest


def _built_with(cfg: RunConfig, manifest: Manifest) -> dict[str, tuple[Any, Any]]:
    """Config key -> (what the shards were built with, what the config asks for)."""
    d = cfg.data
    pairs = {"data.split": ([manifest.split.get(k) for k in ("train", "valid", "test")], list(d.split)),
             "data.split_seed": (manifest.split.get("seed"), d.split_seed)}
    if d.source == "synthetic":
        spec = manifest.source.get("spec", {})
        for key in ("num_users", "num_items", "seq_len", "seed"):
            pairs[f"data.synthetic.{key}"] = (spec.get(key), getattr(d.synthetic, key))
    else:
        pairs["data.seq_len"] = (manifest.seq_len, d.seq_len)
    return pairs


def generate_shards(cfg: RunConfig) -> Manifest:
    shard_args = {"instances_per_shard": cfg.data.instances_per_shard, "split": tuple(cfg.data.split)}
    if cfg.data.source == "synthetic":
        from conure_dist.data.sources.synthetic import SyntheticSpec, write_synthetic

        s = cfg.data.synthetic
        spec = SyntheticSpec(num_users=s.num_users, num_items=s.num_items, seq_len=s.seq_len, seed=s.seed)
        log.info("generating synthetic shards under %s", cfg.data.root)
        return write_synthetic(cfg.data.root, spec, split_seed=cfg.data.split_seed, **shard_args)
    from conure_dist.data.sources.movielens import write_movielens

    log.info("converting MovieLens from %s to shards under %s", cfg.data.source_dir, cfg.data.root)
    return write_movielens(cfg.data.source_dir, cfg.data.root, seq_len=cfg.data.seq_len, seed=cfg.data.split_seed,
                           skip_bad_rows=cfg.data.skip_bad_rows, **shard_args)


def check_tasks(cfg: RunConfig, manifest: Manifest) -> list[TaskInfo]:
    infos = []
    for i, task in enumerate(cfg.tasks):
        try:
            info = manifest.task(task.name)
        except ValueError as exc:
            raise ValueError(f"tasks.{i}.name: {exc}") from None
        if (i == 0) != (info.kind == "sequence"):
            raise ValueError(f"tasks.{i}: the first task, and only it, must be the sequence (T1) task; "
                             f"'{task.name}' is of kind '{info.kind}'")
        empty = [split for split in ("train", "valid", "test") if info.splits[split].num_instances == 0]
        if empty:
            raise ValueError(f"tasks.{i}: task '{task.name}' has no {' and no '.join(empty)} instances under "
                             f"data.root={cfg.data.root}; it needs more data or larger data.split fractions")
        infos.append(info)
    return infos


def task_specs(infos: list[TaskInfo]) -> list[TaskSpec]:
    return [TaskSpec(t.name, t.kind, t.num_outputs) for t in infos]


def build_model(cfg: RunConfig, num_seq_items: int, specs: list[TaskSpec]) -> ConureModel:
    torch.manual_seed(cfg.seed)
    m = cfg.model
    patch_tasks = [s.name for s in specs[1:]] if cfg.method.name == "peterrec" else []
    return ConureModel(num_seq_items, specs, m.channels, m.kernel_size, m.block_dilations, m.init_std,
                       patch_tasks=patch_tasks, patch_dim=cfg.method.patch_dim, prune_embedding=m.prune_embedding)


# ---------------------------------------------------------------------------------------------
# State carried from task to task (and through checkpoints)


@dataclass
class RunState:
    """Progress and results; plain JSON inside every checkpoint."""

    task_index: int = 0
    """Index (0-based) of the task being worked on."""
    stage: str = "start"
    """Stage reached on that task: start, in_train, trained (train phase done, not yet pruned)
    or in_retrain."""
    matrix: list[list[float | None]] = field(default_factory=list)
    metrics: list[dict[str, dict[str, float]]] = field(default_factory=list)
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    before_prune: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each task's test metrics right after its train phase (Conure-: no prune, no retrain)."""
    capacity: list[dict[str, Any]] = field(default_factory=list)
    task_checksums: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    num_checkpoints: int = 0
    phase: dict[str, Any] | None = None
    """PhaseProgress of a checkpoint taken inside a phase (stage in_train / in_retrain)."""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        return cls(**data)


@dataclass
class Trainer:
    """Everything the phases share. Built once per run."""

    cfg: RunConfig
    dist: DistInfo
    manifest: Manifest
    infos: list[TaskInfo]
    model: ConureModel
    masked: MaskedModel
    logger: JsonlLogger

    # -- one phase ---------------------------------------------------------------------------
    def run_phase(self, task_index: int, mode: str, task_cfg: TaskConfig, resume: PhaseResume | None = None,
                  save_mid: Callable[[PhaseProgress, dict, Engine], None] | None = None, *,
                  dense: list[str] | None = None, joint_weight: float = 0.0) -> dict[str, Any]:
        """Train under the phase's view; keep the parameters of the best validation epoch.

        ``resume`` continues a phase from a mid-phase checkpoint (epoch, step, optimizer, RNG,
        best parameters so far); ``save_mid`` is called every ``train.checkpoint_every_steps``.
        The baselines train in the dense view (no ownership) the parameters named in ``dense``,
        and with ``joint_weight`` also T1's loss on T1 batches, times that weight.
        """
        info = self.infos[task_index]
        task_id = task_index + 1
        epochs = task_cfg.epochs if mode == "train" else task_cfg.retrain_epochs
        self.masked.set_view("dense" if dense is not None else mode, task_id)
        self.masked.train()
        global_batch = task_cfg.batch_size  # divisible by the world size (build_trainer checked)
        if dense is None:
            trainable = phase_parameters(self.model, info.name, task_index == 0 and mode == "train")
        else:
            trainable = select_parameters(self.model, dense)
        engine = build_engine(self.masked, trainable, task_cfg.lr, task_cfg.l2, self.dist, self.cfg.dist,
                              per_rank_batch=global_batch // self.dist.world_size,
                              row_sparse=[f"model.{n}" for n in self.model.item_table_names()])
        steps = max(1, num_steps_per_epoch(self.manifest, info.name, "train", global_batch, drop_last=True))
        if self.cfg.train.max_steps_per_epoch:
            steps = min(steps, self.cfg.train.max_steps_per_epoch)
        draw = self._negative_drawer(info, global_batch)
        joint = self._joint_batches(self.cfg.tasks[0].batch_size) if joint_weight else None
        select = selection_score(info.kind, self.cfg.train)
        progress, best_state = PhaseProgress(mode=mode), None

        def validate(epoch: int, loss: float | None) -> None:
            """Score the current parameters on the validation split; keep them if best so far."""
            nonlocal best_state
            valid = evaluate_task(self.masked, self.manifest, info, "valid", self.cfg.train.eval_batch_size,
                                  self.cfg.train.topk, self.dist)
            entry = {"epoch": epoch, "loss": loss, "valid": valid}
            progress.epochs_log.append(entry)
            self.logger.log("epoch", task=info.name, phase=mode, **entry)
            score = select(valid)
            if score > progress.best_value:
                progress.best_value = score
                best_state = {n: p.detach().clone() for n, p in trainable.items()}

        if resume is not None:
            progress, best_state = resume.progress, resume.best_state
            engine.load_state_dict(resume.engine_state(engine))
        else:
            # The starting point competes too: a phase whose epochs all validate worse than where
            # it began (a fresh head at its prior, a pruned task before retraining) keeps it.
            validate(0, None)
        every = self.cfg.train.checkpoint_every_steps
        while progress.epoch < epochs:
            epoch = progress.epoch
            seed = (self.cfg.seed, task_id, PHASE_IDS[mode], epoch)
            generator = make_generator(*seed)
            if resume is not None and progress.step > 0:
                generator.set_state(resume.generator_state)
            batches = iter_batches(self.manifest, info.name, "train", global_batch // self.dist.world_size,
                                   shuffle=True, seed=hash_seed(*seed), epoch=epoch, rank=self.dist.rank,
                                   world_size=self.dist.world_size, num_steps=steps, drop_last=True,
                                   shuffle_buffer=self.cfg.data.shuffle_buffer, partition=self.cfg.data.partition,
                                   start_step=progress.step)
            bar = tqdm(batches, total=steps, initial=progress.step, desc=f"{info.name} {mode} {epoch + 1}/{epochs}",
                       leave=False, disable=not (self.cfg.train.progress and self.dist.is_main))
            for batch in bar:
                seq = batch.seq.to(self.dist.device)
                target = None if batch.target is None else batch.target.to(self.dist.device)
                if joint is None:
                    loss = engine.train_step(seq, info.name, target, draw(generator))
                else:
                    t1_seq, t1_negatives = joint(generator)
                    loss = engine.train_step(seq, info.name, target, draw(generator),
                                             (self.infos[0].name, t1_seq, t1_negatives, joint_weight))
                value = loss.item()
                if not math.isfinite(value):
                    raise DivergedError(f"task '{info.name}' ({mode} phase, epoch {epoch + 1}, step {progress.step + 1}): "
                                        f"the training loss is {value}; lower tasks.{task_index}.lr")
                progress.loss_total += value
                progress.step += 1
                if progress.step % self.cfg.train.log_every == 0:
                    bar.set_postfix(loss=f"{progress.loss_total / progress.step:.4f}")
                if every and save_mid and progress.step % every == 0 and progress.step < steps:
                    save_mid(progress, {"generator": generator.get_state(), "best": best_state or {}}, engine)
            validate(epoch + 1, progress.loss_total / max(progress.step, 1))
            progress.epoch, progress.step, progress.loss_total = epoch + 1, 0, 0.0
            resume = None
        engine.close()
        if best_state:
            with torch.no_grad():
                for name, param in trainable.items():
                    param.copy_(best_state[name])
        for param in self.model.parameters():
            param.requires_grad_(False)
        return {"task": info.name, "phase": mode, "best_valid": progress.best_value, "epochs": progress.epochs_log}

    def _negative_drawer(self, info: TaskInfo, global_batch: int):
        """Negatives drawn for the global batch from a generator shared by all ranks; rank r takes
        entries r, r+W, ... like its instances under the stride partition, so a step equals the
        single-process one."""
        if info.kind == "sequence":
            sampler = SharedNegativeSampler(info.num_outputs, self.cfg.train.negative_fraction)
            return lambda g: sampler.sample(g).to(self.dist.device)
        if info.kind == "item":
            pop = PopularityNegativeSampler(self.manifest.load_train_counts(info.name), self.cfg.train.bpr_rho)
            rank, world = self.dist.rank, self.dist.world_size
            return lambda g: pop.sample(global_batch, g)[rank::world].to(self.dist.device)
        return lambda g: None

    def _joint_batches(self, global_batch: int):
        """T1 batches (of T1's own batch size) and their negatives, cycling over T1's train split."""
        t1 = self.infos[0]
        draw = self._negative_drawer(t1, global_batch)
        state = {"epoch": 0, "batches": None}

        def next_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            while True:
                if state["batches"] is None:
                    state["batches"] = iter(iter_batches(
                        self.manifest, t1.name, "train", global_batch // self.dist.world_size, shuffle=True,
                        seed=hash_seed(self.cfg.seed, 0, 9, state["epoch"]), epoch=state["epoch"],
                        rank=self.dist.rank, world_size=self.dist.world_size, drop_last=True,
                        num_steps=max(1, num_steps_per_epoch(self.manifest, t1.name, "train", global_batch,
                                                             drop_last=True)),
                        shuffle_buffer=self.cfg.data.shuffle_buffer, partition=self.cfg.data.partition))
                batch = next(state["batches"], None)
                if batch is not None:
                    return batch.seq.to(self.dist.device), draw(generator)
                state["epoch"] += 1
                state["batches"] = None

        return next_batch

    # -- pruning -----------------------------------------------------------------------------
    def prune(self, task_index: int, ratio: float) -> None:
        """Decided on rank 0 from the fp32 weights, broadcast, then verified on every rank."""
        ownership = self.masked.ownership
        if self.dist.is_main:
            weights = dict(self.model.named_parameters())
            ownership.prune(task_index + 1, {n: weights[n] for n in ownership.names}, ratio)
        sync_ownership(ownership, self.dist)

    def evaluate_view(self, task_index: int, mode: str, split: str = "test") -> dict[str, float]:
        """One task's metrics under a phase's view (e.g. ``train``: before pruning)."""
        self.masked.set_view(mode, task_index + 1)
        return evaluate_task(self.masked, self.manifest, self.infos[task_index], split,
                             self.cfg.train.eval_batch_size, self.cfg.train.topk, self.dist)

    def evaluate_all(self, upto: int, split: str = "test") -> dict[str, dict[str, float]]:
        out = {}
        for j in range(upto + 1):
            self.masked.set_view("infer", j + 1)
            out[self.infos[j].name] = evaluate_task(self.masked, self.manifest, self.infos[j], split,
                                                    self.cfg.train.eval_batch_size, self.cfg.train.topk, self.dist)
        return out

    def checksum_of_task(self, task_index: int) -> str:
        extra = self.model.head_names(self.infos[task_index].name)
        if task_index == 0:
            extra += self.model.shared_names()
        return task_checksum(self.masked.ownership, self.model.state_dict(), task_index + 1, extra)


def selection_score(kind: str, train: TrainConfig) -> Callable[[dict[str, float]], float]:
    """What picks a phase's best validation epoch (higher is better): the primary metric, or for
    class tasks with ``train.class_selection: nll`` the negated mean cross-entropy."""
    if kind == "class" and train.class_selection == "nll":
        return lambda valid: -valid["nll"]
    metric = primary_metric_name(kind, train.topk)
    return lambda valid: valid[metric]


def phase_parameters(model: ConureModel, task: str, first_phase: bool) -> dict[str, nn.Parameter]:
    """What a Conure phase trains: T1's train phase (``first_phase``) the whole backbone; every
    other phase only the prunable kernels (through the view's masks) and the task's own head."""
    wanted = model.prunable_names() + model.head_names(task)
    if first_phase:
        wanted += model.shared_names()
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


def hash_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:4], "little")


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


# ---------------------------------------------------------------------------------------------
# The loop


def capacity_entry(task: str, ownership: TaskOwnership) -> dict[str, Any]:
    cap = ownership.capacity()
    return {"task": task, "owned_fraction": {str(k): v for k, v in cap.owned.items()}, "free_fraction": cap.free,
            "num_weights": cap.total}


def build_trainer(cfg: RunConfig, out: str | None, dist: DistInfo) -> Trainer:
    """Data (generated if missing), model, empty ownership records and logger of a run (no log
    without ``out``)."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    for i, task in enumerate(cfg.tasks):  # batch sizes are global: each rank takes an equal share
        if task.batch_size % dist.world_size:
            raise ValueError(f"tasks.{i}.batch_size={task.batch_size} is not divisible by the world size "
                             f"{dist.world_size}")
    manifest = prepare_data(cfg, dist)
    infos = check_tasks(cfg, manifest)
    if cfg.data.partition == "range":
        for i, info in enumerate(infos):
            if info.splits["train"].num_instances < dist.world_size:
                raise ValueError(f"tasks.{i}: task '{info.name}' has {info.splits['train'].num_instances} training "
                                 f"instances for {dist.world_size} ranks: too few for data.partition=range")
    model = build_model(cfg, manifest.num_seq_items, task_specs(infos))
    if cfg.model.head_prior:
        for info in infos[1:]:
            model.init_head_prior(info.name, torch.from_numpy(manifest.load_train_counts(info.name)))
    model = model.to(dist.device)
    compiled.compile_if(model, cfg.dist.compile, dist.device)
    ownership = TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in model.prunable_names()})
    logger = JsonlLogger(join(out, "log.jsonl") if out else os.devnull, enabled=dist.is_main and bool(out))
    return Trainer(cfg, dist, manifest, infos, model, MaskedModel(model, ownership), logger)


def run_conure(cfg: RunConfig, out: str, dist: DistInfo, resume: bool = False) -> dict[str, Any]:
    """Run every configured task in order and return the report (also written to ``out``)."""
    start = time.perf_counter()
    trainer = build_trainer(cfg, out, dist)
    manifest, infos, model, masked, logger = trainer.manifest, trainer.infos, trainer.model, trainer.masked, trainer.logger
    ownership, specs = masked.ownership, task_specs(infos)
    checkpointer = Checkpointer(out, dist, keep=cfg.train.keep_checkpoints)
    state, phase_resume = RunState(), None
    if resume:
        restored = restore(checkpointer, model, ownership, cfg, dist)
        if restored is not None:
            state, phase_resume = restored
    elif checkpointer.committed():
        raise ValueError(f"{checkpointer.root} already holds checkpoints of a run: add --resume to continue it, "
                         "or choose another --out")
    state.num_checkpoints = max(state.num_checkpoints, checkpointer.last_index())
    elapsed_before = state.wall_seconds
    position = None if state.phase is None else {"epoch": state.phase["epoch"], "step": state.phase["step"]}
    logger.log("start", config=cfg.to_dict(), world_size=dist.world_size, resume=resume, task_index=state.task_index,
               stage=state.stage, position=position)

    def save(tag: str, main_parts: dict | None = None, rank_parts: dict | None = None) -> None:
        state.wall_seconds = elapsed_before + time.perf_counter() - start
        state.num_checkpoints += 1
        meta = {"state": state.to_json(), "config": cfg.to_dict(), "data_root": cfg.data.root,
                "tasks": [s.__dict__ for s in specs], "num_seq_items": manifest.num_seq_items,
                "seq_len": manifest.seq_len, "world_size": dist.world_size,
                "ownership_checksum": ownership.checksum()}
        checkpointer.save(state.num_checkpoints, tag, model.state_dict(), ownership.state_dict(), meta,
                          main_parts, rank_parts)
        logger.log("checkpoint", tag=tag)
        logger.flush()

    def saver(task: str, mode: str) -> Callable[[PhaseProgress, dict, Engine], None]:
        def save_mid(progress: PhaseProgress, tensors: dict, engine: Engine) -> None:
            state.stage, state.phase = f"in_{mode}", dataclasses.asdict(progress)
            optimizer = {optimizer_part_name(dist.rank, engine.sharded_state): engine.state_dict()}
            save(f"{task}-{mode}-e{progress.epoch + 1}-s{progress.step}", {"phase.pt": tensors},
                 optimizer if engine.sharded_state or dist.is_main else None)

        return save_mid

    for i in range(state.task_index, len(cfg.tasks)):
        task_cfg, info = cfg.tasks[i], infos[i]
        if state.stage in ("start", "in_train"):
            if state.stage == "start" and ownership.num_free() == 0:
                raise CapacityError(f"task '{info.name}' cannot start: every conv weight is owned by an earlier "
                                    "task; lower the earlier prune ratios")
            resumed = phase_resume if state.stage == "in_train" else None
            state.history.append(trainer.run_phase(i, "train", task_cfg, resumed, saver(info.name, "train")))
            state.before_prune[info.name] = trainer.evaluate_view(i, "train")
            state.stage, state.phase = "trained", None
            save(f"{info.name}-trained")
        if ownership.last_task() < i + 1:
            trainer.prune(i, task_cfg.prune_ratio)
        if task_cfg.retrain_epochs > 0:
            resumed = phase_resume if state.stage == "in_retrain" else None
            state.history.append(trainer.run_phase(i, "retrain", task_cfg, resumed, saver(info.name, "retrain")))
        if info.name not in state.reference:
            state.reference[info.name] = reference_metrics(manifest, info, "test", cfg.train.topk)
        row_metrics = trainer.evaluate_all(i)
        metric_names = [primary_metric_name(t.kind, cfg.train.topk) for t in infos]
        state.metrics.append(row_metrics)
        state.matrix.append([row_metrics[t.name][metric_names[j]] if j <= i else None for j, t in enumerate(infos)])
        state.capacity.append(capacity_entry(info.name, ownership))
        state.task_checksums[info.name] = trainer.checksum_of_task(i)
        logger.log("task_done", task=info.name, test=row_metrics[info.name], capacity=state.capacity[-1])
        state.task_index, state.stage, state.phase = i + 1, "start", None
        save(f"{info.name}-done")

    state.wall_seconds = elapsed_before + time.perf_counter() - start
    storage = {"num_backbones": 1, "stored_parameters": sum(p.numel() for p in model.parameters()),
               "ownership_bytes": sum(o.numel() * o.element_size() for o in ownership.owners.values())}
    return finish_run(trainer, state, storage, out)


def finish_run(trainer: Trainer, state: RunState, storage: dict[str, int], out: str) -> dict[str, Any]:
    """Write ``report.json`` (rank 0) and return the report once every rank is done."""
    from conure_dist.report import build_report, write_report

    report = build_report(trainer.cfg, trainer.infos, state, trainer.dist, storage)
    if trainer.dist.is_main:
        write_report(report, out)
    trainer.logger.log("done", wall_seconds=state.wall_seconds)
    trainer.logger.flush()
    # Every rank leaves together: no rank tears the process group down while another still
    # finishes its last collective.
    barrier(trainer.dist)
    return report


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
    """Load the newest valid checkpoint. The configured tasks must start with the checkpoint's
    tasks in the same order; tasks listed after them are new and continue the sequence."""
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
    for name, owner in ckpt.ownership.items():
        ownership.owners[name].copy_(owner)
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
