"""T1's train phase, trained once and reused by every run that would train it the same way.

Every method (Conure, Conure- and the baselines) starts with the same phase: T1 trained on the
whole backbone. Runs that differ only in what comes after it (the methods of Table 2, the variants
of an ablation) can share that phase: with ``train.first_task_cache=DIR`` a run looks in DIR for
the phase's result under a key of everything the phase depends on, loads it if present, and
otherwise trains the phase and stores it there for the next run.

The key is exact, not a guess: the run's settings that the phase reads (seed, data, model,
training and distribution settings, T1's epochs, lr, batch and L2, the number of processes, the
torch version and device) and the initial values of every tensor the phase reads or trains (the
backbone and T1's head). A run that finds its key continues from bit for bit the state it would
have trained itself: the backbone and T1's head after the phase, the step count, the phase's
summary, and its log events, replayed into the run's own log. What the phase does not touch
(later tasks' heads, PeterRec's patches) keeps the run's own initial values.

An entry is a folder ``DIR/<key>/`` stored as a checkpoint is (``checkpoint.format``): its parts
``state.pt`` and ``meta.json``, then ``COMMIT`` listing their sha256. A reader ignores an entry
without ``COMMIT`` and refuses one whose parts do not match their hashes, so a killed writer never
leaves an entry that loads. (Entries of format 1, whose ``COMMIT`` held the key, sit under keys
that format 2 never computes: they are never read, and T1 is trained and stored again.) Rank 0
decides and reads; the other ranks receive the tensors by broadcast, so DIR need not be shared
between nodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
import torch
import torch.distributed as tdist

from conure_dist.checkpoint.checkpointer import write_part
from conure_dist.checkpoint.format import (
    COMMIT,
    CheckpointError,
    load_tensors,
    read_commit,
    read_verified,
    write_commit,
)
from conure_dist.config import RUN_ONLY_TRAIN_KEYS, RunConfig
from conure_dist.dist import DistInfo
from conure_dist.errors import UserError
from conure_dist.fs import join, write_atomic
from conure_dist.model import ConureModel
from conure_dist.train.logger import JsonlLogger

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""2: entries committed as checkpoints are (1: ``COMMIT`` held the key, ``meta.json`` the hash)."""
PARTS = ("state.pt", "meta.json")
MARKER = "first_task.json"
"""Written into a run's output folder once its T1 train phase is trained or loaded (what
``conure experiment`` waits for before it starts the runs that reuse it)."""

_KEYED_TASK = ("name", "epochs", "lr", "batch_size", "l2")
"""T1's settings that its train phase reads (its prune ratio and retrain epochs come later)."""


def phase_names(state: dict[str, torch.Tensor], first_task: str) -> list[str]:
    """The model entries T1's train phase reads or trains: the backbone and T1's head."""
    return sorted(n for n in state if n.startswith(("backbone.", f"heads.{first_task}.")))


def keyed_settings(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The run settings T1's train phase reads (``RunConfig.to_dict`` form)."""
    return {
        "format": FORMAT_VERSION,
        "seed": cfg_dict["seed"],
        "data": cfg_dict["data"],
        "model": cfg_dict["model"],
        "dist": cfg_dict["dist"],
        "continual": cfg_dict.get("continual"),
        "train": {k: v for k, v in cfg_dict["train"].items() if k not in RUN_ONLY_TRAIN_KEYS},
        "task": {k: cfg_dict["tasks"][0][k] for k in _KEYED_TASK},
    }


def phase_key(
    cfg_dict: dict[str, Any], state: dict[str, torch.Tensor], first_task: str, world_size: int, device: torch.device
) -> str:
    """The sha256 of everything T1's train phase depends on (see the module docstring)."""
    settings = {
        **keyed_settings(cfg_dict),
        "world_size": world_size,
        "torch": torch.__version__,
        "device": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in phase_names(state, first_task):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class FirstTaskCache:
    """The entries of one cache folder (local or any fsspec URL)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def folder(self, key: str) -> str:
        return join(self.root, key[:32])

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The entry's tensors and meta, or None when no committed entry has this key."""
        folder = self.folder(key)
        fs, path = fsspec.core.url_to_fs(folder)
        if not fs.exists(posixpath.join(path, COMMIT)):
            return None
        try:
            digests = read_commit(fs, path)
            if sorted(digests) != sorted(PARTS):
                raise CheckpointError(f"{posixpath.join(path, COMMIT)} lists {sorted(digests)}, not {sorted(PARTS)}")
            meta = json.loads(read_verified(fs, path, "meta.json", digests["meta.json"]))
            if meta.get("key") != key:
                raise CheckpointError(f"the entry was stored under another key ({meta.get('key')})")
            data = read_verified(fs, path, "state.pt", digests["state.pt"])
        except CheckpointError as exc:
            raise UserError(
                f"{folder}: a damaged entry of the first-task cache ({exc}): delete the folder to train T1 again"
            ) from None
        return load_tensors(data, posixpath.join(path, "state.pt")), meta

    def store(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Write the entry (``COMMIT`` last); an entry already committed under the key stays."""
        fs, path = fsspec.core.url_to_fs(self.folder(key))
        if fs.exists(posixpath.join(path, COMMIT)):
            return
        fs.makedirs(path, exist_ok=True)
        contents = {
            "state.pt": {n: t.detach().cpu() for n, t in tensors.items()},
            "meta.json": json.dumps({**meta, "key": key}).encode(),
        }
        digests = {}
        for fname, content in contents.items():
            # Under a unique name first: a second writer of the same key never tears this one's part.
            partial = posixpath.join(path, f"{fname}.{uuid.uuid4().hex}.partial")
            digests[fname] = write_part(fs, partial, content)["sha256"]
            fs.mv(partial, posixpath.join(path, fname))
        write_commit(fs, path, digests)


class EventRecorder:
    """Collects the events a phase logs, to replay them into a later run's log."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        self.events.append({"event": event, **fields})


def run_first_phase(
    cfg: RunConfig,
    dist: DistInfo,
    model: ConureModel,
    logger: JsonlLogger,
    out: str | None,
    global_step: int,
    train_phase: Callable[[], tuple[dict[str, Any], int]],
) -> tuple[dict[str, Any], int]:
    """T1's train phase through the cache at ``train.first_task_cache``: loaded when an entry
    has the run's key, otherwise trained by ``train_phase`` (which returns the phase summary and
    the run's step count after it) and stored. Returns the summary and the step count after the
    phase, ``global_step`` being the count before it."""
    first = cfg.tasks[0].name
    state = model.state_dict()
    names = phase_names(state, first)
    key = phase_key(cfg.to_dict(), state, first, dist.world_size, dist.device)
    cache = FirstTaskCache(cfg.train.first_task_cache)
    found = cache.load(key) if dist.is_main else None
    decision = [None if found is None else found[1]]
    if dist.is_distributed:
        tdist.broadcast_object_list(decision, src=0)
    meta = decision[0]
    if meta is not None:
        _load_phase(model, {n: state[n] for n in names}, None if found is None else found[0], dist)
        logger.log("first_task_reused", task=first, cache=cache.folder(key), key=key)
        _replay(logger, meta["events"], global_step)
        summary, reused, global_step = meta["summary"], True, global_step + meta["steps"]
    else:
        rng = torch.get_rng_state()
        start_step = global_step
        recorder = EventRecorder()
        logger.recorders.append(recorder)
        try:
            summary, global_step = train_phase()
        finally:
            logger.recorders.remove(recorder)
        reused = False
        if not torch.equal(rng, torch.get_rng_state()):
            # Nothing in a phase draws from the global generator today; if that changes, a stored
            # entry would not give the next run the generator state it would have had.
            log.warning("T1's train phase drew from torch's global generator: not storing it in %s", cache.root)
        elif dist.is_main:
            # Step counts relative to the phase's start: a loading run adds its own.
            events = [
                {**e, "global_step": e["global_step"] - start_step} if "global_step" in e else e
                for e in recorder.events
            ]
            cache.store(
                key,
                {n: state[n] for n in names},
                {
                    "format": FORMAT_VERSION,
                    "task": first,
                    "steps": global_step - start_step,
                    "summary": summary,
                    "events": events,
                },
            )
    if dist.is_main and out:
        write_atomic(join(out, MARKER), json.dumps({"key": key, "cache": cache.folder(key), "reused": reused}) + "\n")
    return summary, global_step


def _load_phase(
    model: ConureModel, targets: dict[str, torch.Tensor], found: dict[str, torch.Tensor] | None, dist: DistInfo
) -> None:
    """Copy the entry's tensors (read on rank 0, broadcast to the others) into ``targets``; the
    phase leaves nothing trainable."""
    with torch.no_grad():
        for name, target in targets.items():
            if found is not None:
                target.copy_(found[name])
            if dist.is_distributed:
                tdist.broadcast(target, src=0)
    for param in model.parameters():
        param.requires_grad_(False)


def _replay(logger: JsonlLogger, events: list[dict[str, Any]], global_step: int) -> None:
    """Log a stored phase's events as the run would have, its step counts after ``global_step``."""
    for event in events:
        fields = dict(event)
        name = fields.pop("event")
        if "global_step" in fields:
            fields["global_step"] += global_step
        logger.log(name, **fields)
