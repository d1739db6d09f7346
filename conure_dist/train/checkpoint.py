"""One checkpointer for everything needed to resume, on any fsspec filesystem.

Layout under ``{out}/checkpoints/``: one folder per checkpoint, ``{index:05d}-{task}-{stage}``,
holding ``model.pt`` (model state), ``ownership.pt`` (uint8 ownership records), optional
per-rank engine parts and ``meta.json`` (plain JSON: progress, metrics, checksums, config).
A ``COMMIT`` file, written last, lists every part with its sha256; a folder without it does not
exist as far as loading is concerned. Nothing is ever overwritten: a crash at any point leaves
the previous committed checkpoint intact, and older ones are deleted only after a newer commit.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

from conure_dist.dist import DistInfo

log = logging.getLogger(__name__)

COMMIT = "COMMIT"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


@dataclass
class Checkpoint:
    path: str
    model: dict[str, torch.Tensor]
    ownership: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _tensor_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> str:
    with fs.open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def join(base: str, *parts: str) -> str:
    if "://" in base:
        return posixpath.join(base, *parts)
    import os

    return os.path.join(base, *parts)


class Checkpointer:
    def __init__(self, out: str, dist: DistInfo, keep: int = 2) -> None:
        self.root = join(out, "checkpoints")
        self.fs, self.fs_root = fsspec.core.url_to_fs(self.root)
        self.dist = dist
        self.keep = keep

    # -- writing -------------------------------------------------------------------------
    def save(
        self,
        index: int,
        tag: str,
        model_state: dict[str, torch.Tensor],
        ownership_state: dict[str, torch.Tensor],
        meta: dict[str, Any],
    ) -> str:
        """Rank 0 writes all parts, then the commit marker. Returns the checkpoint path."""
        name = f"{index:05d}-{tag}"
        path = posixpath.join(self.fs_root, name)
        if self.dist.is_main:
            self.fs.makedirs(path, exist_ok=True)
            parts = {
                "model.pt": _tensor_bytes({k: v.detach().cpu() for k, v in model_state.items()}),
                "ownership.pt": _tensor_bytes({k: v.cpu() for k, v in ownership_state.items()}),
                "meta.json": json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1).encode(),
            }
            digests = {fname: _write_bytes(self.fs, posixpath.join(path, fname), data) for fname, data in parts.items()}
            _write_bytes(self.fs, posixpath.join(path, COMMIT), json.dumps({"files": digests}).encode())
            self._delete_old()
        return path

    def _delete_old(self) -> None:
        committed = self.committed()
        for old in committed[: -self.keep]:
            self.fs.rm(old, recursive=True)

    # -- reading -------------------------------------------------------------------------
    def committed(self) -> list[str]:
        """Committed checkpoint folders, oldest first."""
        if not self.fs.exists(self.fs_root):
            return []
        folders = sorted(p for p in self.fs.ls(self.fs_root, detail=False))
        return [p for p in folders if self.fs.exists(posixpath.join(p, COMMIT))]

    def latest_valid(self) -> Checkpoint | None:
        """The newest committed checkpoint whose parts all match their checksums."""
        for path in reversed(self.committed()):
            try:
                return load_checkpoint(path, fs=self.fs)
            except CheckpointError as exc:
                log.warning("skipping checkpoint: %s", exc)
        return None


def resolve_checkpoint(path: str) -> str:
    """Accept a run directory (newest committed checkpoint inside) or a checkpoint folder."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.exists(posixpath.join(fs_path, COMMIT)):
        return path
    folders = []
    ckpt_root = posixpath.join(fs_path, "checkpoints")
    if fs.exists(ckpt_root):
        folders = sorted(p for p in fs.ls(ckpt_root, detail=False) if fs.exists(posixpath.join(p, COMMIT)))
    if not folders:
        raise CheckpointError(f"no committed checkpoint at {path} (looked for {COMMIT} and checkpoints/*/{COMMIT})")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return folders[-1] if protocol in ("file", "local") else f"{protocol}://{folders[-1]}"


def load_checkpoint(path: str, fs: fsspec.AbstractFileSystem | None = None) -> Checkpoint:
    """Load and verify one checkpoint folder (local path or URL)."""
    if fs is None:
        fs, path = fsspec.core.url_to_fs(path)
    commit_path = posixpath.join(path, COMMIT)
    if not fs.exists(commit_path):
        raise CheckpointError(f"{commit_path} is missing: the checkpoint was never committed")
    digests = json.loads(fs.cat_file(commit_path))["files"]
    data = {}
    for fname, digest in digests.items():
        fpath = posixpath.join(path, fname)
        if not fs.exists(fpath):
            raise CheckpointError(f"{fpath} is missing")
        data[fname] = fs.cat_file(fpath)
        if hashlib.sha256(data[fname]).hexdigest() != digest:
            raise CheckpointError(f"{fpath} does not match its checksum in {COMMIT}")
    meta = json.loads(data["meta.json"])
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format_version')}")
    model = torch.load(io.BytesIO(data["model.pt"]), weights_only=True)
    ownership = torch.load(io.BytesIO(data["ownership.pt"]), weights_only=True)
    return Checkpoint(path=path, model=model, ownership=ownership, meta=meta)
