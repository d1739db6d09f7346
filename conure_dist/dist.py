"""Process-group set-up. Everything downstream receives a :class:`DistInfo`, never env vars."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from conure_dist.config import ConfigError, DistConfig


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    """Process-group backend, or None for a single process without a group."""
    ranks_per_node: int | None = None
    """Ranks on each node (torchrun's ``LOCAL_WORLD_SIZE``); None: all on one node."""

    @property
    def num_nodes(self) -> int:
        return -(-self.world_size // (self.ranks_per_node or self.world_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def barrier(dist: DistInfo) -> None:
    """Every rank meets here (nothing to do for a single process)."""
    if dist.is_distributed:
        tdist.barrier()


def _pick_device(cfg: DistConfig, local_rank: int) -> torch.device:
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("key 'dist.device': is 'cuda' but no CUDA device is available (use auto or cpu)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: DistConfig) -> DistInfo:
    """Join the process group that torchrun / the deepspeed launcher described in the env.

    Without those variables this is a single process with no group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(cfg, local_rank)
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size == 1 and cfg.engine != "deepspeed":
        return DistInfo(0, 1, 0, device, None)
    if not tdist.is_initialized():
        if world_size == 1:
            # DeepSpeed needs a process group (and the launcher's variables) even for one
            # process: an in-memory group will do.
            for name in ("RANK", "LOCAL_RANK"):
                os.environ.setdefault(name, "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            tdist.init_process_group(backend=backend, store=tdist.HashStore(), rank=0, world_size=1)
        else:
            tdist.init_process_group(
                backend=backend,
                store=_restart_store(),
                rank=rank,
                world_size=world_size,
                device_id=device if device.type == "cuda" else None,
            )
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    return DistInfo(rank, world_size, local_rank, device, backend, per_node)


def _restart_store() -> tdist.Store:
    """The launcher's store, under a prefix unique to this restart of the worker group.

    After torchrun restarts a failed group, the store still holds the addresses that the dead
    workers published; without a fresh prefix the new group can try to connect to them.
    """
    store, _, _ = next(tdist.rendezvous("env://"))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return tdist.PrefixStore(f"conure/restart-{restart}", store)


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the group. Garbage that still holds it (a DDP reducer in a reference cycle, say) is
    collected first, so that the group's threads are joined now and not while the interpreter
    shuts down, where gloo can abort the process ("terminate called without an active exception")."""
    if info.backend is not None and tdist.is_initialized():
        gc.collect()
        tdist.destroy_process_group()


@contextlib.contextmanager
def process_group(cfg: DistConfig) -> Iterator[DistInfo]:
    """``init_distributed`` for the body of a ``with``; the group is left afterwards, also on errors."""
    info = init_distributed(cfg)
    try:
        yield info
    finally:
        shutdown_distributed(info)
