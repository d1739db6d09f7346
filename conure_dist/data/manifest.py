"""The shard manifest: what a data root holds, read and written through fsspec.

A data root (local directory or fsspec URL such as ``s3://bucket/prefix``) holds
``manifest.json`` plus, per task and split, WebDataset tar shards. The manifest is written last,
so a root that has one is complete. Shard URLs inside it are relative to the root, so a root can
be copied or moved (for example from local disk to S3) without rewriting it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import fsspec
import numpy as np

from conure_dist.errors import UserError
from conure_dist.fs import join, write_atomic

TaskKind = Literal["sequence", "item", "class"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)
SPLITS: tuple[str, ...] = ("train", "valid", "test")
MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "conure-shards"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its URL relative to the root, checksum and size as written."""

    url: str
    sha256: str | None
    """null in the manifest where no checksum was recorded (readers then check size and count only)."""
    num_instances: int
    num_bytes: int


@dataclass(frozen=True)
class SplitInfo:
    """The shards of one (task, split), in reading order; ``num_instances`` is their sum."""

    num_instances: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class TaskInfo:
    """One task of the continual sequence, as converted."""

    name: str
    kind: TaskKind
    num_items: int | None
    """Vocabulary size: T1 items including the pad id 0 (sequence), or the task's own items (item)."""
    num_classes: int | None
    class_names: tuple[str, ...] | None
    train_counts: str
    """Relative path of an int64 ``.npy`` with target frequencies in the train split."""
    splits: dict[str, SplitInfo] = field(hash=False)
    train_counts_sha256: str | None = None
    """sha256 of the ``train_counts`` file as written (null in manifests written before it was
    recorded: then only its shape, type and signs are checked)."""
    vocab: str | None = None
    """Relative path of a JSON list with the raw id (a string) of each output id, index 0 of T1
    being padding; None where the ids are the raw ids (synthetic data) or for class tasks."""

    @property
    def num_outputs(self) -> int:
        """Size of the task's output layer: items for sequence/item tasks, classes for class tasks."""
        value = self.num_classes if self.kind == "class" else self.num_items
        assert value is not None, f"task {self.name} was validated on load"
        return value


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know about a data root."""

    root: str
    """The directory or URL the manifest was loaded from (not stored in the JSON)."""
    dataset: str
    seq_len: int
    split: dict[str, Any] = field(hash=False)
    source: dict[str, Any] = field(hash=False)
    skipped_rows: dict[str, int] = field(hash=False)
    tasks: tuple[TaskInfo, ...]
    users: str | None = None
    """Relative path of a JSON list with the raw user id of each T1 row (the ``user`` of every
    instance); None where the source has no user ids."""

    @property
    def path(self) -> str:
        return join(self.root, MANIFEST_NAME)

    @property
    def num_seq_items(self) -> int:
        """T1 vocabulary size including the pad id 0."""
        return self.tasks[0].num_outputs

    def task(self, name: str) -> TaskInfo:
        for info in self.tasks:
            if info.name == name:
                return info
        names = ", ".join(t.name for t in self.tasks)
        raise UserError(f"no task '{name}' in {self.path}; available: {names}")

    def split_info(self, task: str, split: str) -> SplitInfo:
        info = self.task(task)
        if split not in info.splits:
            raise UserError(f"no split '{split}' for task '{task}' in {self.path}; available: {', '.join(info.splits)}")
        return info.splits[split]

    def shard_urls(self, task: str, split: str) -> list[str]:
        """Absolute shard URLs of (task, split), in manifest order."""
        return [join(self.root, s.url) for s in self.split_info(task, split).shards]

    def load_train_counts(self, task: str) -> np.ndarray:
        """Target frequencies of the train split (int64, one entry per output)."""
        info = self.task(task)
        url = join(self.root, info.train_counts)
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
        except FileNotFoundError as exn:
            raise UserError(f"train counts of task '{task}' missing: {url}") from exn
        if info.train_counts_sha256 is not None and hashlib.sha256(data).hexdigest() != info.train_counts_sha256:
            raise UserError(f"{url} does not match its sha256 in {self.path}: the file changed after it was written")
        try:
            counts = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exn:
            raise UserError(f"{url}: not a NumPy array file ({exn})") from None
        if counts.dtype != np.int64 or counts.shape != (info.num_outputs,):
            raise UserError(
                f"{url}: expected int64 array of shape ({info.num_outputs},), got {counts.dtype} {counts.shape}"
            )
        if (counts < 0).any():
            first = int(np.flatnonzero(counts < 0)[0])
            raise UserError(f"{url}: negative count {counts[first]} for output {first}; counts are frequencies")
        return counts

    def load_vocab(self, task: str) -> list[str] | None:
        """The raw id of each output id of ``task``, or None where the manifest records none."""
        info = self.task(task)
        return None if info.vocab is None else self._load_ids(info.vocab, info.num_outputs)

    def load_users(self) -> list[str] | None:
        """The raw user id of each T1 row, or None where the manifest records none."""
        return None if self.users is None else self._load_ids(self.users, None)

    def _load_ids(self, relative: str, length: int | None) -> list[str]:
        url = join(self.root, relative)
        try:
            with fsspec.open(url, "r") as f:
                ids = json.load(f)
        except FileNotFoundError as exn:
            raise UserError(f"{url} is missing (listed in {self.path})") from exn
        except json.JSONDecodeError as exn:
            raise UserError(f"{url}: invalid JSON ({exn})") from exn
        if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids) or length not in (None, len(ids)):
            raise UserError(f"{url}: expected a list of {length or 'the'} raw ids (strings)")
        return ids

    def to_json(self) -> dict[str, Any]:
        extra = {} if self.users is None else {"users": self.users}
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dataset": self.dataset,
            "seq_len": self.seq_len,
            "split": dict(self.split),
            "source": self.source,
            "skipped_rows": dict(self.skipped_rows),
            **extra,
            "tasks": [_task_to_json(t) for t in self.tasks],
        }

    def save(self) -> None:
        """Write ``manifest.json`` under ``root``; atomically where the filesystem allows it."""
        write_atomic(self.path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, root: str) -> Manifest:
        path = join(root, MANIFEST_NAME)
        try:
            with fsspec.open(path, "r") as f:
                text = f.read()
        except FileNotFoundError as exn:
            raise FileNotFoundError(f"no manifest.json under {root}") from exn
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exn:
            raise UserError(f"{path}: invalid JSON ({exn})") from exn
        return _parse_manifest(_Fields(raw, path, ""), root)


def manifest_exists(root: str) -> bool:
    fs, path = fsspec.core.url_to_fs(join(root, MANIFEST_NAME))
    return bool(fs.exists(path))


def _task_to_json(task: TaskInfo) -> dict[str, Any]:
    return {
        "name": task.name,
        "kind": task.kind,
        "num_items": task.num_items,
        "num_classes": task.num_classes,
        "class_names": None if task.class_names is None else list(task.class_names),
        **({} if task.vocab is None else {"vocab": task.vocab}),
        "train_counts": task.train_counts,
        **({} if task.train_counts_sha256 is None else {"train_counts_sha256": task.train_counts_sha256}),
        "splits": {
            name: {"num_instances": s.num_instances, "shards": [vars(shard) for shard in s.shards]}
            for name, s in task.splits.items()
        },
    }


class _Fields:
    """Typed access to a JSON object; every error names the file and the key path."""

    def __init__(self, raw: Any, path: str, prefix: str) -> None:
        self.path, self.prefix = path, prefix
        if not isinstance(raw, dict):
            self.fail(prefix or "<top level>", f"expected an object, got {type(raw).__name__}")
        self.raw: dict[str, Any] = raw

    def fail(self, key: str, msg: str) -> None:
        raise UserError(f"{self.path}: key '{key}': {msg}")

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, types: type | tuple[type, ...], optional: bool = False) -> Any:
        if name not in self.raw:
            self.fail(self.key(name), "missing")
        value = self.raw[name]
        if value is None and optional:
            return None
        # bool is an int subclass; a count of True is a typo, not a number.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            self.fail(self.key(name), f"expected {_type_names(types)}, got {type(value).__name__}")
        return value

    def count(self, name: str, minimum: int = 0, optional: bool = False) -> Any:
        value = self.get(name, int, optional)
        if value is not None and value < minimum:
            self.fail(self.key(name), f"must be >= {minimum}, got {value}")
        return value

    def child(self, name: str) -> _Fields:
        return _Fields(self.get(name, dict), self.path, self.key(name))

    def items(self, name: str) -> list[_Fields]:
        values = self.get(name, list)
        return [_Fields(v, self.path, f"{self.key(name)}[{i}]") for i, v in enumerate(values)]


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


def _parse_manifest(f: _Fields, root: str) -> Manifest:
    if f.get("format", str) != FORMAT_NAME:
        f.fail("format", f"expected '{FORMAT_NAME}', got '{f.raw['format']}'")
    if f.get("version", int) != FORMAT_VERSION:
        f.fail("version", f"this reader knows version {FORMAT_VERSION}, got {f.raw['version']}")
    skipped = f.get("skipped_rows", dict)
    for reason, value in skipped.items():
        if not isinstance(value, int) or isinstance(value, bool):
            f.fail(f"skipped_rows.{reason}", f"expected int, got {type(value).__name__}")
    tasks = tuple(_parse_task(t) for t in f.items("tasks"))
    _check_task_list(f, tasks)
    return Manifest(
        root=root,
        dataset=f.get("dataset", str),
        seq_len=f.count("seq_len", minimum=1),
        split=_parse_split_spec(f.child("split")),
        source=f.get("source", dict),
        skipped_rows=dict(skipped),
        tasks=tasks,
        users=f.get("users", str) if "users" in f.raw else None,  # absent before version 1 recorded it
    )


def _parse_split_spec(f: _Fields) -> dict[str, Any]:
    spec: dict[str, Any] = {name: float(f.get(name, (int, float))) for name in SPLITS}
    spec["seed"] = f.count("seed")
    return spec


def _check_task_list(f: _Fields, tasks: tuple[TaskInfo, ...]) -> None:
    if not tasks:
        f.fail("tasks", "must list at least the sequence task")
    sequence_at = [i for i, t in enumerate(tasks) if t.kind == "sequence"]
    if sequence_at != [0]:
        f.fail(
            "tasks",
            f"need exactly one 'sequence' task and it must be first; found it at positions {sequence_at}",
        )
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        f.fail("tasks", f"duplicate task names {duplicates}")


def _parse_task(f: _Fields) -> TaskInfo:
    kind = f.get("kind", str)
    if kind not in TASK_KINDS:
        f.fail(f.key("kind"), f"unknown kind '{kind}', expected one of {list(TASK_KINDS)}")
    num_items = f.count("num_items", minimum=1, optional=kind == "class")
    num_classes = f.count("num_classes", minimum=1, optional=kind != "class")
    class_names = f.get("class_names", list, optional=True)
    if class_names is not None:
        if not all(isinstance(c, str) for c in class_names):
            f.fail(f.key("class_names"), "expected a list of strings")
        if num_classes is not None and len(class_names) != num_classes:
            f.fail(f.key("class_names"), f"has {len(class_names)} names for num_classes={num_classes}")
    splits_f = f.child("splits")
    return TaskInfo(
        name=f.get("name", str),
        kind=kind,
        num_items=num_items,
        num_classes=num_classes,
        class_names=None if class_names is None else tuple(class_names),
        train_counts=f.get("train_counts", str),
        splits={name: _parse_split(splits_f.child(name)) for name in SPLITS},
        train_counts_sha256=f.get("train_counts_sha256", str) if "train_counts_sha256" in f.raw else None,
        vocab=f.get("vocab", str) if "vocab" in f.raw else None,
    )


def _parse_split(f: _Fields) -> SplitInfo:
    shards = tuple(
        ShardInfo(
            url=s.get("url", str),
            sha256=s.get("sha256", str, optional=True),
            num_instances=s.count("num_instances", minimum=1),
            num_bytes=s.count("num_bytes", minimum=1),
        )
        for s in f.items("shards")
    )
    num_instances = f.count("num_instances")
    total = sum(s.num_instances for s in shards)
    if total != num_instances:
        f.fail(f.key("num_instances"), f"is {num_instances} but its shards hold {total}")
    return SplitInfo(num_instances=num_instances, shards=shards)


__all__ = [
    "Manifest",
    "ShardInfo",
    "SplitInfo",
    "TaskInfo",
    "TaskKind",
    "manifest_exists",
]
