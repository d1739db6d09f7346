"""Graceful stops and timed checkpoints: what a run checks at every step boundary.

SIGTERM and SIGUSR1 (a scheduler's notice: Slurm's ``--signal``, ``scancel``, torchrun passing
on its own SIGTERM) and SIGINT (Ctrl-C) only set a flag. At the next step boundary the run
checkpoints, or, between phases, finishes the checkpoint it is writing, logs it, and stops with
``Preempted``: ``conure run`` exits with ``EXIT_PREEMPTED`` (75, "try again"), which the launch
scripts turn into a Slurm requeue, or 130 after SIGINT, with a one-line hint to ``--resume``.
A second SIGINT stops at once.

``train.checkpoint_every_minutes`` checkpoints inside a phase once that much time has passed
since the last checkpoint. On several processes the ranks agree on both (one small all-reduce
of "stop" and "due"), so all of them checkpoint at the same step even when the signal or the
clock reaches them at different moments. With gloo they agree at every step: the flags live on
the host. With NCCL reading the agreed flags waits for the device, so they agree only at the
steps where the loop reads its losses anyway (``train.log_every``): a stop then comes at most
that many steps later, and the steps in between keep the host ahead of the device.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from conure_dist.dist import DistInfo

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""``conure run``'s exit status after SIGTERM or SIGUSR1 (sysexits' EX_TEMPFAIL): requeue and resume."""
EXIT_INTERRUPTED = 130
"""After SIGINT, as a shell reports a Ctrl-C."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after its last checkpoint; ``--resume`` continues it."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        where = f"after checkpoint {checkpoint}" if checkpoint else "without a new checkpoint"
        super().__init__(f"stopped by {name} {where}; continue with the same command and --resume")

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_PREEMPTED


@dataclass
class Decision:
    stop: int
    """The signal to stop on (0: none)."""
    due: bool
    """A timed checkpoint is due."""


class StopFlag:
    """The signal received, if any, and when the run last checkpointed."""

    def __init__(self) -> None:
        self.signum = 0
        self.every_s: float | None = None
        self.last_checkpoint = time.monotonic()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        self.signum = self.signum or signum
        log.warning("%s received: checkpointing at the next step boundary, then stopping", signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """The handlers for the body (main thread only); the previous ones are put back after."""
        self.signum = 0  # a signal of an earlier run in this process does not stop this one
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def checkpointed(self) -> None:
        self.last_checkpoint = time.monotonic()

    def decide_at_step(self, dist: DistInfo, step: int, every: int) -> Decision:
        """``decide`` at a step boundary inside a phase. On NCCL the ranks agree only at every
        ``every``-th step (there the loop synchronises with the device anyway); in between
        nothing is decided, without a collective. Every rank calls this with the same steps."""
        if dist.is_distributed and dist.backend == "nccl" and step % every:
            return Decision(0, False)
        return self.decide(dist)

    def decide(self, dist: DistInfo, timed: bool = True) -> Decision:
        """Whether to stop and whether a timed checkpoint is due, the same on every rank
        (collective when distributed)."""
        due = timed and self.every_s is not None and time.monotonic() - self.last_checkpoint >= self.every_s
        if not dist.is_distributed:
            return Decision(self.signum, due)
        device = dist.device if dist.backend == "nccl" else torch.device("cpu")
        flags = torch.tensor([self.signum, int(due)], dtype=torch.int64, device=device)
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        signum, agreed_due = flags.tolist()
        return Decision(signum, bool(agreed_due))


STOP = StopFlag()
"""The process's flag: ``conure run`` installs its handlers; library calls leave signals alone."""
