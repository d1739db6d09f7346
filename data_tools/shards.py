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

The in-memory writer ``write_dataset`` is here; ``shard_streaming.StreamingDatasetWriter`` writes
the same layout while instances arrive in chunks, and ``shard_common`` holds what both share.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from conure_dist.data.manifest import TASK_KINDS, Manifest, SplitInfo, TaskInfo
from conure_dist.fs import join
from data_tools.shard_common import (
    TaskData,
    check_writer_args,
    npy_bytes,
    remove_old_manifest,
    write_bytes,
    write_shard,
)
from data_tools.split import DEFAULT_FRACTIONS, SPLIT_NAMES, split_indices

__all__ = ["TaskData", "train_counts", "validate_tasks", "write_dataset"]


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
    check_writer_args(split, seed, instances_per_shard, records_per_sample)
    fractions = (float(split[0]), float(split[1]), float(split[2]))
    validate_tasks(np.asarray(t1_seqs), tasks)
    t1_seqs = np.ascontiguousarray(t1_seqs, dtype=np.int32)  # ids were range-checked above
    if user_ids is not None and len(user_ids) != len(t1_seqs):
        raise ValueError(f"user_ids has {len(user_ids)} entries for {len(t1_seqs)} T1 rows")
    remove_old_manifest(out)
    if user_ids is not None:
        write_bytes(join(out, "users.json"), json.dumps([str(u) for u in user_ids]).encode())
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


def validate_tasks(t1_seqs: np.ndarray, tasks: list[TaskData]) -> None:
    """Raise ValueError unless the tasks are consistent with each other and with the T1 table."""
    if t1_seqs.ndim != 2 or t1_seqs.shape[1] < 2:
        raise ValueError(f"t1_seqs must be [num_users, seq_len >= 2], got shape {t1_seqs.shape}")
    if not tasks or tasks[0].kind != "sequence" or sum(t.kind == "sequence" for t in tasks) != 1:
        raise ValueError(f"need exactly one 'sequence' task and it must be first, got kinds {[t.kind for t in tasks]}")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")
    _check_t1_table(t1_seqs, tasks[0])
    for task in tasks:
        _check_task(task, num_users=len(t1_seqs))


def _check_t1_table(t1_seqs: np.ndarray, seq_task: TaskData) -> None:
    vocab = seq_task.num_items
    if vocab is None or vocab < 2:
        raise ValueError(f"sequence task '{seq_task.name}' needs num_items >= 2 (pad + items), got {vocab}")
    if t1_seqs.min() < 0 or t1_seqs.max() >= vocab:
        raise ValueError(f"t1_seqs ids must lie in 0..{vocab - 1}, got {t1_seqs.min()}..{t1_seqs.max()}")
    present = t1_seqs > 0
    if not present[:, -1].all():
        rows = np.flatnonzero(~present[:, -1])[:5].tolist()
        raise ValueError(f"every T1 sequence needs at least one item at the last position; rows {rows} do not")
    # Left padding means that once an item appears, every later position holds one too.
    if (np.diff(present.astype(np.int8), axis=1) < 0).any():
        raise ValueError("t1_seqs must be left-padded: found padding (0) after an item")
    if seq_task.seqs is None or not np.array_equal(seq_task.seqs, t1_seqs[seq_task.users]):
        raise ValueError(f"sequence task '{seq_task.name}': seqs must equal t1_seqs[users]")


def _check_task(task: TaskData, num_users: int) -> None:
    where = f"task '{task.name}'"
    if not task.name or "/" in task.name:
        raise ValueError(f"{where}: a task name must be non-empty and free of '/' (it names a directory)")
    if task.kind not in TASK_KINDS:
        raise ValueError(f"{where}: unknown kind '{task.kind}', expected one of {list(TASK_KINDS)}")
    users = np.asarray(task.users)
    if users.ndim != 1 or (len(users) and (users.min() < 0 or users.max() >= num_users)):
        raise ValueError(f"{where}: users must be a 1-D array of T1 rows in 0..{num_users - 1}")
    if task.vocab is not None and (task.kind == "class" or len(task.vocab) != task.num_items):
        raise ValueError(
            f"{where}: vocab has {len(task.vocab)} ids for num_items={task.num_items}"
            + (" (class tasks name their classes in class_names)" if task.kind == "class" else "")
        )
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
        raise ValueError(f"{where}: targets must lie in 0..{num_outputs - 1}, got {targets.min()}..{targets.max()}")
    if task.class_names is not None and len(task.class_names) != task.num_classes:
        raise ValueError(f"{where}: {len(task.class_names)} class names for num_classes={task.num_classes}")


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
        name: _write_split(out, task, name, indices[name], t1_seqs, instances_per_shard, records_per_sample)
        for name in SPLIT_NAMES
    }
    counts_path = f"{task.name}/train_counts.npy"
    counts_npy = npy_bytes(train_counts(task, indices["train"]))
    write_bytes(join(out, counts_path), counts_npy)
    vocab_path = None
    if task.vocab is not None:  # its length was checked by validate_tasks
        vocab_path = f"{task.name}/vocab.json"
        write_bytes(join(out, vocab_path), json.dumps([str(v) for v in task.vocab]).encode())
    return TaskInfo(
        name=task.name,
        kind=task.kind,  # type: ignore[arg-type]
        num_items=task.num_items if task.kind != "class" else None,
        num_classes=task.num_classes if task.kind == "class" else None,
        class_names=tuple(task.class_names) if task.class_names is not None else None,
        train_counts=counts_path,
        splits=splits,
        train_counts_sha256=hashlib.sha256(counts_npy).hexdigest(),
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
        write_shard(out, f"{task.name}/{split}-{s:06d}.tar", task, part, t1_seqs, records_per_sample)
        for s, part in enumerate(parts)
    )
    return SplitInfo(num_instances=len(indices), shards=shards)
