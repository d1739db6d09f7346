"""The Tencent TTL files (the layout of the Conure authors' release) -> Conure tasks.

* Pretraining file (T1): one user per line, ``seq_len`` comma-separated item tokens, left-padded
  with ``0``.
* Item-task files (clicks, thumbs-up, ...): ``<seq_len source tokens>,,<target1>,<target2>,...``;
  each target is one instance.
* Profile files (age, gender, life status, ...): ``<seq_len source tokens>,,<label>``.

Tokens are strings; every source token must be in the T1 vocabulary (the pretraining file's
tokens). No header, no user id: a task row's input is its source sequence. Source sequences that
are also pretraining rows share that row; others are added to the T1 table as inputs only (they
are not T1 training instances). T1 item ids are 1..V-1 over the sorted tokens; each item task's
targets and each profile task's labels get ids 0..n-1 in sorted order (numbers numerically).

Malformed rows raise ``ValueError`` naming the file and 1-based line; with ``skip_bad_rows`` they
are skipped and counted in the manifest.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np

from conure_dist.data.manifest import Manifest
from conure_dist.errors import UserError
from data_tools.rows import RowChecker, TextLines, numbers_first
from data_tools.shards import TaskData, write_dataset
from data_tools.split import DEFAULT_FRACTIONS

PAD = "0"
BLOCK_ROWS = 8192
"""Rows of the T1 table allocated at a time while the files are read (3.3 MB at 100 tokens)."""


@dataclass(frozen=True)
class TaskFile:
    """One later task: its name, kind (``item`` or ``class``) and file."""

    name: str
    kind: str
    path: str

    @classmethod
    def parse(cls, spec: str) -> TaskFile:
        """``NAME=KIND:PATH``, e.g. ``click=item:data/clicks.csv``."""
        name, _, rest = spec.partition("=")
        kind, _, path = rest.partition(":")
        if not name or kind not in ("item", "class") or not path:
            raise UserError(f"task '{spec}' is not of the form NAME=item:PATH or NAME=class:PATH")
        return cls(name, kind, path)


def _sorted_ids(tokens: set[str] | dict[str, int]) -> dict[str, int]:
    """Ids in sorted order: numbers numerically, then other tokens as strings."""
    return {t: i for i, t in enumerate(sorted(tokens, key=numbers_first))}


class _T1Table:
    """The T1 table as the files are read: rows of token codes (numbered in order of first
    appearance, 0 = padding; sorted ids come at the end), stored a block of rows at a time, and
    the first row holding each sequence (by a hash of its codes, checked against the row)."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.codes: dict[str, int] = {PAD: 0}
        self.blocks: list[np.ndarray] = []
        self.num_rows = 0
        self._first: dict[int, int] = {}
        self._collided: dict[bytes, int] = {}  # sequences whose hash an earlier, other one took

    def encode_new(self, tokens: list[str]) -> np.ndarray:
        """Codes of a pretraining row; its new tokens join the vocabulary."""
        codes = self.codes
        return np.fromiter((codes.setdefault(t, len(codes)) for t in tokens), np.int32, len(tokens))

    def encode(self, tokens: list[str]) -> np.ndarray:
        codes = self.codes
        return np.fromiter((codes[t] for t in tokens), np.int32, len(tokens))

    def row(self, index: int) -> np.ndarray:
        return self.blocks[index // BLOCK_ROWS][index % BLOCK_ROWS]

    def add(self, row: np.ndarray) -> int:
        """Append ``row``; it becomes the first row of its sequence unless one came before."""
        if self.num_rows % BLOCK_ROWS == 0:
            self.blocks.append(np.empty((BLOCK_ROWS, self.seq_len), dtype=np.int32))
        index = self.num_rows
        self.blocks[-1][index % BLOCK_ROWS] = row
        self.num_rows += 1
        key = row.tobytes()
        first = self._first.setdefault(hash(key), index)
        if first != index and not np.array_equal(self.row(first), row):
            self._collided.setdefault(key, index)
        return index

    def find(self, row: np.ndarray) -> int | None:
        """The first row holding the sequence ``row``, if any."""
        key = row.tobytes()
        first = self._first.get(hash(key))
        if first is None or np.array_equal(self.row(first), row):
            return first
        return self._collided.get(key)

    def finish(self) -> tuple[np.ndarray, list[str]]:
        """The table [rows, seq_len] in T1 ids (1..V-1 over the sorted tokens, 0 = padding) and
        the sorted tokens."""
        vocab = list(_sorted_ids({t: c for t, c in self.codes.items() if t != PAD}))
        to_id = np.zeros(len(self.codes), dtype=np.int32)
        to_id[[self.codes[t] for t in vocab]] = np.arange(1, len(vocab) + 1, dtype=np.int32)
        filled = [b[: self.num_rows - i * BLOCK_ROWS] for i, b in enumerate(self.blocks)]
        for block in filled:
            block[:] = to_id[block]
        table = np.concatenate(filled) if filled else np.zeros((0, self.seq_len), np.int32)
        self.blocks = []
        return table, vocab


def _read_pretrain(path: str, table: _T1Table, checker: RowChecker) -> tuple[int, str]:
    """Stream the pretraining file into ``table``; its number of valid rows and sha256."""
    lines = TextLines(path)
    label = path.rsplit("/", 1)[-1]
    seq_len = table.seq_len
    for line_no, line in lines:
        if not line.strip():
            continue
        tokens = [t.strip() for t in line.split(",")]
        if len(tokens) != seq_len:
            checker.bad(label, path, line_no, "wrong token count", f"expected {seq_len} tokens, got {len(tokens)}")
        elif any(not t for t in tokens):
            checker.bad(label, path, line_no, "empty token", "empty token")
        elif all(t == PAD for t in tokens):
            checker.bad(label, path, line_no, "empty sequence", "only padding")
        else:
            table.add(table.encode_new(tokens))
    if not table.num_rows:
        raise UserError(f"{path}: no valid sequence")
    return table.num_rows, lines.sha256 or ""


def _read_task(task: TaskFile, table: _T1Table, checker: RowChecker) -> tuple[TaskData, int, str]:
    """Stream one task file: its instances (users are T1 table rows; a source that is no
    pretraining row is added as an input-only row), its number of valid rows and sha256."""
    lines = TextLines(task.path)
    label = task.path.rsplit("/", 1)[-1]
    seq_len, codes = table.seq_len, table.codes
    users, targets = array("q"), array("q")
    target_codes: dict[str, int] = {}
    valid = 0
    for line_no, line in lines:
        if not line.strip():
            continue
        head, sep, tail = line.partition(",,")
        tokens = [t.strip() for t in head.split(",")]
        wanted = [t.strip() for t in tail.split(",") if t.strip()]
        if not sep:
            checker.bad(label, task.path, line_no, "no ',,' separator", "no ',,' between source and targets")
        elif len(tokens) != seq_len:
            checker.bad(
                label, task.path, line_no, "wrong token count", f"expected {seq_len} source tokens, got {len(tokens)}"
            )
        elif not wanted:
            checker.bad(label, task.path, line_no, "no target", "no target after ',,'")
        elif task.kind == "class" and len(wanted) != 1:
            checker.bad(label, task.path, line_no, "several labels", f"expected one label, got {len(wanted)}")
        elif all(t == PAD for t in tokens):
            checker.bad(label, task.path, line_no, "empty sequence", "the source is only padding")
        elif unknown := [t for t in tokens if t not in codes]:
            checker.bad(
                label,
                task.path,
                line_no,
                "token not in T1",
                f"source token '{unknown[0]}' is not in the pretraining vocabulary",
            )
        else:
            valid += 1
            row = table.encode(tokens)
            user = table.find(row)
            if user is None:
                user = table.add(row)
            for target in wanted:
                users.append(user)
                targets.append(target_codes.setdefault(target, len(target_codes)))
    if not valid:
        raise UserError(f"{task.path}: no valid row")
    names = list(_sorted_ids(target_codes))
    to_id = np.empty(len(target_codes), dtype=np.int64)
    to_id[[target_codes[n] for n in names]] = np.arange(len(names))
    arrays = (np.frombuffer(users, dtype=np.int64).copy(), to_id[np.frombuffer(targets, dtype=np.int64)])
    if task.kind == "item":
        data = TaskData(task.name, "item", None, *arrays, num_items=len(names), vocab=names)
    else:
        data = TaskData(task.name, "class", None, *arrays, num_classes=len(names), class_names=names)
    return data, valid, lines.sha256 or ""


def read_ttl(
    pretrain: str, tasks: list[TaskFile], *, seq_len: int = 100, skip_bad_rows: bool = False
) -> tuple[np.ndarray, list[TaskData], dict[str, Any], dict[str, int]]:
    """Parse the TTL files into (t1_seqs, tasks, source, skipped_rows), streaming each file: memory
    holds the T1 table (int32 codes), the vocabularies and the tasks' instance arrays, never a
    file's text or its rows as strings."""
    if seq_len < 2:
        raise UserError(f"seq_len (--seq-len) must be >= 2, got {seq_len}")
    names = ["t1", *(t.name for t in tasks)]
    if len(set(names)) != len(names):
        raise UserError(f"task names must be distinct (and not 't1'): {names}")
    checker = RowChecker(skip_bad_rows)
    table = _T1Table(seq_len)
    num_t1_users, pre_sha = _read_pretrain(pretrain, table, checker)
    files: dict[str, Any] = {pretrain.rsplit("/", 1)[-1]: {"sha256": pre_sha, "valid_rows": num_t1_users}}
    out = []
    for task in tasks:
        data, valid, sha = _read_task(task, table, checker)
        files[task.path.rsplit("/", 1)[-1]] = {"sha256": sha, "valid_rows": valid}
        out.append(data)
    t1_seqs, vocab = table.finish()
    t1 = TaskData(
        "t1",
        "sequence",
        t1_seqs[:num_t1_users],
        np.arange(num_t1_users, dtype=np.int64),
        None,
        num_items=len(vocab) + 1,
        vocab=["", *vocab],
    )
    source = {
        "pretrain": pretrain,
        "tasks": {t.name: {"kind": t.kind, "path": t.path} for t in tasks},
        "files": files,
        "seq_len": seq_len,
        "num_t1_users": num_t1_users,
        "input_only_rows": len(t1_seqs) - num_t1_users,
    }
    return t1_seqs, [t1, *out], source, dict(checker.counts)


def write_ttl(
    pretrain: str,
    tasks: list[TaskFile],
    out: str,
    *,
    seq_len: int = 100,
    seed: int = 0,
    skip_bad_rows: bool = False,
    split: tuple[float, float, float] = DEFAULT_FRACTIONS,
    instances_per_shard: int = 50_000,
    protocol: str = "random",
) -> Manifest:
    """Convert the TTL files into shards + manifest under ``out`` (``protocol``:
    ``shards.split_task``; a task file's targets on one line count as that user's instances in
    time order)."""
    t1_seqs, task_data, source, skipped = read_ttl(pretrain, tasks, seq_len=seq_len, skip_bad_rows=skip_bad_rows)
    return write_dataset(
        out,
        dataset="ttl",
        t1_seqs=t1_seqs,
        tasks=task_data,
        seed=seed,
        split=split,
        source=source,
        skipped_rows=skipped,
        instances_per_shard=instances_per_shard,
        protocol=protocol,
    )
