"""A phase's progress: a bar on a terminal, periodic log lines under a batch job.

A progress bar redraws itself with carriage returns; redirected to a file (a Slurm job's output,
``nohup``) every redraw stays, megabytes of them over a run. With no terminal on stderr, a line
is logged at most every ``LOG_INTERVAL_S`` seconds instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 30.0


class LogLines:
    """``tqdm``'s part that a phase uses (iteration, ``set_postfix``), as periodic log lines."""

    def __init__(self, iterable: Iterable[Any], total: int, initial: int, desc: str) -> None:
        self.iterable, self.total, self.n, self.desc = iterable, total, initial, desc
        self.postfix = ""
        self.last = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.monotonic()
            if now - self.last >= LOG_INTERVAL_S:
                self.last = now
                log.info("%s: step %d/%d%s", self.desc, self.n, self.total, self.postfix)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())


def show_progress(iterable: Iterable[Any], total: int, initial: int, desc: str, enabled: bool) -> Any:
    """A bar on a terminal, log lines without one, the bare iterable when not ``enabled``
    (``train.progress: false``, ranks other than 0)."""
    if not enabled:
        return _Quiet(iterable)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, initial=initial, desc=desc, leave=False)
    return LogLines(iterable, total, initial, desc)


class _Quiet:
    """No progress shown."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    def set_postfix(self, **values: Any) -> None:
        pass
