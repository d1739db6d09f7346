"""What both shard writers (``shards.write_dataset`` and ``shard_streaming``) share: the task
record, the argument checks, removing an old manifest and writing one tar shard (see ``shards``
for the layout)."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np
import webdataset as wds

from conure_dist.data.manifest import FORMAT_VERSION, MANIFEST_NAME, ShardInfo
from conure_dist.errors import UserError
from conure_dist.fs import is_local, join
from data_tools.split import check_fractions

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
    histories: list[np.ndarray] | None = None
    """Sequence task, leave-one-out only: each instance's whole chronological history, which may
    be longer than a row of ``seqs`` (its last items); None: the non-padding items of ``seqs``."""
    times: np.ndarray | None = None
    """Item tasks, leave-one-out only: the time of each instance, which orders a user's instances
    (ties and None: the order of the instances)."""

    @property
    def num_instances(self) -> int:
        return len(self.users)

    def subset(self, rows: np.ndarray) -> TaskData:
        """The instances ``rows``, in that order (the split's record of what it holds)."""
        return replace(
            self,
            seqs=None if self.seqs is None else self.seqs[rows],
            users=np.asarray(self.users)[rows],
            targets=None if self.targets is None else np.asarray(self.targets)[rows],
            histories=None if self.histories is None else [self.histories[i] for i in rows],
            times=None if self.times is None else np.asarray(self.times)[rows],
        )


def check_writer_args(
    split: tuple[float, float, float], seed: int, instances_per_shard: int, records_per_sample: int
) -> None:
    """What both writers check before they remove anything."""
    check_fractions(split)
    if seed < 0 or instances_per_shard < 1 or records_per_sample < 1:
        raise UserError(
            f"need seed >= 0, instances_per_shard >= 1 and records_per_sample >= 1, got "
            f"{seed}, {instances_per_shard}, {records_per_sample}"
        )


def remove_old_manifest(out: str) -> None:
    # Drop a previous manifest first: a crash while rewriting shards must not leave a root that
    # looks complete but points at half-replaced files.
    fs, path = fsspec.core.url_to_fs(join(out, MANIFEST_NAME))
    if fs.exists(path):
        fs.rm(path)


def write_shard(
    out: str,
    relative: str,
    task: TaskData,
    part: np.ndarray,
    t1_seqs: np.ndarray,
    records_per_sample: int,
) -> ShardInfo:
    url = join(out, relative)
    _make_parent_dir(url)
    with fsspec.open(url, "wb") as raw:
        sink = _HashingWriter(raw)
        # A fixed mtime makes shards byte-identical across runs, so their checksums are too.
        with wds.TarWriter(sink, encoder=False, mtime=0.0) as tar:
            for key, start in enumerate(range(0, len(part), records_per_sample)):
                tar.write(_chunk_sample(key, task, part[start : start + records_per_sample], t1_seqs))
    return ShardInfo(url=relative, sha256=sink.hexdigest(), num_instances=len(part), num_bytes=sink.num_bytes)


def _chunk_sample(key: int, task: TaskData, rows: np.ndarray, t1_seqs: np.ndarray) -> dict[str, Any]:
    users = np.asarray(task.users, dtype=np.int64)[rows]
    seqs = task.seqs[rows] if task.seqs is not None else t1_seqs[users]
    sample = {
        "__key__": f"{key:09d}",
        "seq.npy": npy_bytes(np.ascontiguousarray(seqs, dtype=np.int32)),
        "user.npy": npy_bytes(users),
    }
    if task.targets is not None:
        sample["target.npy"] = npy_bytes(np.asarray(task.targets, dtype=np.int64)[rows])
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


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_train_counts(out: str, task_name: str, counts: np.ndarray) -> tuple[str, str]:
    """Write a task's ``train_counts.npy`` under ``out``: its path relative to the root and the
    sha256 of its bytes, the two the manifest records (and checks on read)."""
    path = f"{task_name}/train_counts.npy"
    data = npy_bytes(counts)
    write_bytes(join(out, path), data)
    return path, hashlib.sha256(data).hexdigest()


def _make_parent_dir(url: str) -> None:
    # Object stores have no directories; creating one on S3 could even try to create a bucket.
    if is_local(url):
        os.makedirs(os.path.dirname(fsspec.core.url_to_fs(url)[1]), exist_ok=True)


def write_bytes(url: str, data: bytes) -> None:
    _make_parent_dir(url)
    with fsspec.open(url, "wb") as f:
        f.write(data)
