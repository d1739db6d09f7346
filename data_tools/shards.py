"""Write tasks as WebDataset tar shards plus ``manifest.json`` through fsspec.

Layout under ``out`` (a local directory or any fsspec URL: ``s3://bucket/prefix``, ``memory://x``)::

    manifest.json                      written last: a root with a manifest is complete
    {task}/train_counts.npy            int64 target frequencies of the train split
    {task}/{split}-{idx:06d}.tar       shards; each tar sample is a chunk of instances:
        {key:09d}.seq.npy     int32 [n, L]   the user's T1 sequence (the input of every task)
        {key:09d}.target.npy  int64 [n]      item/class tasks only
        {key:09d}.user.npy    int64 [n]      user index (row of the T1 table), for bookkeeping

Instances are stored in chunks rather than one per tar member because per-member overhead
(headers, decoding) would dominate reading time for such tiny records.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import webdataset as wds

from conure_dist.data.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    TASK_KINDS,
    Manifest,
    ShardInfo,
    SplitInfo,
    TaskInfo,
    join_url,
)
from conure_dist.fs import is_local
from data_tools.split import DEFAULT_FRACTIONS, SPLIT_NAMES, check_fractions, split_indices

assert FORMAT_VERSION == 1, "update the writer together with the manifest format"


@dataclass
class TaskData:
    """One task's instances before sharding.

    The input of instance ``i`` is ``seqs[i]`` for the sequence task and ``t1_seqs[users[i]]``
    for item and class tasks, whose ``seqs`` is None.
    """

    name: str
    kind: str
    seqs: np.ndarray | None
    """Sequence task only: int [n, L], left-padded with 0."""
    users: np.ndarray
    """int64 [n]: row of the T1 table each instance belongs to."""
    targets: np.ndarray | None
    """int [n]: item id (0..num_items-1) or class id (0..num_classes-1); None for the sequence task."""
    num_items: int | None = None
    """Sequence task: T1 vocabulary incl. pad; item task: its own vocabulary size."""
    num_classes: int | None = None
    class_names: list[str] | None = None
    vocab: list[str] | None = None
    """Raw id of each item id (index 0 of T1: padding, ''); None where the ids are the raw ids."""

    @property
    def num_instances(self) -> int:
        return len(self.users)


def write_dataset(
    out: str,
    *,
    dataset: str,
    t1_seqs: np.ndarray,
    tasks: list[TaskData],
    seed: int,
    source: dict[str, Any],
    skipped_rows: dict[str, int],
    split: tuple[float, float, float] = DEFAULT_FRACTIONS,
    instances_per_shard: int = 50_000,
    records_per_sample: int = 256,
    user_ids: list[str] | None = None,
) -> Manifest:
    """Split every task, write its shards and train counts, then the manifest; return it.
    ``user_ids``: the raw user id of each T1 row, recorded for predictions."""
    _check_writer_args(split, seed, instances_per_shard, records_per_sample)
    fractions = (float(split[0]), float(split[1]), float(split[2]))
    validate_tasks(np.asarray(t1_seqs), tasks)
    t1_seqs = np.ascontiguousarray(t1_seqs, dtype=np.int32)  # ids were range-checked above
    if user_ids is not None and len(user_ids) != len(t1_seqs):
        raise ValueError(f"user_ids has {len(user_ids)} entries for {len(t1_seqs)} T1 rows")
    _remove_old_manifest(out)
    if user_ids is not None:
        _write_bytes(join_url(out, "users.json"), json.dumps([str(u) for u in user_ids]).encode())
    infos = tuple(
        _write_task(out, i, task, t1_seqs, seed, fractions, instances_per_shard, records_per_sample)
        for i, task in enumerate(tasks)
    )
    manifest = Manifest(
        root=out,
        dataset=dataset,
        seq_len=int(t1_seqs.shape[1]),
        split={"train": fractions[0], "valid": fractions[1], "test": fractions[2], "seed": seed},
        source=source,
        skipped_rows=dict(skipped_rows),
        tasks=infos,
        users=None if user_ids is None else "users.json",
    )
    manifest.save()
    return manifest


def _check_writer_args(split: tuple[float, float, float], seed: int, instances_per_shard: int,
                       records_per_sample: int) -> None:
    """What both writers check before they remove anything."""
    check_fractions(split)
    if seed < 0 or instances_per_shard < 1 or records_per_sample < 1:
        raise ValueError(f"need seed >= 0, instances_per_shard >= 1 and records_per_sample >= 1, got "
                         f"{seed}, {instances_per_shard}, {records_per_sample}")


def validate_tasks(t1_seqs: np.ndarray, tasks: list[TaskData]) -> None:
    """Raise ValueError unless the tasks are consistent with each other and with the T1 table."""
    if t1_seqs.ndim != 2 or t1_seqs.shape[1] < 2:
        raise ValueError(f"t1_seqs must be [num_users, seq_len >= 2], got shape {t1_seqs.shape}")
    if not tasks or tasks[0].kind != "sequence" or sum(t.kind == "sequence" for t in tasks) != 1:
        raise ValueError(
            f"need exactly one 'sequence' task and it must be first, got kinds {[t.kind for t in tasks]}"
        )
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")
    _check_t1_table(t1_seqs, tasks[0])
    for task in tasks:
        _check_task(task, num_users=len(t1_seqs))


def _check_t1_table(t1_seqs: np.ndarray, seq_task: TaskData) -> None:
    vocab = seq_task.num_items
    if vocab is None or vocab < 2:
        raise ValueError(
            f"sequence task '{seq_task.name}' needs num_items >= 2 (pad + items), got {vocab}"
        )
    if t1_seqs.min() < 0 or t1_seqs.max() >= vocab:
        raise ValueError(
            f"t1_seqs ids must lie in 0..{vocab - 1}, got {t1_seqs.min()}..{t1_seqs.max()}"
        )
    present = t1_seqs > 0
    if not present[:, -1].all():
        rows = np.flatnonzero(~present[:, -1])[:5].tolist()
        raise ValueError(
            f"every T1 sequence needs at least one item at the last position; rows {rows} do not"
        )
    # Left padding means that once an item appears, every later position holds one too.
    if (np.diff(present.astype(np.int8), axis=1) < 0).any():
        raise ValueError("t1_seqs must be left-padded: found padding (0) after an item")
    if seq_task.seqs is None or not np.array_equal(seq_task.seqs, t1_seqs[seq_task.users]):
        raise ValueError(f"sequence task '{seq_task.name}': seqs must equal t1_seqs[users]")


def _check_task(task: TaskData, num_users: int) -> None:
    where = f"task '{task.name}'"
    if not task.name or "/" in task.name:
        raise ValueError(
            f"{where}: a task name must be non-empty and free of '/' (it names a directory)"
        )
    if task.kind not in TASK_KINDS:
        raise ValueError(f"{where}: unknown kind '{task.kind}', expected one of {list(TASK_KINDS)}")
    users = np.asarray(task.users)
    if users.ndim != 1 or (len(users) and (users.min() < 0 or users.max() >= num_users)):
        raise ValueError(f"{where}: users must be a 1-D array of T1 rows in 0..{num_users - 1}")
    if task.vocab is not None and (task.kind == "class" or len(task.vocab) != task.num_items):
        raise ValueError(f"{where}: vocab has {len(task.vocab)} ids for num_items={task.num_items}"
                         + (" (class tasks name their classes in class_names)" if task.kind == "class" else ""))
    if task.kind == "sequence":
        return
    if task.seqs is not None:
        raise ValueError(f"{where}: item/class tasks read their input from t1_seqs; pass seqs=None")
    num_outputs = task.num_classes if task.kind == "class" else task.num_items
    if num_outputs is None or num_outputs < 1:
        raise ValueError(
            f"{where}: {task.kind} tasks need {'num_classes' if task.kind == 'class' else 'num_items'} >= 1"
        )
    targets = task.targets
    if targets is None or targets.shape != users.shape:
        raise ValueError(f"{where}: targets must be an array shaped like users {users.shape}")
    if len(targets) and (targets.min() < 0 or targets.max() >= num_outputs):
        raise ValueError(
            f"{where}: targets must lie in 0..{num_outputs - 1}, got {targets.min()}..{targets.max()}"
        )
    if task.class_names is not None and len(task.class_names) != task.num_classes:
        raise ValueError(
            f"{where}: {len(task.class_names)} class names for num_classes={task.num_classes}"
        )


def _remove_old_manifest(out: str) -> None:
    # Drop a previous manifest first: a crash while rewriting shards must not leave a root that
    # looks complete but points at half-replaced files.
    fs, path = fsspec.core.url_to_fs(join_url(out, MANIFEST_NAME))
    if fs.exists(path):
        fs.rm(path)


def _write_task(
    out: str,
    task_index: int,
    task: TaskData,
    t1_seqs: np.ndarray,
    seed: int,
    split: tuple[float, float, float],
    instances_per_shard: int,
    records_per_sample: int,
) -> TaskInfo:
    indices = split_indices(task.num_instances, seed=seed, task_index=task_index, fractions=split)
    splits = {
        name: _write_split(
            out, task, name, indices[name], t1_seqs, instances_per_shard, records_per_sample
        )
        for name in SPLIT_NAMES
    }
    counts_path = f"{task.name}/train_counts.npy"
    _write_bytes(join_url(out, counts_path), _npy_bytes(train_counts(task, indices["train"])))
    vocab_path = None
    if task.vocab is not None:  # its length was checked by validate_tasks
        vocab_path = f"{task.name}/vocab.json"
        _write_bytes(join_url(out, vocab_path), json.dumps([str(v) for v in task.vocab]).encode())
    return TaskInfo(
        name=task.name,
        kind=task.kind,  # type: ignore[arg-type]
        num_items=task.num_items if task.kind != "class" else None,
        num_classes=task.num_classes if task.kind == "class" else None,
        class_names=tuple(task.class_names) if task.class_names is not None else None,
        train_counts=counts_path,
        splits=splits,
        vocab=vocab_path,
    )


def train_counts(task: TaskData, train_indices: np.ndarray) -> np.ndarray:
    """Target frequencies in the train split (int64, one per output): the popularity that the
    trivial reference ranks by and that item and class heads start from.

    For the sequence task these are the non-pad items at positions 1..L-1, a sequence's first
    item included (the loss skips it as a target, having only padding before it); for item and
    class tasks the targets.
    """
    if task.kind == "sequence":
        assert task.seqs is not None and task.num_items is not None
        predicted = task.seqs[train_indices, 1:].ravel()
        counts = np.bincount(predicted, minlength=task.num_items).astype(np.int64)
        counts[0] = 0
        return counts
    assert task.targets is not None
    num_outputs = task.num_classes if task.kind == "class" else task.num_items
    assert num_outputs is not None, "checked by validate_tasks"
    return np.bincount(task.targets[train_indices], minlength=num_outputs).astype(np.int64)


def _write_split(
    out: str,
    task: TaskData,
    split: str,
    indices: np.ndarray,
    t1_seqs: np.ndarray,
    instances_per_shard: int,
    records_per_sample: int,
) -> SplitInfo:
    num_shards = math.ceil(len(indices) / instances_per_shard)
    # Equal-sized shards (rather than full ones plus a small tail) keep per-shard work balanced.
    parts = np.array_split(indices, num_shards) if num_shards else []
    shards = tuple(
        _write_shard(
            out, f"{task.name}/{split}-{s:06d}.tar", task, part, t1_seqs, records_per_sample
        )
        for s, part in enumerate(parts)
    )
    return SplitInfo(num_instances=len(indices), shards=shards)


def _write_shard(
    out: str,
    relative: str,
    task: TaskData,
    part: np.ndarray,
    t1_seqs: np.ndarray,
    records_per_sample: int,
) -> ShardInfo:
    url = join_url(out, relative)
    _make_parent_dir(url)
    with fsspec.open(url, "wb") as raw:
        sink = _HashingWriter(raw)
        # A fixed mtime makes shards byte-identical across runs, so their checksums are too.
        with wds.TarWriter(sink, encoder=False, mtime=0.0) as tar:
            for key, start in enumerate(range(0, len(part), records_per_sample)):
                tar.write(
                    _chunk_sample(key, task, part[start : start + records_per_sample], t1_seqs)
                )
    return ShardInfo(
        url=relative, sha256=sink.hexdigest(), num_instances=len(part), num_bytes=sink.num_bytes
    )


def _chunk_sample(
    key: int, task: TaskData, rows: np.ndarray, t1_seqs: np.ndarray
) -> dict[str, Any]:
    users = np.asarray(task.users, dtype=np.int64)[rows]
    seqs = task.seqs[rows] if task.seqs is not None else t1_seqs[users]
    sample = {
        "__key__": f"{key:09d}",
        "seq.npy": _npy_bytes(np.ascontiguousarray(seqs, dtype=np.int32)),
        "user.npy": _npy_bytes(users),
    }
    if task.targets is not None:
        sample["target.npy"] = _npy_bytes(np.asarray(task.targets, dtype=np.int64)[rows])
    return sample


class _HashingWriter:
    """File-object wrapper that hashes and counts the bytes on their way to the real file."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.sha, self.num_bytes = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.num_bytes += len(data)
        self.raw.write(data)
        return len(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _make_parent_dir(url: str) -> None:
    # Object stores have no directories; creating one on S3 could even try to create a bucket.
    if is_local(url):
        os.makedirs(os.path.dirname(fsspec.core.url_to_fs(url)[1]), exist_ok=True)


def _write_bytes(url: str, data: bytes) -> None:
    _make_parent_dir(url)
    with fsspec.open(url, "wb") as f:
        f.write(data)


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

    def __init__(self, out: str, *, dataset: str, tasks: list[StreamTask], seq_len: int, seed: int,
                 split: tuple[float, float, float] = DEFAULT_FRACTIONS, instances_per_shard: int = 50_000,
                 records_per_sample: int = 256) -> None:
        _check_writer_args(split, seed, instances_per_shard, records_per_sample)
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
        _remove_old_manifest(out)

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
            raise ValueError(f"task '{task}': targets must lie in 0..{spec.num_outputs - 1}, "
                             f"got {targets.min()}..{targets.max()}")
        rng = np.random.default_rng([self.seed, index, self.chunks[task]])
        self.chunks[task] += 1
        draw = rng.random(len(users))
        cut = np.cumsum(self.fractions)
        which = np.searchsorted(cut[:2], draw, side="right")
        for s, split in enumerate(SPLIT_NAMES):
            rows = np.flatnonzero(which == s)
            if not len(rows):
                continue
            part = (seqs[rows].astype(np.int32), users[rows].astype(np.int64),
                    None if targets is None else targets[rows].astype(np.int64))
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
            self.shards[task, split].append(
                _write_shard(self.out, relative, data, rows, seqs, self.records_per_sample))
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
            counts_path = f"{task.name}/train_counts.npy"
            _write_bytes(join_url(self.out, counts_path), _npy_bytes(counts))
            splits = {s: SplitInfo(num_instances=sum(sh.num_instances for sh in self.shards[task.name, s]),
                                   shards=tuple(self.shards[task.name, s])) for s in SPLIT_NAMES}
            infos.append(TaskInfo(
                name=task.name, kind=task.kind,  # type: ignore[arg-type]
                num_items=task.num_outputs if task.kind != "class" else None,
                num_classes=task.num_outputs if task.kind == "class" else None,
                class_names=tuple(task.class_names) if task.class_names is not None else None,
                train_counts=counts_path, splits=splits))
        manifest = Manifest(root=self.out, dataset=self.dataset, seq_len=self.seq_len,
                            split={"train": self.fractions[0], "valid": self.fractions[1],
                                   "test": self.fractions[2], "seed": self.seed},
                            source=source, skipped_rows={}, tasks=tuple(infos))
        manifest.save()
        return manifest
