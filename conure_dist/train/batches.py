"""What a phase feeds its engine: this rank's share of each global batch, and its negatives."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as tdist

from conure_dist.config import RunConfig
from conure_dist.data.manifest import Manifest, TaskInfo
from conure_dist.data.stream import Batch, iter_batches, num_steps_per_epoch
from conure_dist.dist import DistInfo
from conure_dist.train.samplers import PopularityNegativeSampler, SharedNegativeSampler, hash_seed

NegativeDrawer = Callable[[torch.Generator], torch.Tensor | None]


def steps_per_epoch(cfg: RunConfig, manifest: Manifest, task: str, global_batch: int) -> int:
    """Optimizer steps in one epoch of ``task``: full global batches, capped by
    ``train.max_steps_per_epoch``."""
    steps = max(1, num_steps_per_epoch(manifest, task, "train", global_batch, drop_last=True))
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    return steps


def train_batches(
    cfg: RunConfig,
    manifest: Manifest,
    dist: DistInfo,
    task: str,
    global_batch: int,
    *,
    seed: int,
    epoch: int,
    num_steps: int,
    start_step: int = 0,
) -> Iterator[Batch]:
    """This rank's batches of one shuffled epoch over ``task``'s train split, from ``start_step``."""
    return iter_batches(
        manifest,
        task,
        "train",
        global_batch // dist.world_size,
        shuffle=True,
        seed=seed,
        epoch=epoch,
        rank=dist.rank,
        world_size=dist.world_size,
        num_steps=num_steps,
        drop_last=True,
        shuffle_buffer=cfg.data.shuffle_buffer,
        partition=cfg.data.partition,
        start_step=start_step,
    )


def negative_drawer(
    cfg: RunConfig, manifest: Manifest, dist: DistInfo, info: TaskInfo, global_batch: int
) -> NegativeDrawer:
    """Negatives (on the CPU) drawn for the global batch from a generator shared by all ranks:
    T1's are shared by the whole batch; for an item task rank r takes entries r, r+W, ... like
    its instances under the stride partition, so a step equals the single-process one."""
    if info.kind == "sequence":
        sampler = SharedNegativeSampler(info.num_outputs, cfg.train.negative_fraction)
        return sampler.sample
    if info.kind == "item":
        pop = PopularityNegativeSampler(manifest.load_train_counts(info.name), cfg.train.bpr_rho)
        rank, world = dist.rank, dist.world_size
        return lambda g: pop.sample(global_batch, g)[rank::world]
    return lambda g: None


_MASK64 = (1 << 64) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash, element-wise (wrapping int64 arithmetic, the same on every machine)."""
    x = x ^ (x >> 31)
    x = x * 0x5851F42D4C957F2D
    return x ^ (x >> 29)


def batch_digest(
    users: torch.Tensor, negatives: torch.Tensor | None, shared: bool, step: int, dist: DistInfo
) -> torch.Tensor:
    """This rank's part of a fingerprint of global batch ``step``: which user sits at which
    place of the global batch (rank r's instance j at r + jW, as the stride partition lays them
    out) and which negatives it was given (one per instance, or ``shared`` by the whole batch as
    T1's). Parts add up over ranks (int64, wrapping), so the all-reduced sum equals the
    single-process fingerprint exactly when the global batch and its negatives are the same.
    Shared negatives count once, from rank 0."""
    position = dist.rank + dist.world_size * torch.arange(len(users))
    h = _mix(users.long() * 0x1E3779B97F4A7C15 + position * 0x632BE59BD9B4E019 + step)
    if negatives is not None and not shared:
        h = _mix(h + negatives.long())
    total = _mix(h).sum()
    if negatives is not None and shared and dist.is_main:
        total = total + _mix(negatives.long() * 0x14D049BB133111EB + torch.arange(len(negatives)) + step).sum()
    return total


def add_digest(total: int, part: int | torch.Tensor) -> int:
    """A running fingerprint plus one batch's part, as an unsigned 64-bit integer."""
    return (total + int(part)) & _MASK64


def sum_digest_over_ranks(value: int, dist: DistInfo) -> int:
    """Every rank's part of a fingerprint summed (collective; int64 sums wrap as the parts'
    own do), as an unsigned 64-bit integer."""
    if not dist.is_distributed:
        return value
    signed = torch.tensor([value - (1 << 64) if value >= 1 << 63 else value], dtype=torch.int64, device=dist.device)
    tdist.all_reduce(signed)
    return int(signed.item()) & _MASK64


def format_digest(value: int) -> str:
    """A fingerprint as 16 hex digits."""
    return f"{value & _MASK64:016x}"


def micro_batches(
    k: int,
    seq: torch.Tensor,
    task: str,
    target: torch.Tensor | None,
    negatives: torch.Tensor | None,
    shared: bool,
    joint: tuple[str, torch.Tensor, torch.Tensor, float] | None = None,
) -> list[tuple]:
    """A step's model inputs in ``k`` strided parts (part i: instances i, i+k, ...), as the
    stride partition deals a batch to ranks (``train.grad_accum``). ``shared`` negatives (T1's)
    go to every part; otherwise each instance keeps its own. ``joint`` (task, T1 batch, its
    shared negatives, weight) is split alike."""

    def part(x: torch.Tensor, i: int) -> torch.Tensor:
        return x if k == 1 else x[i::k].contiguous()

    parts = []
    for i in range(k):
        inputs: tuple = (
            part(seq, i),
            task,
            None if target is None else part(target, i),
            negatives if negatives is None or shared else part(negatives, i),
        )
        if joint is not None:
            name, t1_seq, t1_negatives, weight = joint
            inputs += ((name, part(t1_seq, i), t1_negatives, weight),)
        parts.append(inputs)
    return parts


class JointBatches:
    """T1 batches (of T1's own batch size) and their negatives, cycling over T1's train split:
    what a method that keeps training T1 alongside a later task (MTL) adds to each step."""

    def __init__(self, cfg: RunConfig, manifest: Manifest, dist: DistInfo, t1: TaskInfo, global_batch: int) -> None:
        self.cfg, self.manifest, self.dist, self.t1 = cfg, manifest, dist, t1
        self.global_batch = global_batch
        self.draw = negative_drawer(cfg, manifest, dist, t1, global_batch)
        self.epoch = 0
        self.batches: Iterator[Batch] | None = None

    def __call__(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self.batches is None:
                num_steps = max(
                    1, num_steps_per_epoch(self.manifest, self.t1.name, "train", self.global_batch, drop_last=True)
                )
                self.batches = iter(
                    train_batches(
                        self.cfg,
                        self.manifest,
                        self.dist,
                        self.t1.name,
                        self.global_batch,
                        seed=hash_seed(self.cfg.seed, 0, 9, self.epoch),
                        epoch=self.epoch,
                        num_steps=num_steps,
                    )
                )
            batch = next(self.batches, None)
            if batch is not None:
                return to_device(batch.seq, self.dist.device), to_device(self.draw(generator), self.dist.device)
            self.epoch += 1
            self.batches = None


class Prefetcher:
    """Reads ``depth`` batches ahead on a background thread (shard reading, decoding, shuffling
    and, for a GPU, pinning run while the device trains), in the same order. The consumer's
    position is what it took, so checkpoints record exactly the batches trained on. Errors of
    the reader surface in the consumer; ``close`` (or leaving the loop) stops the thread."""

    _DONE = object()

    def __init__(self, batches: Iterable[Batch], depth: int, pin: bool = False) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.pin = pin
        self.thread = threading.Thread(target=self._read, args=(iter(batches),), daemon=True, name="conure-prefetch")
        self.thread.start()

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, batches: Iterator[Batch]) -> None:
        try:
            for batch in batches:
                if self.pin:
                    batch = Batch(
                        batch.seq.pin_memory(), None if batch.target is None else batch.target.pin_memory(), batch.user
                    )
                if not self._put(batch):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)
            return
        self._put(self._DONE)

    def __iter__(self) -> Iterator[Batch]:
        try:
            while True:
                item = self.queue.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (on the CPU) on ``device``. For a GPU through pinned memory without waiting: the
    host goes on (drawing the next step's negatives, say) while the copy and the step run."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def prefetched(batches: Iterable[Batch], depth: int, device: torch.device) -> Iterable[Batch]:
    """``batches`` read ``depth`` ahead on a thread (pinned for a GPU); as they are for depth 0."""
    return Prefetcher(batches, depth, pin=device.type == "cuda") if depth > 0 else batches
