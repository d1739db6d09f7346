"""Counting what a rank hands to collectives during training steps (``train.step_timing``).

Two seams: DDP's gradient buckets go through a communication hook (``ddp_hook``: counted as
``dense.all_reduce``, with the time from a bucket's launch to its completion); every collective
that Python code issues through ``torch.distributed`` while ``counting()`` is active (the
row-sparse exchange, the loss all-reduce, DeepSpeed's collectives) is counted by wrapping those
functions, under the name of the module that called it (``row_sparse``, ``loss``, ``deepspeed``).
Counts are payload bytes: the size of the tensor a rank puts in (``scaling.comm_model`` predicts
the same figures).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch.distributed as tdist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

_CALLERS = {"conure_dist.train.sparse_sync": "row_sparse", "conure_dist.train.loss": "loss"}
_OP_NAMES = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter"}
_WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


def _exchange_name(module: str) -> str:
    if module.startswith("deepspeed"):
        return "deepspeed"
    return _CALLERS.get(module, module)


def _payload(op: str, args: tuple, kwargs: dict) -> int:
    """Bytes this rank puts into one call: the input tensor (all-gather's second argument)."""
    if op == "all_gather":
        tensor = args[1] if len(args) > 1 else kwargs["tensor"]
    elif op in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        tensor = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input"))
    else:
        tensor = args[0] if args else kwargs["tensor"]
    return tensor.numel() * tensor.element_size()


class CommCounter:
    """Payload bytes per ``NAME.OP`` over the counted steps, and the seconds DDP's buckets took."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.ddp_seconds = 0.0
        self.active = True
        """False during warm-up steps: collectives are not counted."""

    def add(self, key: str, nbytes: int) -> None:
        if self.active:
            self.bytes[key] += nbytes

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count the ``torch.distributed`` collectives called inside the block."""
        originals = {op: getattr(tdist, op) for op in _WRAPPED}

        def wrap(op: str, fn: Any) -> Any:
            def counted(*args: Any, **kwargs: Any) -> Any:
                caller = sys._getframe(1).f_globals.get("__name__", "?")
                if not caller.startswith("torch."):  # torch's own calls (DDP's hook) count elsewhere
                    self.add(f"{_exchange_name(caller)}.{_OP_NAMES.get(op, op)}", _payload(op, args, kwargs))
                return fn(*args, **kwargs)

            return counted

        for op, fn in originals.items():
            setattr(tdist, op, wrap(op, fn))
        try:
            yield
        finally:
            for op, fn in originals.items():
                setattr(tdist, op, fn)

    def ddp_hook(self, state, bucket):  # noqa: ANN001, ANN201 - DDP checks these annotations' types
        """DDP's default all-reduce of a bucket, counted and timed."""
        buffer = bucket.buffer()
        self.add("dense.all_reduce", buffer.numel() * buffer.element_size())
        start, active = time.perf_counter(), self.active
        future = default_hooks.allreduce_hook(state, bucket)

        def done(fut):  # noqa: ANN001, ANN202
            if active:
                self.ddp_seconds += time.perf_counter() - start
            return fut.value()

        return future.then(done)

    def per_step(self, steps: int) -> dict[str, float]:
        return {k: v / max(steps, 1) for k, v in sorted(self.bytes.items())}
