"""The reading side of ``stream``: the read plan (which shards a rank reads in a pass, in which
order, and which slice of each), and the pipeline stages that open a shard through fsspec, check
it against the manifest and decode it into chunks. See ``stream`` for how ranks share a split."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import fsspec
import numpy as np
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
        return _Chunk(
            self.seq[index], None if self.target is None else self.target[index], self.user[index]
        )


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
            order = (
                np.random.default_rng([self.seed, self.epoch, pass_index, 0])
                .permutation(len(order))
                .tolist()
            )
        if self.partition == "stride":
            return [
                _ShardSlice(url, info, 0, info.num_instances)
                for url, info in (self.shards[i] for i in order)
            ]
        total = self.num_instances
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
    )



def _open_shards(
    src: Iterable[dict[str, Any]], slices: dict[str, _ShardSlice]
) -> Iterator[dict[str, Any]]:
    """URL opener stage: read each shard whole through fsspec and check it against the manifest."""
    for sample in src:
        url = sample["url"]
        info = slices[url].info
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
        except FileNotFoundError as exn:
            raise ShardError(f"shard {url}: missing") from exn
        except Exception as exn:  # OSError, and object-store clients' own errors (botocore's)
            raise ShardError(f"shard {url}: cannot be read ({type(exn).__name__}: {exn})") from exn
        if len(data) != info.num_bytes:
            raise ShardError(
                f"shard {url}: {len(data)} bytes, the manifest says {info.num_bytes} (truncated?)"
            )
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise ShardError(f"shard {url}: sha256 differs from the manifest (corrupted?)")
        yield {"url": url, "stream": io.BytesIO(data)}


def _decode_shards(
    src: Iterable[dict[str, Any]], slices: dict[str, _ShardSlice], seq_len: int, has_target: bool
) -> Iterator[_Chunk]:
    """Tar stage: turn each opened shard into chunks, check the count, keep this rank's slice."""
    for opened in src:
        url = opened["url"]
        try:
            samples = group_by_keys(tar_file_expander([opened]))
            chunks = [_decode_chunk(s, seq_len, has_target) for s in samples]
        except Exception as exn:  # tarfile and numpy raise many types; all mean a bad shard
            raise ShardError(
                f"shard {url}: unreadable ({type(exn).__name__}: {_first_arg(exn)})"
            ) from exn
        piece = slices[url]
        found = sum(c.size for c in chunks)
        if found != piece.info.num_instances:
            raise ShardError(
                f"shard {url}: holds {found} instances, the manifest says {piece.info.num_instances}"
            )
        yield from _slice_chunks(chunks, piece.start, piece.stop)


def _first_arg(exn: Exception) -> str:
    # WebDataset appends the stream object and URL to exception args; keep the original message.
    text = str(exn.args[0]) if exn.args else str(exn)
    return text.split(" @ <", 1)[0]


def _decode_chunk(sample: dict[str, Any], seq_len: int, has_target: bool) -> _Chunk:
    expected = {"seq.npy", "user.npy"} | ({"target.npy"} if has_target else set())
    found = {k for k in sample if not k.startswith("__")}
    if found != expected:
        raise ShardError(
            f"sample {sample.get('__key__')}: members {sorted(found)}, expected {sorted(expected)}"
        )
    seq = _load_npy(sample["seq.npy"])
    user = _load_npy(sample["user.npy"])
    target = _load_npy(sample["target.npy"]) if has_target else None
    n = len(user)
    if (
        seq.shape != (n, seq_len)
        or user.shape != (n,)
        or (target is not None and target.shape != (n,))
    ):
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
