"""JSONL event log of a run (``{out}/log.jsonl``), written by rank 0."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import fsspec


class JsonlLogger:
    """Appends one JSON object per event. Object stores cannot append, so there the file is
    rewritten on :meth:`flush` (called at every checkpoint)."""

    def __init__(self, path: str, enabled: bool = True, sinks: list | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self.sinks = sinks or []
        """Further destinations of every event (``conure_dist.train.sinks``): TensorBoard..."""
        self.recorders: list = []
        """Callables given each event and its fields as logged (``first_task.EventRecorder``)."""
        self.fs, self.fs_path = fsspec.core.url_to_fs(path)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.lines: list[str] = []
        if enabled and not self.local and self.fs.exists(self.fs_path):
            self.lines = self.fs.cat_file(self.fs_path).decode().splitlines(keepends=True)

    def log(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps(_finite({"time": round(time.time(), 3), "event": event, **fields}), allow_nan=False) + "\n"
        for sink in self.sinks:
            sink.log(event, fields)
        for recorder in self.recorders:
            recorder(event, fields)
        if self.local:
            self.fs.makedirs(self.fs._parent(self.fs_path), exist_ok=True)
            with self.fs.open(self.fs_path, "a") as f:
                f.write(line)
        else:
            self.lines.append(line)

    def flush(self) -> None:
        if self.enabled and not self.local:
            with self.fs.open(self.fs_path, "w") as f:
                f.write("".join(self.lines))
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        """Flush, and close the sinks (the run is over)."""
        self.flush()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _finite(value: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers (a diverged loss would make the line
    unreadable to strict parsers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
