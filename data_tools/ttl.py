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

from dataclasses import dataclass
from typing import Any

import numpy as np

from conure_dist.data.manifest import Manifest
from conure_dist.errors import UserError
from data_tools.rows import RowChecker, numbers_first, read_text
from data_tools.shards import TaskData, write_dataset
from data_tools.split import DEFAULT_FRACTIONS

PAD = "0"


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


def _sorted_ids(tokens: set[str]) -> dict[str, int]:
    """Ids in sorted order: numbers numerically, then other tokens as strings."""
    return {t: i for i, t in enumerate(sorted(tokens, key=numbers_first))}


def _read_pretrain(path: str, seq_len: int, checker: RowChecker) -> tuple[list[list[str]], str]:
    text, sha = read_text(path)
    rows = []
    label = path.rsplit("/", 1)[-1]
    for line_no, line in enumerate(text.splitlines(), start=1):
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
            rows.append(tokens)
    if not rows:
        raise UserError(f"{path}: no valid sequence")
    return rows, sha


def _read_task(
    task: TaskFile, seq_len: int, vocab: dict[str, int], checker: RowChecker
) -> tuple[list[list[str]], list[list[str]], str]:
    """Source token rows and their targets (one or more per row)."""
    text, sha = read_text(task.path)
    label = task.path.rsplit("/", 1)[-1]
    sources, targets = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
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
        elif unknown := [t for t in tokens if t != PAD and t not in vocab]:
            checker.bad(
                label,
                task.path,
                line_no,
                "token not in T1",
                f"source token '{unknown[0]}' is not in the pretraining vocabulary",
            )
        else:
            sources.append(tokens)
            targets.append(wanted)
    if not sources:
        raise UserError(f"{task.path}: no valid row")
    return sources, targets, sha


def read_ttl(
    pretrain: str, tasks: list[TaskFile], *, seq_len: int = 100, skip_bad_rows: bool = False
) -> tuple[np.ndarray, list[TaskData], dict[str, Any], dict[str, int]]:
    """Parse the TTL files into (t1_seqs, tasks, source, skipped_rows)."""
    if seq_len < 2:
        raise UserError(f"seq_len (--seq-len) must be >= 2, got {seq_len}")
    names = ["t1", *(t.name for t in tasks)]
    if len(set(names)) != len(names):
        raise UserError(f"task names must be distinct (and not 't1'): {names}")
    checker = RowChecker(skip_bad_rows)
    pre_rows, pre_sha = _read_pretrain(pretrain, seq_len, checker)
    vocab = _sorted_ids({t for row in pre_rows for t in row if t != PAD})
    ids = {t: i + 1 for t, i in vocab.items()}

    def encode(row: list[str]) -> tuple[int, ...]:
        return tuple(0 if t == PAD else ids[t] for t in row)

    table = [encode(r) for r in pre_rows]
    row_of: dict[tuple[int, ...], int] = {}
    for i, seq in enumerate(table):
        row_of.setdefault(seq, i)
    files: dict[str, Any] = {pretrain.rsplit("/", 1)[-1]: {"sha256": pre_sha, "valid_rows": len(pre_rows)}}
    out = []
    for task in tasks:
        sources, targets, sha = _read_task(task, seq_len, ids, checker)
        files[task.path.rsplit("/", 1)[-1]] = {"sha256": sha, "valid_rows": len(sources)}
        users, labels = [], []
        for src, wanted in zip(sources, targets, strict=True):
            seq = encode(src)
            if seq not in row_of:
                row_of[seq] = len(table)
                table.append(seq)
            users += [row_of[seq]] * len(wanted)
            labels += wanted
        label_ids = _sorted_ids(set(labels))
        arrays = (np.asarray(users, dtype=np.int64), np.asarray([label_ids[x] for x in labels], dtype=np.int64))
        if task.kind == "item":
            out.append(TaskData(task.name, "item", None, *arrays, num_items=len(label_ids), vocab=list(label_ids)))
        else:
            out.append(
                TaskData(task.name, "class", None, *arrays, num_classes=len(label_ids), class_names=list(label_ids))
            )
    t1_seqs = np.asarray(table, dtype=np.int32)
    t1 = TaskData(
        "t1",
        "sequence",
        t1_seqs[: len(pre_rows)],
        np.arange(len(pre_rows), dtype=np.int64),
        None,
        num_items=len(ids) + 1,
        vocab=["", *vocab],
    )
    source = {
        "pretrain": pretrain,
        "tasks": {t.name: {"kind": t.kind, "path": t.path} for t in tasks},
        "files": files,
        "seq_len": seq_len,
        "num_t1_users": len(pre_rows),
        "input_only_rows": len(table) - len(pre_rows),
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
