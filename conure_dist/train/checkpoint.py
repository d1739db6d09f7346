"""One checkpointer for everything needed to resume, on any fsspec filesystem.

Layout under ``{out}/checkpoints/``: one folder per checkpoint, ``{index:05d}-{task}-{stage}``,
holding ``model.pt`` (model state), ``ownership.pt`` (uint8 ownership records), ``meta.json``
(plain JSON: progress, metrics, checksums, config) and, for a checkpoint taken inside a phase,
``phase.pt`` (RNG state, best-epoch parameters) and the optimizer state: ``optimizer.pt`` from
rank 0, or ``optimizer-rank{r}.pt`` from every rank where ZeRO shards it. A ``COMMIT`` file,
written by rank 0 once every rank has written its parts, lists every part with its sha256; a
folder without it, or with a part missing, does not exist as far as loading is concerned. Nothing is ever overwritten: a crash at any point leaves
the previous committed checkpoint intact, and older ones are deleted only after a newer commit.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torch.distributed as tdist

from conure_dist.dist import DistInfo
from conure_dist.fs import join, url_of, write_atomic

log = logging.getLogger(__name__)

COMMIT = "COMMIT"
MAIN_PARTS = ("model.pt", "ownership.pt", "meta.json")
"""Parts every checkpoint has, written by rank 0 and read by every tool."""
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


@dataclass
class Checkpoint:
    path: str
    model: dict[str, torch.Tensor]
    ownership: dict[str, torch.Tensor]
    meta: dict[str, Any]
    fs: fsspec.AbstractFileSystem
    digests: dict[str, str]

    @property
    def url(self) -> str:
        """The folder as the user gives it: with its protocol (``s3://``) where not local."""
        return url_of(self.fs, self.path)

    def has_part(self, name: str) -> bool:
        return name in self.digests

    def read_part(self, name: str, weights_only: bool = True) -> Any:
        """Load one further part (phase state, optimizer state), verified against COMMIT."""
        data = _read_verified(self.fs, self.path, name, self.digests[name])
        # On CPU whatever device rank 0 saved from: every rank places what it needs itself.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)


def optimizer_part_name(rank: int, sharded: bool) -> str:
    return f"optimizer-rank{rank}.pt" if sharded else "optimizer.pt"


def _part_bytes(fname: str, obj: Any) -> bytes:
    """What a part's file holds: its object's ``state_dict()`` (or the plain value), as JSON for
    ``.json`` parts, else through ``torch.save`` with top-level tensors moved to the CPU."""
    state = obj.state_dict() if hasattr(obj, "state_dict") else obj
    if fname.endswith(".json"):
        if fname == "meta.json":
            state = {"format_version": FORMAT_VERSION, **state}
        return json.dumps(state, indent=1).encode()
    if isinstance(state, dict):
        state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> str:
    with fs.open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


class Checkpointer:
    def __init__(self, out: str, dist: DistInfo, keep: int = 2) -> None:
        self.root = join(out, "checkpoints")
        self.fs, self.fs_root = fsspec.core.url_to_fs(self.root)
        self.dist = dist
        self.keep = keep
        self.broken: set[str] = set()
        """Committed folders that failed their checks when resuming (not counted as kept)."""

    # -- writing -------------------------------------------------------------------------
    def save(self, index: int, tag: str, parts: Mapping[str, Any], rank_parts: Mapping[str, Any] | None = None) -> str:
        """Collective: rank 0 writes ``parts`` (at least ``model.pt``, ``ownership.pt`` and
        ``meta.json``), every rank writes its ``rank_parts``, then rank 0 writes the commit
        marker. Returns the path.

        Parts map a file name to what is saved in it: an object with ``state_dict()`` (the model,
        the ownership records, an engine's optimizer, a phase's RNG and best parameters) or a
        plain value. ``.json`` parts are written as JSON, the others with ``torch.save``; so a
        new piece of state is one more entry, and the checkpointer never changes for it."""
        name = f"{index:05d}-{tag}"
        path = posixpath.join(self.fs_root, name)
        digests: dict[str, str] = {}
        parts_bytes = {fname: _part_bytes(fname, obj) for fname, obj in (rank_parts or {}).items()}
        if self.dist.is_main:
            missing = [fname for fname in MAIN_PARTS if fname not in parts]
            if missing:
                raise ValueError(f"a checkpoint needs the parts {list(MAIN_PARTS)}; {missing} not given")
            parts_bytes.update({fname: _part_bytes(fname, obj) for fname, obj in parts.items()})
        if parts_bytes:
            self.fs.makedirs(path, exist_ok=True)
            digests = {fname: _write_bytes(self.fs, posixpath.join(path, fname), data)
                       for fname, data in parts_bytes.items()}
        if self.dist.is_distributed:
            gathered: list[dict[str, str] | None] = [None] * self.dist.world_size
            tdist.all_gather_object(gathered, digests)
            digests = {k: v for part in gathered for k, v in (part or {}).items()}
        if self.dist.is_main:
            # Atomic, so a kill can never leave a torn marker that looks committed.
            write_atomic(url_of(self.fs, posixpath.join(path, COMMIT)), json.dumps({"files": digests}))
            self._delete_old()
        if self.dist.is_distributed:
            tdist.barrier()
        return path

    def _delete_old(self) -> None:
        """Keep the newest ``keep`` intact checkpoints and delete every older one. Checkpoints
        that failed their checks on resume do not count as kept (names sort in time order)."""
        committed = self.committed()
        intact = [p for p in committed if p not in self.broken]
        if len(intact) <= self.keep:
            return
        oldest_kept = intact[-self.keep]
        for old in committed:
            if old < oldest_kept:
                self.fs.rm(old, recursive=True)
                self.broken.discard(old)

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
        committed = self.committed()
        problems = []
        for path in reversed(committed):
            try:
                return load_checkpoint(path, fs=self.fs)
            except CheckpointError as exc:
                log.warning("skipping checkpoint: %s", exc)
                problems.append(str(exc))
                self.broken.add(path)
        if committed:
            raise CheckpointError(f"no committed checkpoint under {self.root} is intact: " + "; ".join(problems))
        return None


def committed_folders(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The folders directly under ``root`` that hold a ``COMMIT`` file, oldest (by name) first."""
    if not fs.isdir(root):
        return []
    return sorted(p for p in fs.ls(root, detail=False) if fs.exists(posixpath.join(p, COMMIT)))


def resolve_checkpoint(path: str) -> str:
    """Accept a checkpoint folder, or the newest committed checkpoint of a run directory or of
    its ``checkpoints`` folder."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.exists(posixpath.join(fs_path, COMMIT)):
        return path
    folders = committed_folders(fs, posixpath.join(fs_path, "checkpoints")) or committed_folders(fs, fs_path)
    if not folders:
        raise CheckpointError(f"no committed checkpoint at {path} (looked for {COMMIT}, */{COMMIT} and "
                              f"checkpoints/*/{COMMIT})")
    return url_of(fs, folders[-1])


def _read_verified(fs: fsspec.AbstractFileSystem, path: str, fname: str, digest: str) -> bytes:
    fpath = posixpath.join(path, fname)
    if not fs.exists(fpath):
        raise CheckpointError(f"{fpath} is missing")
    data = fs.cat_file(fpath)
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{fpath} does not match its checksum in {COMMIT}")
    return data



def load_checkpoint(path: str, fs: fsspec.AbstractFileSystem | None = None) -> Checkpoint:
    """Load and verify one checkpoint folder (local path or URL). Every listed part must exist;
    the main parts are read and checked now, the others when they are read."""
    if fs is None:
        fs, path = fsspec.core.url_to_fs(path)
    commit_path = posixpath.join(path, COMMIT)
    if not fs.exists(commit_path):
        raise CheckpointError(f"{commit_path} is missing: the checkpoint was never committed")
    try:
        digests = json.loads(fs.cat_file(commit_path))["files"]
        if not isinstance(digests, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{commit_path} is unreadable ({type(exc).__name__}: {exc})") from None
    for fname in (*MAIN_PARTS, *digests):
        if fname not in digests or not fs.exists(posixpath.join(path, fname)):
            raise CheckpointError(f"{posixpath.join(path, fname)} is missing")
    data = {fname: _read_verified(fs, path, fname, digests[fname]) for fname in MAIN_PARTS}
    try:
        meta = json.loads(data["meta.json"])
    except ValueError as exc:
        raise CheckpointError(f"{posixpath.join(path, 'meta.json')} is not valid JSON: {exc}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format_version')}")
    model = torch.load(io.BytesIO(data["model.pt"]), map_location="cpu", weights_only=True)
    ownership = torch.load(io.BytesIO(data["ownership.pt"]), map_location="cpu", weights_only=True)
    return Checkpoint(path=path, model=model, ownership=ownership, meta=meta, fs=fs, digests=digests)
