"""One checkpointer for everything needed to resume, on any fsspec filesystem.

The run's stateful parts register once (torchtitan's ``CheckpointManager`` pattern): ``save``
writes every registered part, ``load`` reads each back into the object it came from, verified
against ``COMMIT``. The format (folders, parts, ``COMMIT``) and its reading are ``format``'s.

Asynchronous writes (``async_writes=True``): ``save`` reads every part's ``state_dict()`` and
copies its tensors to host memory (pinned, and reused between checkpoints, for GPU tensors) on
the calling thread, then returns: training may change its state at once. A writer thread
serializes, hashes and uploads; one checkpoint at most is in flight per rank (``save`` first
waits for the previous one), and ``wait()`` blocks until it is done and raises its error there.

The writer runs no collective: one from a second thread would race the training thread's on the
same group. The ranks meet through the filesystem: each rank but 0 writes its parts, then
atomically a manifest ``DONE-rank{r}.json`` (its parts' sha256 and sizes); rank 0's writer
writes its parts, waits for every other manifest (``commit_timeout_s``; the error names the
missing ranks and the folder), checks the listed sizes, and only then commits and deletes old
checkpoints. (Deferring this to the training thread's next collective would leave a checkpoint
uncommitted until the next one.) A kill leaves a folder without ``COMMIT``, ignored by loading;
indices only grow, so no save meets an earlier attempt's manifests. ``async_writes=False``
keeps the synchronous save, the ranks meeting in collectives.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import posixpath
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import fsspec
import torch
import torch.distributed as tdist

from conure_dist.checkpoint.format import (
    COMMIT,
    FORMAT_VERSION,
    MAIN_PARTS,
    RANK_DONE,
    Checkpoint,
    CheckpointError,
    committed_folders,
    load_checkpoint,
    warn_if_newer_uncommitted,
    write_commit,
)
from conure_dist.dist import DistInfo
from conure_dist.fs import join, url_of, write_atomic

log = logging.getLogger(__name__)


def _json_bytes(fname: str, state: Any) -> bytes:
    if fname == "meta.json":
        state = {"format_version": FORMAT_VERSION, **state}
    return json.dumps(state, indent=1).encode()


def _part_bytes(fname: str, obj: Any) -> bytes:
    """What a part's file holds: its object's ``state_dict()`` (or the plain value), as JSON for
    ``.json`` parts, else through ``torch.save`` with top-level tensors moved to the CPU."""
    state = obj.state_dict() if hasattr(obj, "state_dict") else obj
    if fname.endswith(".json"):
        return _json_bytes(fname, state)
    if isinstance(state, dict):
        state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class _HashedFile:
    """A file open for writing that hashes and counts what goes through: ``torch.save`` streams
    into it, with no copy of the whole part in memory."""

    def __init__(self, f: Any) -> None:
        self.f, self.flush, self.sha256, self.size = f, f.flush, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)


def write_part(fs: fsspec.AbstractFileSystem, path: str, state: Any) -> dict[str, Any]:
    """Write ``state``'s bytes as they are, anything else through ``torch.save``; its sha256 and size."""
    with fs.open(path, "wb") as f:
        out = _HashedFile(f)
        out.write(state) if isinstance(state, bytes) else torch.save(state, out)
    return {"sha256": out.sha256.hexdigest(), "size": out.size}


class _Snapshot:
    """Host copies of a checkpoint's tensors, taken on the training thread; a tensor seen twice
    (tied weights) is copied once. The previous snapshot's buffers are reused where key, shape and
    dtype match (its write is over): no fresh memory to pin or fault in."""

    def __init__(self, previous: dict[str, torch.Tensor]) -> None:
        self.previous = previous
        self.buffers: dict[str, torch.Tensor] = {}
        self.seen: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        """Source and copy by storage, offset, shape...: the source is kept alive, so that its
        address cannot come back as another tensor's during the snapshot."""
        self.on_cuda = False

    def take(self, value: Any, key: str) -> Any:
        """``value`` with every tensor in its dicts, lists and tuples copied; other values deep-copied."""
        if isinstance(value, torch.Tensor):
            return self._tensor(value, key)
        if isinstance(value, dict):
            out = copy.copy(value)  # keeps the mapping's type (OrderedDict, defaultdict)
            for k in out:
                out[k] = self.take(value[k], f"{key}/{k}")
            return out
        if isinstance(value, (list, tuple)):
            items = [self.take(v, f"{key}/{i}") for i, v in enumerate(value)]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return copy.deepcopy(value)

    def _tensor(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        src = tensor.detach()
        if src.layout != torch.strided:
            return src.to("cpu", copy=True)
        ident = (
            src.device,
            src.untyped_storage().data_ptr(),
            src.storage_offset(),
            tuple(src.shape),
            src.stride(),
            src.dtype,
        )
        if ident in self.seen:
            return self.seen[ident][1]
        buffer = self.previous.pop(key, None)  # once: two tensors under one key get two buffers
        if buffer is None or buffer.shape != src.shape or buffer.dtype != src.dtype:
            buffer = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
        buffer.copy_(src, non_blocking=src.is_cuda)
        self.on_cuda |= src.is_cuda
        self.buffers[key], self.seen[ident] = buffer, (src, buffer)
        return buffer


class Stateful(Protocol):
    """A piece of the run's state: what it saves, and how it takes that back."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class PartGroup(Protocol):
    """Parts whose files depend on the rank or the moment: a phase's RNG, best parameters and
    optimizer state exist only inside a phase, the optimizer's as one file per rank under ZeRO."""

    def files(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What to save now: rank 0's files, and this rank's own (file name -> object with
        ``state_dict()``, or plain value)."""
        ...

    def load_from(self, ckpt: Checkpoint) -> None:
        """Take back what ``files`` saved (nothing there: the group's state is cleared)."""
        ...


class _OneFile:
    """A part that rank 0 saves to one file and every rank loads back."""

    def __init__(self, fname: str, part: Stateful) -> None:
        self.fname, self.part = fname, part

    def files(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {self.fname: self.part}, {}

    def load_from(self, ckpt: Checkpoint) -> None:
        try:
            self.part.load_state_dict(ckpt.state_of(self.fname))
        except (ValueError, CheckpointError) as exc:  # a user's mismatch or a damaged part: say which
            raise type(exc)(f"{posixpath.join(ckpt.path, self.fname)}: {exc}") from exc


class Checkpointer:
    def __init__(
        self, out: str, dist: DistInfo, keep: int = 2, async_writes: bool = False, commit_timeout_s: float = 1800.0
    ) -> None:
        """``async_writes``: ``save`` returns after a snapshot, a writer thread does the rest;
        call ``wait()`` before exiting. ``commit_timeout_s``: rank 0's wait for other ranks."""
        self.parts: list[PartGroup] = []
        """The registered parts, in the order they load (a part may read what an earlier one loaded)."""
        self.root = join(out, "checkpoints")
        self.fs, self.fs_root = fsspec.core.url_to_fs(self.root)
        self.dist, self.keep = dist, keep
        self.async_writes, self.commit_timeout_s = async_writes, commit_timeout_s
        self.broken: set[str] = set()
        """Committed folders that failed their checks when resuming (not counted as kept)."""
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    # -- the registered parts ----------------------------------------------------------
    def register(self, fname: str, part: Stateful) -> None:
        """``part`` is saved by rank 0 to ``fname`` and loaded back on every rank."""
        self.parts.append(_OneFile(fname, part))

    def register_group(self, group: PartGroup) -> None:
        """``group`` says itself which files each rank saves, and loads them back from the checkpoint."""
        self.parts.append(group)

    def save(self, index: int, tag: str) -> str:
        """Collective: write every registered part as the checkpoint ``{index:05d}-{tag}``."""
        main: dict[str, Any] = {}
        mine: dict[str, Any] = {}
        for group in self.parts:
            on_main, on_rank = group.files()
            main.update(on_main)
            mine.update(on_rank)
        return self.write(index, tag, main, mine)

    def load(self) -> Checkpoint | None:
        """Load the newest intact checkpoint into every registered part, in registration order;
        None (nothing loaded) when nothing was committed yet."""
        ckpt = self.latest_valid()
        if ckpt is None:
            log.info("no committed checkpoint under %s: starting fresh", self.root)
            return None
        for group in self.parts:
            group.load_from(ckpt)
        log.info("loaded %s", ckpt.url)
        return ckpt

    # -- writing -------------------------------------------------------------------------
    def write(self, index: int, tag: str, parts: Mapping[str, Any], rank_parts: Mapping[str, Any] | None = None) -> str:
        """Collective: rank 0 writes ``parts`` (at least ``model.pt``, ``ownership.pt`` and
        ``meta.json``), every rank writes its ``rank_parts``, then rank 0 writes the commit
        marker. Returns the path; with asynchronous writes, once the parts are copied.

        Parts map a file name to what is saved in it: an object with ``state_dict()`` (the model,
        the ownership records, an engine's optimizer, a phase's RNG and best parameters) or a
        plain value. ``.json`` parts are written as JSON, the others with ``torch.save``; so a
        new piece of state is one more entry, and the checkpointer never changes for it."""
        path = posixpath.join(self.fs_root, f"{index:05d}-{tag}")
        mine = dict(rank_parts or {})
        if self.dist.is_main:
            missing = [fname for fname in MAIN_PARTS if fname not in parts]
            if missing:
                raise ValueError(f"a checkpoint needs the parts {list(MAIN_PARTS)}; {missing} not given")
            mine.update(parts)
        if not self.async_writes:
            return self._save_now(path, mine)
        self.wait()
        snapshot = _Snapshot(self._buffers)
        states = {}
        for fname, obj in mine.items():
            state = obj.state_dict() if hasattr(obj, "state_dict") else obj
            states[fname] = _json_bytes(fname, state) if fname.endswith(".json") else snapshot.take(state, fname)
        if snapshot.on_cuda:  # the copies must be over before training changes the tensors
            torch.cuda.synchronize()
        self._buffers = snapshot.buffers
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending = self._writer.submit(self._write, path, states)
        return path

    def wait(self) -> None:
        """Block until the checkpoint in flight is written (committed on rank 0, this rank's parts
        and manifest elsewhere) and raise its error, if any, here (once)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _save_now(self, path: str, parts: Mapping[str, Any]) -> str:
        """The synchronous save: everything on the calling thread, the ranks meet in collectives."""
        digests: dict[str, str] = {}
        parts_bytes = {fname: _part_bytes(fname, obj) for fname, obj in parts.items()}
        if parts_bytes:
            self.fs.makedirs(path, exist_ok=True)
            digests = {
                fname: write_part(self.fs, posixpath.join(path, fname), data)["sha256"]
                for fname, data in parts_bytes.items()
            }
        if self.dist.is_distributed:
            gathered: list[dict[str, str] | None] = [None] * self.dist.world_size
            tdist.all_gather_object(gathered, digests)
            digests = {k: v for part in gathered for k, v in (part or {}).items()}
        if self.dist.is_main:
            self._commit(path, digests)
        if self.dist.is_distributed:
            tdist.barrier()
        return path

    def _write(self, path: str, states: Mapping[str, Any]) -> None:
        """The writer thread's work: this rank's parts, then its manifest (ranks other than 0) or,
        on rank 0, the other ranks' manifests, the commit marker and the retention."""
        try:
            if states:
                self.fs.makedirs(path, exist_ok=True)
            files = {fname: write_part(self.fs, posixpath.join(path, fname), state) for fname, state in states.items()}
            if not self.dist.is_main:
                done = posixpath.join(path, RANK_DONE.format(rank=self.dist.rank))
                write_atomic(url_of(self.fs, done), json.dumps({"files": files}))
                return
            digests = {fname: entry["sha256"] for fname, entry in files.items()}
            self._add_other_ranks(path, digests)
            self._commit(path, digests)
        except Exception as exc:
            message = f"writing the checkpoint {url_of(self.fs, path)} failed: {type(exc).__name__}: {exc}"
            log.error("%s (raised at the next save or wait)", message)
            raise CheckpointError(message) from exc

    def _add_other_ranks(self, path: str, digests: dict[str, str]) -> None:
        """Rank 0: add the other ranks' parts to ``digests`` once every rank's manifest is there,
        each listed part present at its listed size and written by one rank only."""
        done = {rank: posixpath.join(path, RANK_DONE.format(rank=rank)) for rank in range(1, self.dist.world_size)}
        deadline, delay = time.monotonic() + self.commit_timeout_s, 0.01
        while True:
            self.fs.invalidate_cache(path)  # object stores answer from a listing cache otherwise
            missing = [rank for rank, manifest in done.items() if not self.fs.exists(manifest)]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"rank(s) {missing} did not finish their parts of {url_of(self.fs, path)} within "
                    f"{self.commit_timeout_s:g} s (no {RANK_DONE.format(rank=missing[0])}): did they stop?"
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.5)
        for rank, manifest in done.items():
            for fname, entry in json.loads(self.fs.cat_file(manifest))["files"].items():
                fpath = posixpath.join(path, fname)
                size = self.fs.size(fpath) if self.fs.exists(fpath) else None
                if fname in digests or size != entry["size"]:
                    raise CheckpointError(
                        f"{fpath} of rank {rank}: {size} bytes, its manifest says {entry['size']}"
                        + (", and another rank wrote it too" if fname in digests else "")
                    )
                digests[fname] = entry["sha256"]

    def _commit(self, path: str, digests: Mapping[str, str]) -> None:
        write_commit(self.fs, path, dict(digests))
        self._delete_old()

    def _delete_old(self) -> None:
        """Keep the newest ``keep`` intact checkpoints and delete every older one, and every
        folder older than the newest commit that was never committed (a write a kill cut short).
        Checkpoints that failed their checks on resume do not count as kept (names sort in time
        order)."""
        committed = self.committed()
        if committed:
            for leftover in self._uncommitted_before(committed[-1]):
                log.info("removing %s: an interrupted checkpoint write", url_of(self.fs, leftover))
                self.fs.rm(leftover, recursive=True)
        intact = [p for p in committed if p not in self.broken]
        if len(intact) <= self.keep:
            return
        oldest_kept = intact[-self.keep]
        for old in committed:
            if old < oldest_kept:
                self.fs.rm(old, recursive=True)
                self.broken.discard(old)

    def _uncommitted_before(self, newest: str) -> list[str]:
        name = posixpath.basename(newest.rstrip("/"))
        return [
            p
            for p in self.fs.ls(self.fs_root, detail=False)
            if posixpath.basename(p.rstrip("/"))[:5].isdigit()
            and posixpath.basename(p.rstrip("/")) < name
            and not self.fs.exists(posixpath.join(p, COMMIT))
        ]

    # -- reading -------------------------------------------------------------------------
    def committed(self) -> list[str]:
        """Committed checkpoint folders, oldest first."""
        return committed_folders(self.fs, self.fs_root)

    def last_index(self) -> int:
        """The highest index of any folder here, committed or not (0 when there is none): new
        checkpoints take higher ones, so that name order stays time order after a fallback."""
        if not self.fs.isdir(self.fs_root):
            return 0
        names = (posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.fs_root, detail=False))
        return max((int(n[:5]) for n in names if n[:5].isdigit()), default=0)

    def latest_valid(self) -> Checkpoint | None:
        """The newest committed checkpoint whose parts all match their checksums; None when
        nothing was ever committed. Committed checkpoints that all fail their checks are an
        error: starting over would let retention delete them along with the run's progress."""
        self.wait()  # the checkpoint in flight counts
        committed = self.committed()
        problems = []
        for path in reversed(committed):
            try:
                ckpt = load_checkpoint(path, fs=self.fs)
                warn_if_newer_uncommitted(self.fs, self.fs_root, path)
                return ckpt
            except CheckpointError as exc:
                log.warning("skipping checkpoint: %s", exc)
                problems.append(str(exc))
                self.broken.add(path)
        if committed:
            raise CheckpointError(f"no committed checkpoint under {self.root} is intact: " + "; ".join(problems))
        return None
