"""Paths and files on any fsspec filesystem (local disk, ``s3://``, ``memory://``).

Shared by the data, checkpoint and report code: joining URLs, telling local paths apart, and
writing small files atomically.
"""

from __future__ import annotations

import os
import posixpath
import tempfile

import fsspec


def join(base: str, *parts: str) -> str:
    """``base`` joined with ``parts``; keeps ``s3://`` and other protocols intact."""
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def join_url(root: str, relative: str) -> str:
    """``root`` joined with a relative ``a/b`` path; keeps ``s3://`` and other protocols intact."""
    if "://" in root:
        return root.rstrip("/") + "/" + relative
    return os.path.join(root, *relative.split("/"))


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs, the only places where atomic renames exist."""
    fs, _ = fsspec.core.url_to_fs(url)
    return "file" in _protocols(fs)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def write_atomic(url: str, text: str) -> None:
    """Write a small text file so that a reader sees the old file or the whole new one, never a
    part: on local disk it is written aside and renamed; object stores make a single PUT visible
    all at once, so a plain write is atomic there."""
    if is_local(url):
        _write_local_atomic(fsspec.core.url_to_fs(url)[1], text)
    else:
        with fsspec.open(url, "w") as f:
            f.write(text)


def _write_local_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
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
