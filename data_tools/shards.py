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

import json
import math
from typing import Any, NamedTuple

import numpy as np

from conure_dist.data.manifest import TASK_KINDS, Manifest, SplitInfo, TaskInfo
from conure_dist.errors import UserError
from conure_dist.fs import join
from data_tools.shard_common import (
    TaskData,
    check_writer_args,
    remove_old_manifest,
    write_bytes,
    write_shard,
    write_train_counts,
)
from data_tools.split import (
    DEFAULT_FRACTIONS,
    PROTOCOLS,
    SPLIT_NAMES,
    leave_one_out_indices,
    sequence_windows,
    split_indices,
    stratified_indices,
)

__all__ = ["Part", "TaskData", "split_task", "train_counts", "validate_tasks", "write_dataset"]


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
    protocol: str = "random",
) -> Manifest:
    """Split every task (``protocol``: see ``split_task``), write its shards and train counts,
    then the manifest; return it. ``user_ids``: the raw user id of each T1 row, recorded for
    predictions."""
    check_writer_args(split, seed, instances_per_shard, records_per_sample)
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown split protocol '{protocol}', expected one of {list(PROTOCOLS)}")
    fractions = (float(split[0]), float(split[1]), float(split[2]))
    validate_tasks(np.asarray(t1_seqs), tasks)
    t1_seqs = np.ascontiguousarray(t1_seqs, dtype=np.int32)  # ids were range-checked above
    if user_ids is not None and len(user_ids) != len(t1_seqs):
        raise ValueError(f"user_ids has {len(user_ids)} entries for {len(t1_seqs)} T1 rows")
    remove_old_manifest(out)
    if user_ids is not None:
        write_bytes(join(out, "users.json"), json.dumps([str(u) for u in user_ids]).encode())
    parts = [
        split_task(task, i, t1_seqs, seed=seed, fractions=fractions, protocol=protocol) for i, task in enumerate(tasks)
    ]
    infos = tuple(
        _write_task(out, task, part, t1_seqs, instances_per_shard, records_per_sample)
        for task, part in zip(tasks, parts, strict=True)
    )
    spec: dict[str, Any] = {"train": fractions[0], "valid": fractions[1], "test": fractions[2], "seed": seed}
    if protocol != "random":
        spec.update(_leave_one_out_record(tasks, parts))
    manifest = Manifest(
        root=out,
        dataset=dataset,
        seq_len=int(t1_seqs.shape[1]),
        split=spec,
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


class Part(NamedTuple):
    """A split's instances: ``rows`` of ``task`` (the task itself, or the leave-one-out windows
    cut from a sequence task), in the order they are written. Rows, not copies: on TTL's T1 a
    copy of each split's sequences would hold the whole table again."""

    task: TaskData
    rows: np.ndarray


def split_task(
    task: TaskData,
    task_index: int,
    t1_seqs: np.ndarray,
    *,
    seed: int,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    protocol: str = "random",
) -> dict[str, Part]:
    """Each split's instances of ``task``.

    ``random`` (the paper's): the instances are shuffled and cut by ``fractions``.
    ``leave_one_out``: per user, the sequence task's last item is the test target and the one
    before the validation target (``split.sequence_windows``: the test input is the history up to
    the last item, and the training part is cut into windows of ``seq_len``); an item task's last
    instance in time is test and the one before valid (``split.leave_one_out_indices``); a class
    task is split by ``fractions`` within each class (``split.stratified_indices``). The training
    instances are shuffled (seeded by ``seed`` and ``task_index``) so that shards mix users.
    """
    if protocol == "random":
        indices = split_indices(task.num_instances, seed=seed, task_index=task_index, fractions=fractions)
        return {name: Part(task, indices[name]) for name in SPLIT_NAMES}
    if task.kind == "sequence":
        windows = _sequence_splits(task, t1_seqs.shape[1])
        parts = {name: Part(w, np.arange(w.num_instances)) for name, w in windows.items()}
    elif task.kind == "item":
        parts = {name: Part(task, rows) for name, rows in leave_one_out_indices(task.users, task.times).items()}
    else:
        assert task.targets is not None
        rows = stratified_indices(task.targets, seed=seed, task_index=task_index, fractions=fractions)
        parts = {name: Part(task, r) for name, r in rows.items()}
    train = parts["train"]
    shuffle = np.random.default_rng([seed, task_index]).permutation(len(train.rows))
    return {**parts, "train": Part(train.task, train.rows[shuffle])}


def _sequence_splits(task: TaskData, seq_len: int) -> dict[str, TaskData]:
    assert task.seqs is not None
    seqs: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    users: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for i, user in enumerate(np.asarray(task.users)):
        history = task.histories[i] if task.histories is not None else task.seqs[i][task.seqs[i] > 0]
        for name, rows in sequence_windows(history, seq_len).items():
            seqs[name].append(rows)
            users[name].append(np.full(len(rows), user, dtype=np.int64))
    return {
        name: TaskData(
            task.name,
            task.kind,
            np.concatenate(seqs[name]),
            np.concatenate(users[name]),
            None,
            num_items=task.num_items,
            vocab=task.vocab,
        )
        for name in SPLIT_NAMES
    }


def _leave_one_out_record(tasks: list[TaskData], parts: list[dict[str, Part]]) -> dict[str, Any]:
    """What the manifest's ``split`` records of a leave-one-out split, beside the fractions that
    the class tasks are split by."""
    return {
        "protocol": "leave_one_out",
        "profile_split": "stratified by class, by the train/valid/test fractions",
        "users_evaluated": {
            task.name: int(len(np.unique(np.asarray(part["test"].task.users)[part["test"].rows])))
            for task, part in zip(tasks, parts, strict=True)
        },
    }


def _write_task(
    out: str,
    task: TaskData,
    parts: dict[str, Part],
    t1_seqs: np.ndarray,
    instances_per_shard: int,
    records_per_sample: int,
) -> TaskInfo:
    splits = {
        name: _write_split(out, parts[name], name, t1_seqs, instances_per_shard, records_per_sample)
        for name in SPLIT_NAMES
    }
    counts_path, counts_sha256 = write_train_counts(out, task.name, train_counts(*parts["train"]))
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
        train_counts_sha256=counts_sha256,
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
    part: Part,
    split: str,
    t1_seqs: np.ndarray,
    instances_per_shard: int,
    records_per_sample: int,
) -> SplitInfo:
    task, indices = part
    num_shards = math.ceil(len(indices) / instances_per_shard)
    # Equal-sized shards (rather than full ones plus a small tail) keep per-shard work balanced.
    parts = np.array_split(indices, num_shards) if num_shards else []
    shards = tuple(
        write_shard(out, f"{task.name}/{split}-{s:06d}.tar", task, part, t1_seqs, records_per_sample)
        for s, part in enumerate(parts)
    )
    return SplitInfo(num_instances=len(indices), shards=shards)
