"""The run configuration's schema: typed dataclasses with their defaults and checks.

Batch sizes are *global*: the number of instances per optimizer step summed over all ranks, so a
config means the same optimization on any number of processes. Reading YAML files and
``key=value`` overrides into these classes is :mod:`conure_dist.config.load`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from conure_dist.config.checks import ConfigError  # noqa: F401 - importable with the sections
from conure_dist.config.checks import check as _check
from conure_dist.config.data_schema import DataConfig, SyntheticDataConfig  # noqa: F401
from conure_dist.methods.registry import DEFAULT_METHOD, METHOD_NAMES, METHODS


@dataclass
class ModelConfig:
    """NextItNet backbone: embedding, then residual blocks of two causal dilated convs."""

    channels: int = 64
    """Embedding and hidden size (the paper uses 256)."""
    kernel_size: int = 3
    """Width of every causal convolution."""
    block_dilations: list[int] = field(default_factory=lambda: [1, 4, 1, 4])
    """One entry per residual block; a block with dilation d has convs of dilation d and 2d."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of embeddings and kernels."""
    prune_embedding: bool = False
    """Also partition the item embedding between tasks like the conv kernels (the paper's
    embedding pruning); otherwise it trains in T1 only and is shared frozen."""
    head_prior: bool = True
    """Item and class heads start as their task's trivial predictor (popularity ranking, class
    prior, from the train split's label counts) and learn the personal part from there; the
    validation check before the first epoch keeps that start when no epoch beats it."""
    softmax_kernel: Literal["auto", "chunked", "triton"] = "auto"
    """Where T1's sampled softmax and evaluation's ranking run: ``triton`` (fused kernels: the
    negatives' logits and the full score table never reach memory), ``chunked`` (PyTorch, in
    chunks of negatives) or ``auto`` (Triton for bf16/fp16 CUDA tensors on compute capability 8.0
    or later when Triton is installed and the kernel passes its probe once per process, else
    chunked)."""

    def validate(self, prefix: str) -> None:
        _check(self.channels >= 1, f"{prefix}.channels", f"must be >= 1, got {self.channels}")
        _check(self.kernel_size >= 1, f"{prefix}.kernel_size", f"must be >= 1, got {self.kernel_size}")
        _check(len(self.block_dilations) >= 1, f"{prefix}.block_dilations", "needs at least one block")
        for i, d in enumerate(self.block_dilations):
            _check(d >= 1, f"{prefix}.block_dilations.{i}", f"must be >= 1, got {d}")
        _check(self.init_std > 0, f"{prefix}.init_std", "must be > 0")


@dataclass
class TaskConfig:
    """One task of the continual sequence, in training order. ``name`` refers to the manifest."""

    name: str = ""
    """Task name as listed in the data manifest."""
    prune_ratio: float | Literal["auto"] = 0.7
    """Fraction of this task's free conv weights released for later tasks after training, or
    ``auto``: the largest of ``continual.prune_candidates`` whose validation score after retraining
    stays within ``prune_tolerance`` of the unpruned one (a bisection, decided on rank 0)."""
    prune_tolerance: float = 0.01
    """``prune_ratio: auto``: the relative loss of validation score accepted for a ratio, i.e.
    ``score >= unpruned - prune_tolerance * |unpruned|`` (the phase's selection score)."""
    epochs: int = 3
    """Epochs of the train phase."""
    retrain_epochs: int = 2
    """Epochs of the retrain phase (after pruning); 0 skips it."""
    lr: float = 1e-4
    """Adam learning rate of both phases."""
    batch_size: int = 512
    """Global batch size (instances per optimizer step over all ranks)."""
    l2: float = 0.0
    """Coefficient of the L2 penalty 0.5*l2*||w||^2 on the weights trainable in the current
    phase (paper: 0.02, 0.05 for TTL's T3); frozen weights are never penalised."""

    def validate(self, prefix: str) -> None:
        _check(bool(self.name), f"{prefix}.name", "is required")
        _check(
            self.prune_ratio == "auto" or 0.0 <= self.prune_ratio < 1.0,
            f"{prefix}.prune_ratio",
            f"must be in [0, 1) or 'auto', got {self.prune_ratio}",
        )
        _check(
            0.0 <= self.prune_tolerance < 1.0,
            f"{prefix}.prune_tolerance",
            f"must be in [0, 1), got {self.prune_tolerance}",
        )
        _check(self.epochs >= 1, f"{prefix}.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.retrain_epochs >= 0, f"{prefix}.retrain_epochs", f"must be >= 0, got {self.retrain_epochs}")
        _check(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.l2 >= 0, f"{prefix}.l2", f"must be >= 0, got {self.l2}")


RUN_ONLY_TRAIN_KEYS = frozenset(
    {
        "progress",
        "log_every",
        "sinks",
        "profile_steps",
        "keep_checkpoints",
        "async_checkpoint",
        "checkpoint_every_steps",
        "checkpoint_every_minutes",
        "first_task_cache",
        "step_timing",
        "timing_warmup_steps",
    }
)
"""``train`` keys that change what a run logs, saves or times, never a number it computes: the
first-task cache leaves them out of its key, and a run directory lets them change between runs."""


@dataclass
class TrainConfig:
    """Settings shared by all tasks."""

    negative_fraction: float = 0.2
    """T1 sampled softmax: fraction of the item vocabulary drawn as negatives shared by the batch."""
    bpr_rho: float = 0.3
    """Item tasks: rho of the static popularity negative sampler, p(rank r) ~ exp(-(r+1)/(rho*N))."""
    eval_batch_size: int = 1024
    """Global batch size for evaluation."""
    eval_max_users: int | None = None
    """Evaluate on at most this many instances (users) of each split: the first ones in the
    split's stored order, the same on any world size. Applies to validation, the test matrix and
    the popularity reference alike; each metric's ``count`` says how many were scored, and the
    run logs the cap. None: every instance (the paper's protocol; ``conure eval`` always scores
    whole splits)."""
    eval_every: int = 1
    """Validate every this many epochs of a phase (and always after its last epoch and before its
    first): best-epoch selection and ``patience`` see only the validated epochs; the others are
    logged with their loss alone."""
    topk: int | list[int] = 5
    """Cut-off k of MRR@k, HR@k, NDCG@k and Recall@k, or several (``[5, 10, 20]``): every one
    is reported; the first fills the forgetting matrix and picks each phase's best epoch."""
    class_selection: Literal["nll", "acc"] = "nll"
    """What picks a class task's best validation epoch: its mean cross-entropy (``nll``: moves
    with every user's probability, where accuracy on a small validation split moves in steps of
    one user) or its accuracy. Item and sequence tasks use their MRR@k."""
    log_every: int = 50
    """Log the training figures (loss, sequences/s, learning rate, GPU memory) every this many
    optimizer steps of an epoch, and at its last step."""
    progress: bool = True
    """Show progress (rank 0 only): a bar on a terminal; without one (a batch job, a redirected
    log) a line every 30 s instead of the bar's carriage-return redraws."""
    max_steps_per_epoch: int | None = None
    """Cap on optimizer steps per epoch (None: one pass over the training split)."""
    patience: int | None = None
    """Early stopping: end a phase once this many epochs in a row validated no better than its
    best (None: train every epoch). The best epoch's parameters are kept either way."""
    clip_grad_norm: float | None = None
    """Clip the global gradient norm of the phase's trainable weights to this value before each
    update (after the gradient exchange; frozen entries have zero gradient and stay zero)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate over a phase's steps: constant ``tasks.*.lr``, or decaying linearly or on a
    half cosine to zero by the phase's last step, after ``warmup_steps`` of linear warm-up."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to ``tasks.*.lr`` at the start of every phase."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (gradient accumulation): each rank splits its share of a
    global batch into this many strided parts and runs forward and backward on one at a time, so
    activation memory shrinks by this factor. The update is that of world size x grad_accum
    processes on the same global batch; 1 process with 2 micro-batches repeats 2 processes
    (``data.partition=stride``) bit for bit. Every ``tasks.*.batch_size`` must be divisible by
    world size x grad_accum."""
    num_threads: int | None = None
    """torch intra-op threads on CPU (None: torch's default)."""
    deterministic: bool = True
    """Deterministic kernels (``torch.use_deterministic_algorithms``): the same config and seed
    give the same weights (for the same thread count: CPU kernels split their sums by threads).
    Multi-threaded CPU gradient scatters otherwise add in varying order.
    Ops without a deterministic kernel only warn; turn off for top GPU speed."""
    validation: bool = True
    """Validate after every epoch and keep each phase's best epoch. False: no validation (each
    phase keeps its last epoch; test metrics at every task's end are still computed), for runs
    that time training such as ``conure scale --no-eval``; needs fixed ``tasks.*.prune_ratio``."""
    step_timing: bool = False
    """Time every step's parts (data wait, forward/backward, communication, optimizer; the
    device is synchronised between them, which costs some speed) and count the bytes each
    exchange hands to its collective; logged per phase as ``phase_timing`` in ``log.jsonl``
    (``conure scale`` sets it)."""
    timing_warmup_steps: int = 5
    """``step_timing``: the first steps of every phase left out of its figures (warm-up,
    compilation)."""
    checkpoint_every_steps: int | None = None
    """Also checkpoint inside a phase every this many optimizer steps (None: phase ends only)."""
    checkpoint_every_minutes: float | None = None
    """Also checkpoint inside a phase once this many minutes have passed since the last checkpoint
    (None: no timed checkpoints), so that a preempted or killed job loses at most that much work;
    the ranks agree on the step. Cluster presets set it."""
    sinks: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    """Where training curves go besides ``log.jsonl`` (rank 0): TensorBoard event files under
    ``{out}/tensorboard`` (local first, uploaded at phase ends for ``s3://`` runs), Weights &
    Biases, MLflow. Per step: loss, sequences/s, learning rate, peak GPU memory; per epoch:
    validation metrics; per task: test metrics and capacity."""
    profile_steps: list[int] | None = None
    """``[start, stop]``: run the torch profiler over the run's optimizer steps start..stop-1
    (counted over all phases); traces and operator tables go to ``{out}/profile``."""
    keep_checkpoints: int = 2
    """Intact committed checkpoints kept in ``{out}/checkpoints`` (older ones are deleted after a commit)."""
    async_checkpoint: bool = True
    """Write checkpoints on a background thread: training waits only for a copy of the state in
    host memory (pinned on a GPU); digests, upload and the COMMIT marker follow, with the same
    guarantees (an interrupted write never replaces the last committed checkpoint)."""
    first_task_cache: str | None = None
    """A folder (local or fsspec URL) where T1's train phase is stored once trained and loaded by
    every later run that would train it identically (same key: settings the phase reads and the
    initial backbone and T1 head; ``conure_dist.train.first_task``). The methods and variants of
    an experiment share it this way (``conure experiment`` sets it). None: every run trains T1."""

    def validate(self, prefix: str) -> None:
        if self.first_task_cache is not None:
            _check(bool(self.first_task_cache.strip()), f"{prefix}.first_task_cache", "must be a folder or null")
        _check(0.0 < self.negative_fraction <= 1.0, f"{prefix}.negative_fraction", "must be in (0, 1]")
        _check(self.bpr_rho > 0, f"{prefix}.bpr_rho", "must be > 0")
        _check(self.eval_batch_size >= 1, f"{prefix}.eval_batch_size", "must be >= 1")
        if self.eval_max_users is not None:
            _check(self.eval_max_users >= 1, f"{prefix}.eval_max_users", f"must be >= 1, got {self.eval_max_users}")
        _check(self.eval_every >= 1, f"{prefix}.eval_every", f"must be >= 1, got {self.eval_every}")
        ks = [self.topk] if isinstance(self.topk, int) else self.topk
        _check(len(ks) >= 1 and all(k >= 1 for k in ks), f"{prefix}.topk", f"must be >= 1 (each), got {self.topk}")
        _check(len(set(ks)) == len(ks), f"{prefix}.topk", f"lists a cut-off twice: {self.topk}")
        if self.patience is not None:
            _check(self.patience >= 1, f"{prefix}.patience", f"must be >= 1, got {self.patience}")
        if self.clip_grad_norm is not None:
            _check(self.clip_grad_norm > 0, f"{prefix}.clip_grad_norm", f"must be > 0, got {self.clip_grad_norm}")
        if self.profile_steps is not None:
            _check(
                len(self.profile_steps) == 2 and 0 <= self.profile_steps[0] < self.profile_steps[1],
                f"{prefix}.profile_steps",
                f"must be [start, stop] with 0 <= start < stop, got {self.profile_steps}",
            )
        _check(len(set(self.sinks)) == len(self.sinks), f"{prefix}.sinks", f"lists a sink twice: {self.sinks}")
        _check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.log_every >= 1, f"{prefix}.log_every", "must be >= 1")
        if self.max_steps_per_epoch is not None:
            _check(self.max_steps_per_epoch >= 1, f"{prefix}.max_steps_per_epoch", "must be >= 1")
        _check(self.grad_accum >= 1, f"{prefix}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        if self.num_threads is not None:
            _check(self.num_threads >= 1, f"{prefix}.num_threads", "must be >= 1")
        if self.checkpoint_every_steps is not None:
            _check(self.checkpoint_every_steps >= 1, f"{prefix}.checkpoint_every_steps", "must be >= 1")
        if self.checkpoint_every_minutes is not None:
            _check(
                self.checkpoint_every_minutes > 0,
                f"{prefix}.checkpoint_every_minutes",
                f"must be > 0 (or null), got {self.checkpoint_every_minutes}",
            )
        _check(self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints", "must be >= 1")
        _check(self.timing_warmup_steps >= 0, f"{prefix}.timing_warmup_steps", "must be >= 0")


@dataclass
class DistConfig:
    """How training is distributed; the launcher (torchrun, deepspeed) decides the world size."""

    engine: Literal["ddp", "deepspeed"] = "ddp"
    """Training engine: PyTorch DDP (also used for one process) or DeepSpeed."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0, 1 or 2); only with ``engine: deepspeed``."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute precision; master weights stay fp32."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; auto = NCCL on GPU, gloo on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device; auto = CUDA when available."""
    compile: Literal["auto", "always", "never"] = "auto"
    """``torch.compile`` the backbone and the hot element-wise kernels (T1's streamed softmax,
    exact ranking); auto = on CUDA only. Same math; several times faster on a GPU."""
    sparse_exchange: Literal["auto", "row_sparse", "dense"] = "auto"
    """DDP: how the gradients of the item tables (T1's embedding, softmax weight and bias) are
    averaged: ``row_sparse`` (only the rows some rank touched: one all-gather of row ids, one
    all-reduce of the union's rows), ``dense`` (every row, in DDP's buckets) or ``auto`` (per
    table and phase, the one the communication model ``conure_dist.scaling.comm_model`` predicts
    faster for the phase's batch, world size and link; logged once as ``sparse_exchange``). The
    average is the same either way."""
    deepspeed_config: str | None = None
    """Optional DeepSpeed JSON (e.g. configs/deepspeed/zero2.json) with extra engine settings;
    batch size, ZeRO stage and precision always come from this config and must not conflict."""

    def validate(self, prefix: str) -> None:
        _check(self.zero_stage in (0, 1, 2), f"{prefix}.zero_stage", f"must be 0, 1 or 2, got {self.zero_stage}")
        if self.zero_stage:
            _check(self.engine == "deepspeed", f"{prefix}.zero_stage", "needs dist.engine: deepspeed")
        if self.deepspeed_config is not None:
            _check(self.engine == "deepspeed", f"{prefix}.deepspeed_config", "needs dist.engine: deepspeed")
            _check(
                Path(self.deepspeed_config).is_file(),
                f"{prefix}.deepspeed_config",
                f"no such file: {self.deepspeed_config}",
            )


MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]
"""One of the methods of ``conure_dist.methods.registry``."""


@dataclass
class MethodConfig:
    """How the tasks share the backbone: Conure, or one of the baselines it is compared with."""

    name: MethodName = DEFAULT_METHOD
    """conure; conure_minus (Conure's run, each task scored before its pruning and retraining);
    finetune (one model fine-tuned task after task: it forgets); stl (one model per task, fully
    fine-tuned from T1); finesmax (T1's backbone frozen, only the head trains); sinmo (one model
    per task trained from scratch); peterrec (T1's backbone frozen plus per-task model patches);
    mtl (one model per task trained on T1 and that task jointly)."""
    mtl_t1_weight: float = 0.1
    """mtl: weight of T1's loss in the joint loss."""
    patch_dim: int = 16
    """peterrec: bottleneck width of the model patches."""

    def validate(self, prefix: str) -> None:
        _check(self.mtl_t1_weight >= 0, f"{prefix}.mtl_t1_weight", f"must be >= 0, got {self.mtl_t1_weight}")
        _check(self.patch_dim >= 1, f"{prefix}.patch_dim", f"must be >= 1, got {self.patch_dim}")


@dataclass
class ContinualConfig:
    """How Conure's backbone is shared as tasks accumulate: growth and automatic prune ratios."""

    min_free_fraction: float = 0.0
    """Grow the backbone before a task that would start with less than this fraction of the
    prunable conv weights free: ``grow_dilations`` blocks are appended (repeatedly, until the
    fraction is reached), run only by that task and the later ones. 0 never grows."""
    grow_dilations: list[int] = field(default_factory=lambda: [1, 4])
    """Dilations of the residual blocks one growth step appends."""
    max_blocks: int = 64
    """Most residual blocks the backbone may grow to; past it a task stops with CapacityError."""
    prune_candidates: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9])
    """The ratios ``prune_ratio: auto`` chooses from (any order; searched by bisection, so
    about log2(n) + 1 retrain phases per task)."""

    def validate(self, prefix: str) -> None:
        _check(
            0.0 <= self.min_free_fraction < 1.0,
            f"{prefix}.min_free_fraction",
            f"must be in [0, 1), got {self.min_free_fraction}",
        )
        _check(len(self.grow_dilations) >= 1, f"{prefix}.grow_dilations", "needs at least one block")
        for i, d in enumerate(self.grow_dilations):
            _check(d >= 1, f"{prefix}.grow_dilations.{i}", f"must be >= 1, got {d}")
        _check(self.max_blocks >= 1, f"{prefix}.max_blocks", f"must be >= 1, got {self.max_blocks}")
        _check(len(self.prune_candidates) >= 1, f"{prefix}.prune_candidates", "needs at least one ratio")
        _check(
            len(set(self.prune_candidates)) == len(self.prune_candidates),
            f"{prefix}.prune_candidates",
            f"lists a ratio twice: {self.prune_candidates}",
        )
        for i, r in enumerate(self.prune_candidates):
            _check(0.0 <= r < 1.0, f"{prefix}.prune_candidates.{i}", f"must be in [0, 1), got {r}")


@dataclass
class RunConfig:
    """Everything one ``conure run`` needs."""

    seed: int = 0
    """Seed of model initialisation, shuffling and negative sampling."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    """The tasks in training order; the first must be the manifest's sequence (T1) task."""

    def validate(self) -> None:
        self.data.validate("data")
        self.model.validate("model")
        self.train.validate("train")
        self.dist.validate("dist")
        self.method.validate("method")
        self.continual.validate("continual")
        shared = METHODS[self.method.name].partitions_backbone
        _check(
            shared or self.continual.min_free_fraction == 0,
            "continual.min_free_fraction",
            f"grows Conure's shared backbone; method '{self.method.name}' has none to grow",
        )
        _check(
            self.continual.max_blocks >= len(self.model.block_dilations),
            "continual.max_blocks",
            f"is below the {len(self.model.block_dilations)} blocks of model.block_dilations",
        )
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _check(len(self.tasks) >= 1, "tasks", "needs at least one task")
        _check(len(self.tasks) <= 255, "tasks", "at most 255 tasks fit the uint8 ownership records")
        names = [t.name for t in self.tasks]
        if not self.train.validation:
            for i, task in enumerate(self.tasks):
                _check(
                    task.prune_ratio != "auto",
                    f"tasks.{i}.prune_ratio",
                    "'auto' searches by validation score; it needs train.validation: true",
                )
        for i, task in enumerate(self.tasks):
            task.validate(f"tasks.{i}")
            _check(names.count(task.name) == 1, f"tasks.{i}.name", f"'{task.name}' is listed twice")
            # Ratio 0 keeps every free weight: the next task could not start (unless the backbone grows).
            _check(
                not (shared and task.prune_ratio == 0 and i + 1 < len(self.tasks))
                or self.continual.min_free_fraction > 0,
                f"tasks.{i}.prune_ratio",
                f"0 keeps every free conv weight for '{task.name}', so '{names[min(i + 1, len(names) - 1)]}' "
                "after it could not train; use a ratio in (0, 1) or 'auto', or let the backbone grow "
                "(continual.min_free_fraction)",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
