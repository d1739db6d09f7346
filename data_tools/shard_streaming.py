"""The streaming shard writer: the layout of ``shards``, written while instances arrive in
chunks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from conure_dist.data.manifest import Manifest, ShardInfo, SplitInfo, TaskInfo
from data_tools.shard_common import (
    TaskData,
    check_writer_args,
    remove_old_manifest,
    write_shard,
    write_train_counts,
)
from data_tools.split import DEFAULT_FRACTIONS, SPLIT_NAMES


@dataclass
class StreamTask:
    """What the streaming writer needs to know of a task before its instances arrive."""

    name: str
    kind: str
    num_outputs: int
    """Sequence task: T1 vocabulary incl. pad; item task: its vocabulary; class task: classes."""
    class_names: list[str] | None = None


class StreamingDatasetWriter:
    """Writes shards while instances arrive in chunks, with memory bounded by the open shards.

    Each instance goes to train/valid/test by its own random draw (seeded by the split seed, the
    task and the chunk), so split sizes are close to, not exactly at, the fractions. Whenever a
    (task, split) buffer holds ``instances_per_shard`` instances, its full shards are written and
    the rest stays buffered; ``close`` writes the remainders, the train counts and, last, the
    manifest.
    """

    def __init__(
        self,
        out: str,
        *,
        dataset: str,
        tasks: list[StreamTask],
        seq_len: int,
        seed: int,
        split: tuple[float, float, float] = DEFAULT_FRACTIONS,
        instances_per_shard: int = 50_000,
        records_per_sample: int = 256,
    ) -> None:
        check_writer_args(split, seed, instances_per_shard, records_per_sample)
        if not tasks or tasks[0].kind != "sequence" or any(t.kind == "sequence" for t in tasks[1:]):
            raise ValueError("the first task, and only it, must be the sequence task")
        self.out, self.dataset, self.tasks, self.seq_len, self.seed = out, dataset, tasks, seq_len, seed
        self.fractions = tuple(float(f) for f in split)
        self.instances_per_shard, self.records_per_sample = instances_per_shard, records_per_sample
        self.buffers = {(t.name, s): [] for t in tasks for s in SPLIT_NAMES}
        self.buffered = dict.fromkeys(self.buffers, 0)
        self.shards: dict[tuple[str, str], list[ShardInfo]] = {k: [] for k in self.buffers}
        self.counts = {t.name: np.zeros(t.num_outputs, dtype=np.int64) for t in tasks}
        self.chunks = dict.fromkeys((t.name for t in tasks), 0)
        remove_old_manifest(out)

    def add(self, task: str, seqs: np.ndarray, users: np.ndarray, targets: np.ndarray | None = None) -> None:
        """Instances of ``task``: inputs [n, L] (int32), T1 rows [n] and, for item/class tasks, targets [n]."""
        names = [t.name for t in self.tasks]
        if task not in names:
            raise ValueError(f"unknown task '{task}', expected one of {names}")
        index = names.index(task)
        spec = self.tasks[index]
        if seqs.ndim != 2 or seqs.shape[1] != self.seq_len or len(seqs) != len(users):
            raise ValueError(f"task '{task}': seqs must be [n, {self.seq_len}] with n = len(users), got {seqs.shape}")
        if len(seqs) and (seqs.min() < 0 or seqs.max() >= self.tasks[0].num_outputs):
            raise ValueError(f"task '{task}': item ids must lie in 0..{self.tasks[0].num_outputs - 1}")
        if (targets is None) != (spec.kind == "sequence"):
            raise ValueError(f"task '{task}' ({spec.kind}): targets are required for item/class tasks only")
        if targets is not None and len(targets) and (targets.min() < 0 or targets.max() >= spec.num_outputs):
            raise ValueError(
                f"task '{task}': targets must lie in 0..{spec.num_outputs - 1}, got {targets.min()}..{targets.max()}"
            )
        rng = np.random.default_rng([self.seed, index, self.chunks[task]])
        self.chunks[task] += 1
        draw = rng.random(len(users))
        cut = np.cumsum(self.fractions)
        which = np.searchsorted(cut[:2], draw, side="right")
        for s, split in enumerate(SPLIT_NAMES):
            rows = np.flatnonzero(which == s)
            if not len(rows):
                continue
            part = (
                seqs[rows].astype(np.int32),
                users[rows].astype(np.int64),
                None if targets is None else targets[rows].astype(np.int64),
            )
            if split == "train":
                predicted = part[0][:, 1:].ravel() if targets is None else part[2]
                self.counts[task] += np.bincount(predicted, minlength=len(self.counts[task]))
            self.buffers[task, split].append(part)
            self.buffered[task, split] += len(rows)
            if self.buffered[task, split] >= self.instances_per_shard:
                self._flush(task, split)

    def _flush(self, task: str, split: str, final: bool = False) -> None:
        """Write the buffer's full shards of ``instances_per_shard`` instances and keep the rest,
        or with ``final`` write the rest too."""
        parts = self.buffers[task, split]
        if not parts:
            return
        seqs = np.concatenate([p[0] for p in parts])
        users = np.concatenate([p[1] for p in parts])
        targets = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
        size = self.instances_per_shard
        written = len(users) if final else len(users) // size * size
        data = TaskData(task, "sequence" if targets is None else "item", seqs, users, targets)
        for start in range(0, written, size):
            rows = np.arange(start, min(start + size, written))
            relative = f"{task}/{split}-{len(self.shards[task, split]):06d}.tar"
            self.shards[task, split].append(write_shard(self.out, relative, data, rows, seqs, self.records_per_sample))
        # Copies: views would keep the whole concatenated buffer alive.
        rest = (seqs[written:].copy(), users[written:].copy(), None if targets is None else targets[written:].copy())
        self.buffers[task, split] = [rest] if written < len(users) else []
        self.buffered[task, split] = len(users) - written

    def close(self, source: dict[str, Any]) -> Manifest:
        infos = []
        for task in self.tasks:
            for split in SPLIT_NAMES:
                self._flush(task.name, split, final=True)
            counts = self.counts[task.name]
            if task.kind == "sequence":
                counts[0] = 0
            counts_path, counts_sha256 = write_train_counts(self.out, task.name, counts)
            splits = {
                s: SplitInfo(
                    num_instances=sum(sh.num_instances for sh in self.shards[task.name, s]),
                    shards=tuple(self.shards[task.name, s]),
                )
                for s in SPLIT_NAMES
            }
            infos.append(
                TaskInfo(
                    name=task.name,
                    kind=task.kind,  # type: ignore[arg-type]
                    num_items=task.num_outputs if task.kind != "class" else None,
                    num_classes=task.num_outputs if task.kind == "class" else None,
                    class_names=tuple(task.class_names) if task.class_names is not None else None,
                    train_counts=counts_path,
                    splits=splits,
                    train_counts_sha256=counts_sha256,
                )
            )
        manifest = Manifest(
            root=self.out,
            dataset=self.dataset,
            seq_len=self.seq_len,
            split={
                "train": self.fractions[0],
                "valid": self.fractions[1],
                "test": self.fractions[2],
                "seed": self.seed,
            },
            source=source,
            skipped_rows={},
            tasks=tuple(infos),
        )
        manifest.save()
        return manifest
