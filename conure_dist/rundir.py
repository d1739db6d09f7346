"""A run directory belongs to one run: a lock held while the run lives, and a record of what ran.

``RUN.lock`` (rank 0 writes it; JSON: host, pid, Slurm job, start and heartbeat times) is held
for the whole run and refreshed every ``HEARTBEAT_S`` seconds by a thread. Another run into the
same ``--out`` is refused while the holder lives. A lock is stale, and taken over with a
warning, when its heartbeat is older than ``STALE_AFTER_S``, when its holder is a process of
this host that no longer exists (a kill -9, a torchrun restart), or when it belongs to the same
Slurm job (a requeued job continues its own run). It is removed when the run ends, also on an
error or an interruption.

``run.json`` records the method and the configuration of the run that owns the directory. A
run of another method, or (for a run that starts over rather than resuming a checkpoint) with
other settings that change results, is refused unless ``--force``; a resumed run's settings are
checked against its checkpoint by the loop (``train.parts.check_resumed_config``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import torch.distributed as tdist

from conure_dist.config import RUN_ONLY_TRAIN_KEYS, RunConfig, config_changes
from conure_dist.dist import DistInfo
from conure_dist.errors import UserError
from conure_dist.fs import is_local, join, write_atomic

log = logging.getLogger(__name__)

LOCK = "RUN.lock"
RECORD = "run.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
"""A holder whose heartbeat is this old is taken for dead (ten missed heartbeats)."""

NOT_RESULTS = frozenset(
    {f"train.{key}" for key in RUN_ONLY_TRAIN_KEYS} | {"train.num_threads", "train.eval_batch_size", "dist.compile"}
)
"""Settings that change how a run is carried out or shown, not its results."""
NOT_RESULTS_PREFIXES = ("dist.",)
"""Engine, precision and world size may change between attempts (elastic resume)."""


def result_changes(recorded: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings that change results and differ between two configs (as ``to_dict`` gives them)."""
    return {
        k: v
        for k, v in config_changes(recorded, now).items()
        if k not in NOT_RESULTS and not k.startswith(NOT_RESULTS_PREFIXES)
    }


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "id": uuid.uuid4().hex,
        "started": time.time(),
    }


def _alive_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_reason(lock: dict[str, Any], me: dict[str, Any]) -> str | None:
    """Why the lock ``lock`` no longer holds the directory, or None while its holder lives."""
    age = time.time() - float(lock.get("heartbeat", 0))
    if age > STALE_AFTER_S:
        return f"its last heartbeat is {age:.0f} s old"
    if lock.get("host") == me["host"] and not _alive_here(int(lock.get("pid", -1))):
        return f"its process {lock.get('pid')} on this host is gone"
    if me["slurm_job"] and lock.get("slurm_job") == me["slurm_job"]:
        return f"it belongs to this Slurm job {me['slurm_job']} (a requeued attempt)"
    return None


class RunLock:
    """Rank 0's hold on ``out``: taken by ``acquire``, refreshed by a thread, removed by ``release``."""

    def __init__(self, out: str) -> None:
        self.url = join(out, LOCK)
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.me = _holder()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # torn by a crash mid-write on a filesystem without atomic rename: stale

    def _write(self) -> None:
        write_atomic(self.url, json.dumps({**self.me, "heartbeat": time.time()}))

    def _create_exclusive(self) -> bool:
        """Create the lock unless one exists (atomically on local disk); False if one did."""
        if not is_local(self.url):
            if self.fs.exists(self.path):
                return False
            self._write()
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.me, "heartbeat": time.time()}, f)
        return True

    def acquire(self) -> None:
        if not self._create_exclusive():
            held = self._read()
            if held is not None:
                reason = _stale_reason(held, self.me) if held else "it is unreadable"
                if reason is None:
                    age = time.time() - float(held.get("heartbeat", 0))
                    raise UserError(
                        f"{self.url}: another run writes to this directory (pid {held.get('pid')} on "
                        f"{held.get('host')}, heartbeat {age:.0f} s ago); wait for it, or choose another --out"
                    )
                log.warning("%s: taking over a stale lock (%s)", self.url, reason)
            self._write()
        if (self._read() or {}).get("id") != self.me["id"]:  # two takers at once: the last write wins
            raise UserError(f"{self.url}: another run took this directory at the same moment; choose another --out")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except Exception as exc:  # a passing outage of the store: the next beat tries again
                log.warning("%s: heartbeat failed (%s: %s)", self.url, type(exc).__name__, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(FileNotFoundError):
            if (self._read() or {}).get("id") == self.me["id"]:
                self.fs.rm(self.path)


def recorded_run(out: str) -> dict[str, Any] | None:
    """What ``out`` records of the run that owns it: ``run.json``, or (written before it existed)
    the method and config of its ``report.json``; None for a new directory."""
    for name in (RECORD, "report.json"):
        url = join(out, name)
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            continue
        try:
            record = json.loads(fs.cat_file(path))
            return {"method": record["method"], "config": record["config"]}
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"{url} is unreadable ({type(exc).__name__}: {exc}); delete it or choose another --out"
            ) from None
    return None


def check_owner(out: str, cfg: RunConfig, checked_by_checkpoint: bool, force: bool) -> None:
    """Refuse a run that is not the one ``out`` records (another method; other result settings,
    unless ``checked_by_checkpoint``: a resumed run's checkpoint is compared by the loop)."""
    recorded = recorded_run(out)
    if recorded is None:
        return
    problems = []
    if recorded["method"] != cfg.method.name:
        problems.append(f"method {cfg.method.name} (the directory's run: {recorded['method']})")
    if not checked_by_checkpoint:
        problems += [
            f"{k}={now} (was {saved})" for k, (saved, now) in result_changes(recorded["config"], cfg.to_dict()).items()
        ]
    if not problems:
        return
    message = f"{join(out, RECORD)}: this directory belongs to another run: {', '.join(problems)}"
    if not force:
        raise UserError(f"{message}; choose another --out, or add --force to take it over")
    log.warning("%s; taken over (--force)", message)


@contextlib.contextmanager
def own_run_dir(out: str, cfg: RunConfig, dist: DistInfo, checked_by_checkpoint: bool, force: bool) -> Iterator[None]:
    """Hold ``out`` for the body: rank 0 takes the lock and checks and writes the run record;
    every rank raises the same error if that fails (none waits in a collective for a rank that
    stopped)."""
    lock = RunLock(out) if dist.is_main else None
    error = None
    if lock is not None:
        try:
            _make_dir(out)
            lock.acquire()
            try:
                check_owner(out, cfg, checked_by_checkpoint, force)
                write_atomic(
                    join(out, RECORD), json.dumps({"method": cfg.method.name, "config": cfg.to_dict()}, indent=1)
                )
            except BaseException:
                lock.release()
                raise
        except UserError as exc:
            error = str(exc)
    if dist.is_distributed:
        shared = [error]
        tdist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise UserError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _make_dir(out: str) -> None:
    """Create a local ``out`` (object stores have no folders, and creating one there could
    create a bucket); a directory that cannot be written is one clear line."""
    if not is_local(out):
        return
    path = fsspec.core.url_to_fs(out)[1]
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", path)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
