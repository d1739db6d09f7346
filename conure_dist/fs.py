"""Paths and files on any fsspec filesystem (local disk, ``s3://``, ``memory://``).

Shared by the data, checkpoint and report code: joining URLs, telling local paths apart, and
writing small files atomically.
"""

from __future__ import annotations

import os
import tempfile

import fsspec


def join(base: str, *parts: str) -> str:
    """``base`` (a local path or an fsspec URL) joined with relative ``a/b`` ``parts``.

    Every part is a path relative to ``base`` with ``/`` separators; empty components are
    dropped (``a//b`` is ``a/b``). A part that is absolute (starts with ``/``) or a URL raises
    :class:`ValueError` instead of silently replacing ``base``.

    For a URL (``s3://bucket/prefix``, ``memory://``) one ``/`` is put between ``base`` and the
    parts unless ``base`` already ends with ``/``, so the protocol stays intact even for a bare
    root: ``join("memory://", "x") == "memory://x"``, ``join("s3://b", "x") == "s3://b/x"``,
    ``join("s3://b/", "x") == "s3://b/x"``. A local path is joined with :func:`os.path.join`
    (the platform's separator). With nothing to add, ``base`` comes back unchanged.
    """
    names = []
    for part in parts:
        if part.startswith("/") or "://" in part:
            raise ValueError(f"cannot join {part!r} to {base!r}: the parts must be relative paths")
        names.extend(name for name in part.split("/") if name)
    if not names:
        return base
    if "://" in base:
        return base + ("" if base.endswith("/") else "/") + "/".join(names)
    return os.path.join(base, *names)


def is_relative_local(path: str) -> bool:
    """A local path relative to the current directory (neither a URL nor absolute)."""
    return "://" not in path and not os.path.isabs(path)


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs, the only places where atomic renames exist."""
    fs, _ = fsspec.core.url_to_fs(url)
    return "file" in _protocols(fs)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def write_atomic(url: str, text: str | bytes) -> None:
    """Write a file so that a reader sees the old file or the whole new one, never a part: on
    local disk it is written aside, synced and renamed (with the mode a plain write gets);
    object stores make a single PUT visible all at once, so a plain write is atomic there."""
    if is_local(url):
        _write_local_atomic(fsspec.core.url_to_fs(url)[1], text)
    else:
        with fsspec.open(url, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _write_local_atomic(path: str, text: str | bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".tmp", dir=directory)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make the file unlike every other one
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A filesystem path as the user gives it: with its protocol (``s3://``) where not local."""
    protocol = _protocols(fs)[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"
