"""Stream the shards of one (task, split) as torch batches, deterministically and per rank.

The reader is a WebDataset pipeline whose stages are::

    shard URLs -> open via fsspec + verify size/sha256 -> tar samples -> decoded chunks
      -> this rank's part -> buffered shuffle -> batches -> torch

Shards are opened through fsspec (not WebDataset's curl-based ``gopen``), so local paths,
``file://``, ``memory://`` and ``s3://`` all work. A whole shard is read and checked before any
of its instances is used, so a corrupted shard never leaks half of its data into training.

How ranks share a split (``world_size > 1``):

* ``range`` partition (default when the split has at least ``world_size`` shards): the shards are
  put in one order (shuffled by (seed, epoch) or the manifest order), giving one global instance
  order; rank r reads only the contiguous slice ``[r*N/W, (r+1)*N/W)`` of it, so each rank reads
  about 1/W of the bytes, and shuffles its slice locally.
* ``stride`` partition (default otherwise): every rank builds the same global stream (same shard
  order and shuffle) and keeps instances ``r, r+W, r+2W, ...``. Each rank reads everything, but
  the union of the ranks' step-s batches is exactly the single-process step-s batch of the global
  batch size: handy for parity tests against a one-process reference.

Either way one pass gives every instance of the split to exactly one rank. With ``num_steps``
the stream restarts (a new pass with a new shuffle) as often as needed, so every rank yields
exactly ``num_steps - start_step`` batches.

The module reads in order: the read plan (which shards a rank reads in a pass, in which order,
and which slice of each), the stages that open, check and decode a shard (``read_shard`` is the
same check for one shard, used by ``data_tools.describe``), then the chunk stages (shuffle,
stride, batching).
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import fsspec
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from conure_dist.data.manifest import Manifest, ShardInfo
from conure_dist.errors import UserError

Partition = Literal["auto", "range", "stride"]


class ShardError(UserError):
    """A shard is missing, truncated, corrupted or disagrees with the manifest."""


class _Chunk(NamedTuple):
    seq: np.ndarray
    target: np.ndarray | None
    user: np.ndarray

    @property
    def size(self) -> int:
        return len(self.user)

    def take(self, index: Any) -> _Chunk:
        return _Chunk(self.seq[index], None if self.target is None else self.target[index], self.user[index])


@dataclass(frozen=True)
class _ShardSlice:
    """A shard and the instances ``[start, stop)`` of it that this rank keeps in a pass."""

    url: str
    info: ShardInfo
    start: int
    stop: int


@dataclass(frozen=True)
class _ReadPlan:
    shards: tuple[tuple[str, ShardInfo], ...]
    seq_len: int
    has_target: bool
    shuffle: bool
    seed: int
    epoch: int
    rank: int
    world_size: int
    partition: Literal["range", "stride"]
    shuffle_buffer: int
    limit: int | None = None
    """Read only the first this many instances of each pass's global order (split over the ranks)."""

    @property
    def num_instances(self) -> int:
        return sum(info.num_instances for _, info in self.shards)

    def rng(self, pass_index: int, purpose: int) -> np.random.Generator:
        # Stride ranks must draw the same global shuffle; range ranks shuffle their own slices.
        rank_key = self.rank if self.partition == "range" else 0
        return np.random.default_rng([self.seed, self.epoch, pass_index, purpose, rank_key])

    def pass_slices(self, pass_index: int) -> list[_ShardSlice]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, pass_index, 0]).permutation(len(order)).tolist()
        if self.partition == "stride" and self.limit is None:
            return [_ShardSlice(url, info, 0, info.num_instances) for url, info in (self.shards[i] for i in order)]
        total = self.num_instances if self.limit is None else min(self.limit, self.num_instances)
        if self.partition == "stride":  # every rank reads the limited global stream and strides it
            lo, hi = 0, total
        else:
            lo, hi = self.rank * total // self.world_size, (self.rank + 1) * total // self.world_size
        slices, offset = [], 0
        for url, info in (self.shards[i] for i in order):
            start, stop = max(lo - offset, 0), min(hi - offset, info.num_instances)
            if start < stop:
                slices.append(_ShardSlice(url, info, start, stop))
            offset += info.num_instances
        return slices


def _make_plan(
    manifest: Manifest,
    task: str,
    split: str,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    shuffle_buffer: int,
    partition: Partition,
    limit: int | None = None,
) -> _ReadPlan:
    info = manifest.task(task)
    split_info = manifest.split_info(task, split)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    if partition not in ("auto", "range", "stride"):
        raise ValueError(f"partition must be 'auto', 'range' or 'stride', got '{partition}'")
    if partition == "auto":
        partition = "range" if len(split_info.shards) >= world_size else "stride"
    urls = manifest.shard_urls(task, split)
    return _ReadPlan(
        shards=tuple(zip(urls, split_info.shards, strict=True)),
        seq_len=manifest.seq_len,
        has_target=info.kind != "sequence",
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        partition=partition,
        shuffle_buffer=max(shuffle_buffer, 0),
        limit=limit,
    )


def read_shard(url: str, info: ShardInfo, seq_len: int, has_target: bool) -> dict[str, np.ndarray]:
    """Every instance of one shard (``seq``, ``user`` and, for item and class tasks, ``target``),
    after the checks the stream makes: present, size and sha256 as the manifest records them (no
    sha256 check where it records none), readable, and holding its instances. Raises ``ShardError``
    naming the shard."""
    chunks = _decode_shard(url, _read_checked(url, info), info, seq_len, has_target)
    arrays = {"seq": np.concatenate([c.seq for c in chunks]), "user": np.concatenate([c.user for c in chunks])}
    if has_target:
        arrays["target"] = np.concatenate([c.target for c in chunks])  # type: ignore[misc]
    return arrays


def _read_checked(url: str, info: ShardInfo) -> bytes:
    """A shard's bytes, read whole through fsspec and checked against the manifest."""
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError as exn:
        raise ShardError(f"shard {url}: missing") from exn
    except Exception as exn:  # OSError, and object-store clients' own errors (botocore's)
        raise ShardError(f"shard {url}: cannot be read ({type(exn).__name__}: {exn})") from exn
    if len(data) != info.num_bytes:
        raise ShardError(f"shard {url}: {len(data)} bytes, the manifest says {info.num_bytes} (truncated?)")
    if info.sha256 is not None and hashlib.sha256(data).hexdigest() != info.sha256:
        raise ShardError(f"shard {url}: sha256 differs from the manifest (corrupted?)")
    return data


def _decode_shard(url: str, data: bytes, info: ShardInfo, seq_len: int, has_target: bool) -> list[_Chunk]:
    """A checked shard's chunks; their count must be the manifest's."""
    try:
        samples = group_by_keys(tar_file_expander([{"url": url, "stream": io.BytesIO(data)}]))
        chunks = [_decode_chunk(s, seq_len, has_target) for s in samples]
    except Exception as exn:  # tarfile and numpy raise many types; all mean a bad shard
        raise ShardError(f"shard {url}: unreadable ({type(exn).__name__}: {_first_arg(exn)})") from exn
    found = sum(c.size for c in chunks)
    if found != info.num_instances:
        raise ShardError(f"shard {url}: holds {found} instances, the manifest says {info.num_instances}")
    return chunks


def _open_shards(src: Iterable[dict[str, Any]], slices: dict[str, _ShardSlice]) -> Iterator[dict[str, Any]]:
    """URL opener stage: read each shard whole and check it against the manifest."""
    for sample in src:
        url = sample["url"]
        yield {"url": url, "data": _read_checked(url, slices[url].info)}


def _decode_shards(
    src: Iterable[dict[str, Any]], slices: dict[str, _ShardSlice], seq_len: int, has_target: bool
) -> Iterator[_Chunk]:
    """Tar stage: turn each opened shard into chunks, check the count, keep this rank's slice."""
    for opened in src:
        piece = slices[opened["url"]]
        chunks = _decode_shard(opened["url"], opened["data"], piece.info, seq_len, has_target)
        yield from _slice_chunks(chunks, piece.start, piece.stop)


def _first_arg(exn: Exception) -> str:
    # WebDataset appends the stream object and URL to exception args; keep the original message.
    text = str(exn.args[0]) if exn.args else str(exn)
    return text.split(" @ <", 1)[0]


def _decode_chunk(sample: dict[str, Any], seq_len: int, has_target: bool) -> _Chunk:
    expected = {"seq.npy", "user.npy"} | ({"target.npy"} if has_target else set())
    found = {k for k in sample if not k.startswith("__")}
    if found != expected:
        raise ShardError(f"sample {sample.get('__key__')}: members {sorted(found)}, expected {sorted(expected)}")
    seq = _load_npy(sample["seq.npy"])
    user = _load_npy(sample["user.npy"])
    target = _load_npy(sample["target.npy"]) if has_target else None
    n = len(user)
    if seq.shape != (n, seq_len) or user.shape != (n,) or (target is not None and target.shape != (n,)):
        raise ShardError(
            f"sample {sample['__key__']}: inconsistent shapes seq {seq.shape}, user {user.shape}, "
            f"target {None if target is None else target.shape} for seq_len {seq_len}"
        )
    return _Chunk(seq, target, user)


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _slice_chunks(chunks: list[_Chunk], start: int, stop: int) -> Iterator[_Chunk]:
    offset = 0
    for chunk in chunks:
        lo, hi = max(start - offset, 0), min(stop - offset, chunk.size)
        if lo < hi:
            yield chunk if (lo, hi) == (0, chunk.size) else chunk.take(slice(lo, hi))
        offset += chunk.size


@dataclass
class Batch:
    seq: torch.Tensor
    """int64 [B, L]: T1 sequences, left-padded with 0."""
    target: torch.Tensor | None
    """int64 [B]: item or class id; None for the sequence task."""
    user: torch.Tensor
    """int64 [B]: user index (row of the T1 table)."""


def num_steps_per_epoch(
    manifest: Manifest, task: str, split: str, global_batch_size: int, drop_last: bool = True
) -> int:
    """Optimizer steps in one pass over (task, split) at the given global batch size."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    total = manifest.split_info(task, split).num_instances
    return total // global_batch_size if drop_last else -(-total // global_batch_size)


def iter_batches(
    manifest: Manifest,
    task: str,
    split: str,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    num_steps: int | None = None,
    drop_last: bool = False,
    shuffle_buffer: int = 10_000,
    start_step: int = 0,
    partition: Partition = "auto",
    max_instances: int | None = None,
) -> Iterator[Batch]:
    """Batches of ``batch_size`` (per rank) instances of (task, split).

    Without ``num_steps``: one pass; each instance goes to exactly one rank, the last batch may be
    smaller unless ``drop_last``. With ``num_steps``: exactly ``num_steps - start_step`` full
    batches on every rank, restarting the stream when it runs out. ``start_step`` skips the
    batches already consumed before a resume. See the module docstring for ``partition``.
    ``max_instances``: a pass holds only the first this many instances of the global order (for
    an unshuffled stream, the split's stored order: the same instances on any world size).
    """
    if max_instances is not None and max_instances < 1:
        raise ValueError(f"max_instances must be >= 1, got {max_instances}")
    plan = _make_plan(
        manifest,
        task,
        split,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        partition=partition,
        limit=max_instances,
    )
    _check_steps(batch_size, num_steps, start_step)
    if num_steps is not None and num_steps > start_step and plan.num_instances == 0:
        raise UserError(f"cannot draw {num_steps} steps from {task}/{split}: the split has no instances")
    if num_steps is not None and plan.partition == "range" and plan.num_instances < world_size:
        # Some rank's range would be empty and a repeating stream over it would never yield.
        raise UserError(
            f"{task}/{split} has {plan.num_instances} instances for {world_size} ranks: too few "
            "for data.partition=range; use stride (or auto)"
        )
    instances = _rank_stream(plan, repeat=num_steps is not None)
    pipeline = wds.DataPipeline(
        lambda: instances,
        functools.partial(_skip_instances, count=start_step * batch_size),
        functools.partial(_batched, batch_size=batch_size, drop_last=drop_last),
        _to_batches,
    )
    batches = iter(pipeline)
    return batches if num_steps is None else itertools.islice(batches, max(num_steps - start_step, 0))


def _check_steps(batch_size: int, num_steps: int | None, start_step: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_step < 0 or (num_steps is not None and not 0 <= start_step <= num_steps):
        raise ValueError(f"need 0 <= start_step <= num_steps, got start_step={start_step}, num_steps={num_steps}")


def _rank_stream(plan: _ReadPlan, repeat: bool) -> Iterator[_Chunk]:
    passes = itertools.count() if repeat else range(1)
    chunks: Iterator[_Chunk] = itertools.chain.from_iterable(_pass_chunks(plan, p) for p in passes)
    if plan.partition == "stride" and plan.world_size > 1:
        # Across passes too, so the global stream stays one sequence that ranks interleave.
        chunks = _stride(chunks, plan.rank, plan.world_size)
    return chunks


def _pass_chunks(plan: _ReadPlan, pass_index: int) -> Iterator[_Chunk]:
    """One pass over this rank's part of the split, as decoded (and shuffled) chunks."""
    slices = plan.pass_slices(pass_index)
    if not slices:
        return iter(())
    by_url = {s.url: s for s in slices}
    stages: list[Any] = [
        wds.SimpleShardList([s.url for s in slices]),
        functools.partial(_open_shards, slices=by_url),
        functools.partial(_decode_shards, slices=by_url, seq_len=plan.seq_len, has_target=plan.has_target),
    ]
    if plan.shuffle:
        stages.append(functools.partial(_shuffle_chunks, rng=plan.rng(pass_index, 1), capacity=plan.shuffle_buffer))
    return iter(wds.DataPipeline(*stages))


def _shuffle_chunks(src: Iterable[_Chunk], rng: np.random.Generator, capacity: int) -> Iterator[_Chunk]:
    """Buffered shuffle, vectorised: each arriving instance evicts a random buffered one.

    Same idea as WebDataset's sample shuffle, but a whole chunk at a time so that the per-instance
    cost stays in numpy.
    """
    buffer: _Chunk | None = None
    for chunk in src:
        chunk = chunk.take(rng.permutation(chunk.size))
        if capacity == 0:
            yield chunk
            continue
        filled = 0 if buffer is None else buffer.size
        if filled < capacity:
            room = capacity - filled
            head, chunk = chunk.take(slice(0, room)), chunk.take(slice(room, None))
            buffer = head if buffer is None else _concat([buffer, head])
        assert buffer is not None
        for start in range(0, chunk.size, capacity):
            part = chunk.take(slice(start, start + capacity))
            slots = rng.choice(capacity, size=part.size, replace=False)
            evicted = buffer.take(slots)
            buffer.seq[slots], buffer.user[slots] = part.seq, part.user
            if buffer.target is not None:
                buffer.target[slots] = part.target
            yield evicted
    if buffer is not None:
        yield buffer.take(rng.permutation(buffer.size))


def _stride(src: Iterable[_Chunk], rank: int, world_size: int) -> Iterator[_Chunk]:
    """Keep the instances whose global position is ``rank`` modulo ``world_size``."""
    offset = 0
    for chunk in src:
        first = (rank - offset) % world_size
        if first < chunk.size:
            yield chunk.take(slice(first, None, world_size))
        offset += chunk.size


def _skip_instances(src: Iterable[_Chunk], count: int) -> Iterator[_Chunk]:
    for chunk in src:
        if count >= chunk.size:
            count -= chunk.size
            continue
        yield chunk.take(slice(count, None)) if count else chunk
        count = 0


def _batched(src: Iterable[_Chunk], batch_size: int, drop_last: bool) -> Iterator[_Chunk]:
    pending: list[_Chunk] = []
    num_pending = 0
    for chunk in src:
        pending.append(chunk)
        num_pending += chunk.size
        if num_pending < batch_size:
            continue
        merged = _concat(pending)
        full = num_pending - num_pending % batch_size
        for start in range(0, full, batch_size):
            yield merged.take(slice(start, start + batch_size))
        pending = [merged.take(slice(full, None))] if full < num_pending else []
        num_pending -= full
    if num_pending and not drop_last:
        yield _concat(pending)


def _concat(chunks: list[_Chunk]) -> _Chunk:
    if len(chunks) == 1:
        return chunks[0]
    target = None if chunks[0].target is None else np.concatenate([c.target for c in chunks])  # type: ignore[misc]
    return _Chunk(np.concatenate([c.seq for c in chunks]), target, np.concatenate([c.user for c in chunks]))


def _to_batches(src: Iterable[_Chunk]) -> Iterator[Batch]:
    for chunk in src:
        yield Batch(
            seq=torch.from_numpy(chunk.seq.astype(np.int64)),
            target=None
            if chunk.target is None
            else torch.from_numpy(np.ascontiguousarray(chunk.target, dtype=np.int64)),
            user=torch.from_numpy(np.ascontiguousarray(chunk.user, dtype=np.int64)),
        )


__all__ = ["Batch", "ShardError", "iter_batches", "num_steps_per_epoch", "read_shard"]
