"""Reading raw text files: contents with their sha256, and bad-row reporting by file and line."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec

from conure_dist.errors import UserError


@dataclass
class RowChecker:
    """Raises on a bad row, or counts it when skipping is allowed."""

    skip: bool
    counts: dict[str, int] = field(default_factory=dict)

    def bad(self, label: str, path: str, line_no: int, reason: str, detail: str) -> None:
        if not self.skip:
            raise UserError(f"{path} line {line_no}: {detail}")
        key = f"{label}: {reason}"
        self.counts[key] = self.counts.get(key, 0) + 1


_UTF8_BOM = b"\xef\xbb\xbf"
_INT = re.compile(r"[+-]?[0-9]+")


def read_text(url: str) -> tuple[str, str]:
    """File contents, without a leading UTF-8 byte-order mark, and the sha256 of the raw bytes
    (for the source record)."""
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError as exn:
        raise FileNotFoundError(f"input file not found: {url}") from exn
    sha = hashlib.sha256(data).hexdigest()
    # Editors that save UTF-8 may put a BOM first; decoded as latin-1 it would glue 'ï»¿' onto
    # the first field. latin-1 never fails to decode; the raw files are ASCII apart from free
    # text (titles).
    return data.removeprefix(_UTF8_BOM).decode("latin-1"), sha


class TextLines:
    """A text file's lines, read as a stream (a block at a time, never the whole file), numbered
    from 1 as ``read_text(url)[0].splitlines()`` numbers them; ``sha256`` (of the raw bytes, as
    ``read_text`` gives it) is set once the lines have been read to the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sha256: str | None = None

    def __iter__(self) -> Iterator[tuple[int, str]]:
        digest, line_no = hashlib.sha256(), 0
        try:
            stream = fsspec.open(self.url, "rb").open()
        except FileNotFoundError as exn:
            raise FileNotFoundError(f"input file not found: {self.url}") from exn
        with stream:
            for index, raw in enumerate(stream):  # split at b"\n"; splitlines() then as read_text's text
                digest.update(raw)
                if index == 0:
                    raw = raw.removeprefix(_UTF8_BOM)
                for line in raw.decode("latin-1").splitlines():
                    line_no += 1
                    yield line_no, line
        self.sha256 = digest.hexdigest()


def parse_int(text: str) -> int | None:
    """The integer ``text`` spells (ASCII digits, optional sign, surrounding whitespace), or None.
    Stricter than ``int()``, which also takes ``1_0`` for 10."""
    stripped = text.strip()
    return int(stripped) if _INT.fullmatch(stripped) else None


INT64_MAX = 2**63 - 1


def beyond_int64(named: dict[str, int]) -> str | None:
    """What a bad row's message says when one of the ``named`` integers does not fit the int64
    arrays the rows are stored in, or None when all fit."""
    big = [f"{name} {value}" for name, value in named.items() if not -INT64_MAX - 1 <= value <= INT64_MAX]
    return f"{', '.join(big)} beyond the int64 range (at most {INT64_MAX})" if big else None


def parse_number(text: str) -> float | None:
    """The finite number ``text`` spells, or None (``float()`` would take ``4_5`` for 45)."""
    if "_" in text:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def numbers_first(token: str) -> tuple[int, float, str]:
    """Sort key of label tokens: numbers in numeric order, then the other tokens as strings."""
    number = parse_number(token)
    return (0, number, token) if number is not None else (1, 0.0, token)
