"""The checkpoint format and its verified reading, on any fsspec filesystem.

Layout under ``{out}/checkpoints/``: one folder per checkpoint, ``{index:05d}-{task}-{stage}``,
holding ``model.pt`` (model state), ``ownership.pt`` (uint8 ownership records), ``meta.json``
(plain JSON: progress, metrics, checksums, config) and, for a checkpoint taken inside a phase,
``phase.pt`` (RNG state, best-epoch parameters) and the optimizer state: ``optimizer.pt`` from
rank 0, or ``optimizer-rank{r}.pt`` from every rank where ZeRO shards it. A ``COMMIT`` file,
written by rank 0 once every rank has written its parts, lists every part with its sha256; a
folder without it, or with a part missing, does not exist as far as loading is concerned.
Nothing is ever overwritten: a crash at any point leaves the previous committed checkpoint
intact, and older ones are deleted only after a newer commit. The first-task cache
(``train.first_task``) commits and verifies its entries with the same ``write_commit`` and
``read_verified``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import pickle
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

from conure_dist.fs import url_of, write_atomic

log = logging.getLogger(__name__)

COMMIT = "COMMIT"
MAIN_PARTS = ("model.pt", "ownership.pt", "meta.json")
"""Parts every checkpoint has, written by rank 0 and read by every tool."""
RANK_DONE = "DONE-rank{rank}.json"
"""An asynchronous write's manifest of one rank other than 0: its parts' sha256 and sizes."""
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

    def state_of(self, name: str) -> Any:
        """What the part ``name`` holds, verified: a main part as read already, another read now."""
        main = {"model.pt": self.model, "ownership.pt": self.ownership, "meta.json": self.meta}
        return main[name] if name in main else self.read_part(name)

    def read_part(self, name: str, allowed: Sequence[type] = ()) -> Any:
        """Load one further part (phase state, optimizer state), verified against COMMIT;
        ``allowed``: the classes besides tensors and plain containers that it may hold."""
        data = read_verified(self.fs, self.path, name, self.digests[name])
        return load_tensors(data, posixpath.join(self.path, name), allowed)


def load_tensors(data: bytes, fpath: str, allowed: Sequence[type] = ()) -> Any:
    """``torch.load`` of a part's bytes, weights only: tensors, plain containers and numbers, and
    the classes in ``allowed``. Anything else (a pickle that would run code) is refused with one
    line naming the file: a checksum does not vouch for a file, since whoever can write it can
    rewrite ``COMMIT`` too. On the CPU, whatever device it was saved from: every rank places
    what it needs itself."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"the object {found[1]}" if found else "an object that is not a tensor"
        raise CheckpointError(f"{fpath}: refused to load: it holds {what}, which a checkpoint never holds") from None


def optimizer_part_name(rank: int, sharded: bool) -> str:
    return f"optimizer-rank{rank}.pt" if sharded else "optimizer.pt"


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
    root = posixpath.join(fs_path, "checkpoints")
    folders = committed_folders(fs, root)
    if not folders:
        root, folders = fs_path, committed_folders(fs, fs_path)
    if not folders:
        raise CheckpointError(
            f"no committed checkpoint at {path} (looked for {COMMIT}, */{COMMIT} and checkpoints/*/{COMMIT})"
        )
    warn_if_newer_uncommitted(fs, root, folders[-1])
    return url_of(fs, folders[-1])


KEY_ENV = "CONURE_CHECKPOINT_KEY"
"""A secret (kept outside the run directory): when set, ``COMMIT`` carries an HMAC-SHA256 of its
digests, and a ``COMMIT`` without a matching one is refused. Whoever can rewrite a part can
rewrite a plain ``COMMIT`` too, but not sign it without the key."""


def _signature(digests: dict[str, str]) -> str | None:
    key = os.environ.get(KEY_ENV)
    if not key:
        return None
    return hmac.new(key.encode(), json.dumps(digests, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def write_commit(fs: fsspec.AbstractFileSystem, path: str, digests: dict[str, str]) -> None:
    """Commit the folder ``path``: its ``COMMIT`` lists every part with its sha256 (signed with
    ``CONURE_CHECKPOINT_KEY`` when set). Atomic, so a kill can never leave a torn marker that
    looks committed."""
    commit: dict[str, Any] = {"files": dict(digests)}
    signature = _signature(commit["files"])
    if signature is not None:
        commit["hmac"] = signature
    write_atomic(url_of(fs, posixpath.join(path, COMMIT)), json.dumps(commit))


def read_commit(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, str]:
    """The parts and sha256 that the folder ``path``'s ``COMMIT`` lists; an error naming the file
    when it is missing, unreadable or (``CONURE_CHECKPOINT_KEY`` set) not signed with the key."""
    commit_path = posixpath.join(path, COMMIT)
    if not fs.exists(commit_path):
        raise CheckpointError(f"{commit_path} is missing: the checkpoint was never committed")
    try:
        commit = json.loads(fs.cat_file(commit_path))
        digests = commit["files"]
        if not isinstance(digests, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{commit_path} is unreadable ({type(exc).__name__}: {exc})") from None
    expected = _signature(digests)
    if expected is not None and not hmac.compare_digest(str(commit.get("hmac", "")), expected):
        state = "is not signed" if "hmac" not in commit else "has a signature that does not match"
        raise CheckpointError(f"{commit_path} {state} with {KEY_ENV}: written without the key, or altered")
    return digests


def newer_uncommitted(fs: fsspec.AbstractFileSystem, root: str, chosen: str) -> list[str]:
    """Checkpoint folders under ``root`` named after ``chosen`` that hold no ``COMMIT``: a write
    that was interrupted, or a marker that was deleted."""
    if not fs.isdir(root):
        return []
    name = posixpath.basename(chosen.rstrip("/"))
    return sorted(
        p
        for p in fs.ls(root, detail=False)
        if posixpath.basename(p.rstrip("/")) > name
        and posixpath.basename(p.rstrip("/"))[:5].isdigit()
        and not fs.exists(posixpath.join(p, COMMIT))
    )


def warn_if_newer_uncommitted(fs: fsspec.AbstractFileSystem, root: str, chosen: str) -> None:
    """Say loudly when an older checkpoint is used because newer folders have no ``COMMIT``."""
    newer = newer_uncommitted(fs, root, chosen)
    if newer:
        log.warning(
            "USING AN OLDER CHECKPOINT: %s; the newer %s hold no %s (an interrupted write, or a deleted marker), "
            "so what they held is not used",
            url_of(fs, chosen),
            ", ".join(posixpath.basename(p.rstrip("/")) for p in newer),
            COMMIT,
        )


def read_verified(fs: fsspec.AbstractFileSystem, path: str, fname: str, digest: str) -> bytes:
    """The bytes of the part ``fname`` of the folder ``path``, checked against its sha256."""
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
    digests = read_commit(fs, path)
    for fname in (*MAIN_PARTS, *digests):
        if fname not in digests or not fs.exists(posixpath.join(path, fname)):
            raise CheckpointError(f"{posixpath.join(path, fname)} is missing")
    data = {fname: read_verified(fs, path, fname, digests[fname]) for fname in MAIN_PARTS}
    try:
        meta = json.loads(data["meta.json"])
    except ValueError as exc:
        raise CheckpointError(f"{posixpath.join(path, 'meta.json')} is not valid JSON: {exc}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format_version')}")
    model = load_tensors(data["model.pt"], posixpath.join(path, "model.pt"))
    ownership = load_tensors(data["ownership.pt"], posixpath.join(path, "ownership.pt"))
    return Checkpoint(path=path, model=model, ownership=ownership, meta=meta, fs=fs, digests=digests)
