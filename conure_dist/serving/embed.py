"""Every user's representation vector under a task's inference view: ``conure embed``.

*Which users.* Every instance of the T1 (sequence) task, in the train, valid and test splits.
Every converter gives each row of the T1 table (a user) exactly one T1 instance, in exactly one
split, so each user is embedded exactly once and nothing needs deduplicating (which would take
memory that grows with the users). Rows of the T1 table that are only another task's input (the
TTL converter's input-only rows) are no T1 instance and are not embedded.

*Which vector.* The backbone's hidden state at the last position of the user's T1 sequence,
under the task's inference view: what the task's head scores (``ConureModel.represent``). For T1
itself that is the state after the whole sequence, the one whose scores ``conure predict`` ranks
as the next item.

*Layout* under the output (local directory or fsspec URL such as ``s3://bucket/prefix``)::

    part-r{rank:03d}-{index:05d}.npz  users int64 [n] (T1 rows, as in the shards' ``user``),
                                      vectors float32 [n, channels], and raw_users str [n] where
                                      the manifest records raw user ids; n <= users_per_shard
    index.json                        written last, by rank 0 once every rank has written its
                                      shards: every shard with its user count, the task, the
                                      dimension, the checkpoint; a directory with it is complete

Each rank streams its part of each split and writes its own shards, so memory holds at most one
shard and one batch of vectors, and ranks never write the same file.

*Exact on any world size.* Every batch is padded to ``batch_size`` rows (at least
``MIN_ROWS``), so every forward pass has the same shapes whichever rank, split or world size it
serves; with fixed shapes a row's vector depends on its own sequence only (the CPU kernels pick
their blocking by shape: a 1- to 3-row matrix product, as a short last batch would give, rounds
differently), so 1 and N processes give the same vectors bit for bit.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
import torch.distributed as tdist

from conure_dist.data.manifest import SPLITS
from conure_dist.data.stream import iter_batches
from conure_dist.dist import DistInfo, barrier
from conure_dist.errors import UserError
from conure_dist.fs import join, write_atomic
from conure_dist.serving.export import TaskNetwork, baked_network, check_exportable, task_input
from conure_dist.serving.inference import load_trained, manifest_for

FORMAT = "conure-embeddings"
FORMAT_VERSION = 1
INDEX = "index.json"
SHARD_NAME = re.compile(r"part-r\d{3}-\d{5}\.npz")
MIN_ROWS = 16
"""Rows of the smallest forward pass: from 16 rows on, a row's vector on the CPU is the same
whatever the pass's row count (a 1- to 3-row matrix product takes another kernel)."""


def shard_name(rank: int, index: int) -> str:
    """Per-rank shard names, so that ranks never write the same file."""
    return f"part-r{rank:03d}-{index:05d}.npz"


@dataclass
class ShardWriter:
    """Buffers one rank's (users, vectors) and writes a shard each ``per_shard`` users."""

    out: str
    rank: int
    per_shard: int
    raw_users: list[str] | None
    written: list[dict[str, Any]] = field(default_factory=list)
    _users: list[np.ndarray] = field(default_factory=list)
    _vectors: list[np.ndarray] = field(default_factory=list)
    _pending: int = 0

    def add(self, users: np.ndarray, vectors: np.ndarray) -> None:
        self._users.append(users)
        self._vectors.append(vectors)
        self._pending += len(users)
        while self._pending >= self.per_shard:
            self._write(self.per_shard)

    def close(self) -> None:
        """Write the last, partial shard."""
        if self._pending:
            self._write(self._pending)

    def _write(self, count: int) -> None:
        users, vectors = np.concatenate(self._users), np.concatenate(self._vectors)
        # Copies: views would keep the whole concatenated buffer alive.
        self._users, self._vectors = [users[count:].copy()], [vectors[count:].copy()]
        self._pending -= count
        arrays = {"users": users[:count], "vectors": vectors[:count]}
        if self.raw_users is not None:
            arrays["raw_users"] = np.asarray([self.raw_users[u] for u in arrays["users"]], dtype=str)
        name = shard_name(self.rank, len(self.written))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomic(join(self.out, name), buffer.getvalue())
        self.written.append({"file": name, "rank": self.rank, "users": count})


def embed_users(
    ckpt: str,
    task: str,
    out: str,
    dist: DistInfo,
    data_root: str | None = None,
    batch_size: int = 1024,
    users_per_shard: int = 100_000,
) -> dict[str, Any]:
    """Write every T1 user's vector under ``task``'s inference view to ``out`` (see the module
    docstring), sharded over the ranks of ``dist``; every rank returns the summary."""
    if batch_size < 1 or users_per_shard < 1:
        raise ValueError(f"batch_size and users_per_shard must be >= 1, got {batch_size}, {users_per_shard}")
    run = load_trained(ckpt)
    check_exportable(run, task)
    manifest = manifest_for(run.ckpt, data_root)
    network = baked_network(run, task).to(dist.device)
    prepare_out(out, dist)
    writer = ShardWriter(out, dist.rank, users_per_shard, manifest.load_users())
    t1 = manifest.tasks[0].name
    counts = {}
    for split in SPLITS:
        counts[split] = 0
        for batch in iter_batches(
            manifest, t1, split, batch_size, shuffle=False, seed=0, epoch=0, rank=dist.rank, world_size=dist.world_size
        ):
            writer.add(batch.user.numpy(), user_vectors(network, batch.seq, batch_size, dist.device))
            counts[split] += len(batch.user)
    writer.close()
    shards, splits = _gather(dist, writer.written, counts)
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": task,
        "task_kind": network.kind,
        "task_id": run.task_names.index(task) + 1,
        "t1_task": t1,
        "dim": int(network.model.backbone.embedding.weight.shape[1]),
        "dtype": "float32",
        "vector": "hidden state at the last position of the user's T1 sequence under the task's inference view "
        "(the input of its head)",
        "checkpoint": run.ckpt.url,
        "task_checksum": run.ckpt.meta["state"]["task_checksums"][task],
        "data_root": manifest.root,
        "users": sum(splits.values()),
        "splits": splits,
        "raw_user_ids": writer.raw_users is not None,
        "world_size": dist.world_size,
        "batch_size": batch_size,
        "users_per_shard": users_per_shard,
        "shards": shards,
    }
    if dist.is_main:
        write_atomic(join(out, INDEX), json.dumps(index, indent=1))
    barrier(dist)
    return {
        "task": task,
        "users": index["users"],
        "shards": len(shards),
        "dim": index["dim"],
        "out": out,
        "index": join(out, INDEX),
    }


def user_vectors(network: TaskNetwork, seq_BL: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """float32 [n, C]: the task's representation of each history, computed on
    ``max(batch_size, MIN_ROWS)`` rows (padded with empty histories) so that every pass has the
    same shapes."""
    count = seq_BL.shape[0]
    rows = max(batch_size, MIN_ROWS)
    padded = torch.cat([seq_BL, seq_BL.new_zeros(rows - count, seq_BL.shape[1])])
    with torch.no_grad():
        hidden = network.represent(task_input(padded, network.kind).to(device))
    return hidden[:count].float().cpu().numpy()


def prepare_out(out: str, dist: DistInfo) -> None:
    """Create ``out``, or clear a previous embedding there; refuse anything else in it. Every
    rank checks the same listing (before rank 0 deletes), so all raise or none does."""
    fs, path = fsspec.core.url_to_fs(out)
    names = [name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)] if fs.exists(path) else []
    foreign = sorted(n for n in names if n != INDEX and not SHARD_NAME.fullmatch(n))
    if foreign:
        raise UserError(
            f"--out {out} is not empty and not a previous conure embedding (it holds "
            f"{', '.join(foreign[:5])}): choose a new or empty location"
        )
    barrier(dist)
    if dist.is_main:
        # The index first: a location without one is never taken for a complete embedding.
        for name in sorted(names, key=lambda n: n != INDEX):
            fs.rm(join(path, name))
        fs.makedirs(path, exist_ok=True)
    barrier(dist)


def _gather(
    dist: DistInfo, written: list[dict[str, Any]], counts: dict[str, int]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every rank's shards (by rank, then index) and the users per split over all ranks."""
    mine = (written, counts)
    if not dist.is_distributed:
        return mine
    everyone: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(everyone, mine)
    shards = [shard for rank_shards, _ in everyone for shard in rank_shards]
    return shards, {split: sum(c[split] for _, c in everyone) for split in counts}
