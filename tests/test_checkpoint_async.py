"""Asynchronous checkpoint writes: ``save`` returns after a snapshot, a writer thread writes.

The snapshot holds the state as it was when ``save`` was called, whatever training changes next;
a failed write is raised by ``wait()`` (or the next ``save``); a kill mid-write, a rank that never
finishes, or a part of the wrong size never produce a commit, so ``latest_valid()`` keeps the
previous checkpoint; and old checkpoints go only after the new one is committed. Two gloo ranks
commit only once both ranks' parts are written, while the training thread runs collectives.

Writes are held back or failed by the filesystems below (``gatedmem://`` in memory,
``gatedfile://`` on local disk): a write of a file whose path ends with a ``HOLDS`` key waits for
its event, one that ends with a ``FAILURES`` key raises ``OSError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from conure_dist.checkpoint.checkpointer import Checkpointer
from conure_dist.checkpoint.format import COMMIT, CheckpointError, load_checkpoint
from conure_dist.dist import DistInfo

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
HOLDS: dict[str, tuple[threading.Event, threading.Event]] = {}
"""Path suffix -> (the write arrived, the write may go on)."""
FAILURES: dict[str, str] = {}
"""Path suffix -> the message of the OSError its write raises."""


class _Controlled:
    """Writes wait for ``HOLDS`` or fail by ``FAILURES``; everything else as the base class."""

    def _open(self, path, mode="rb", *args, **kwargs):
        if "w" in mode:
            for suffix, (arrived, release) in list(HOLDS.items()):
                if path.endswith(suffix):
                    arrived.set()
                    assert release.wait(60), f"{suffix} was never released"
            for suffix, message in FAILURES.items():
                if path.endswith(suffix):
                    raise OSError(message)
        return super()._open(path, mode, *args, **kwargs)


class GatedMemoryFileSystem(_Controlled, MemoryFileSystem):
    protocol = "gatedmem"
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("gatedmem://"))


class GatedLocalFileSystem(_Controlled, LocalFileSystem):
    protocol = "gatedfile"


fsspec.register_implementation("gatedmem", GatedMemoryFileSystem, clobber=True)
fsspec.register_implementation("gatedfile", GatedLocalFileSystem, clobber=True)


def hold(suffix: str) -> tuple[threading.Event, threading.Event]:
    HOLDS[suffix] = events = (threading.Event(), threading.Event())
    return events


@pytest.fixture(autouse=True)
def _no_leftover_controls():
    yield
    for _, release in HOLDS.values():
        release.set()
    HOLDS.clear()
    FAILURES.clear()


@pytest.fixture
def memory_root() -> str:
    return f"gatedmem://{uuid.uuid4().hex}"


def _parts(index: int, value: float) -> dict:
    return {
        "model.pt": {"w": torch.full((3,), value)},
        "ownership.pt": {"w": torch.zeros(3, dtype=torch.uint8)},
        "meta.json": {"index": index},
        "phase.pt": {"best": {"w": torch.full((3,), value)}},
    }


def _names(ckpt: Checkpointer) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in ckpt.committed()]


def test_state_changed_right_after_save_is_not_in_the_checkpoint(memory_root):
    """Parameters, tied weights and Adam moments changed while the write is held back: the
    checkpoint holds them as they were at ``save``, tied weights still one tensor."""
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    model[1].weight = model[0].weight  # tied: two names, one tensor
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.arange(10)).square().sum().backward()
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    ckpt = Checkpointer(memory_root, CPU, async_writes=True)
    # The writer serializes a part just before writing it: held at the first part (a rank part),
    # it has serialized none of the model's and optimizer's yet.
    arrived, release = hold("00001-t1-s1/first.pt")
    path = ckpt.write(
        1,
        "t1-s1",
        {"model.pt": model, "optimizer.pt": optimizer, "ownership.pt": {}, "meta.json": {"step": 1}},
        {"first.pt": {}},
    )
    assert arrived.wait(10)
    for _ in range(3):  # training goes on while the writer waits
        optimizer.zero_grad()
        model(torch.arange(10)).square().sum().backward()
        optimizer.step()
    assert not torch.equal(model[0].weight, before["0.weight"])
    release.set()
    ckpt.wait()
    saved = load_checkpoint(path, fs=ckpt.fs)
    assert saved.model.keys() == before.keys()
    assert all(torch.equal(saved.model[k], v) for k, v in before.items())
    assert saved.model["0.weight"].data_ptr() == saved.model["1.weight"].data_ptr()
    saved_moments = saved.read_part("optimizer.pt")["state"][0]["exp_avg"]
    assert torch.equal(saved_moments, moments)
    assert not torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert saved.meta == {"format_version": 1, "step": 1}


def test_a_failed_write_is_raised_by_wait_or_the_next_save(memory_root):
    ckpt = Checkpointer(memory_root, CPU, async_writes=True)
    ckpt.write(1, "t1-s1", _parts(1, 1.0))
    ckpt.wait()
    FAILURES["/phase.pt"] = "no space left on device"
    ckpt.write(2, "t1-s2", _parts(2, 2.0))  # returns: the failure is the writer's
    with pytest.raises(
        CheckpointError,
        match=r"writing the checkpoint gatedmem://.*/00002-t1-s2 failed: "
        r"OSError: no space left on device",
    ) as raised:
        ckpt.wait()
    assert isinstance(raised.value.__cause__, OSError)
    ckpt.wait()  # raised once
    assert _names(ckpt) == ["00001-t1-s1"] and ckpt.latest_valid().meta["index"] == 1
    ckpt.write(3, "t1-s3", _parts(3, 3.0))  # the next save raises what the previous write left
    with pytest.raises(CheckpointError, match="00003-t1-s3 failed: OSError: no space"):
        ckpt.write(4, "t1-s4", _parts(4, 4.0))
    FAILURES.clear()
    ckpt.write(5, "t1-s5", _parts(5, 5.0))
    ckpt.wait()
    assert _names(ckpt) == ["00001-t1-s1", "00005-t1-s5"]
    assert torch.equal(ckpt.latest_valid().model["w"], torch.full((3,), 5.0))


def test_old_checkpoints_go_only_after_the_new_commit_and_one_write_is_in_flight(memory_root):
    ckpt = Checkpointer(memory_root, CPU, keep=1, async_writes=True)
    ckpt.write(1, "t1-s1", _parts(1, 1.0))
    ckpt.wait()
    arrived, release = hold("00002-t1-s2/phase.pt")
    ckpt.write(2, "t1-s2", _parts(2, 2.0))
    assert arrived.wait(10)
    assert _names(ckpt) == ["00001-t1-s1"]
    # A third save waits for the second write before it takes its snapshot.
    third = threading.Thread(target=ckpt.write, args=(3, "t1-s3", _parts(3, 3.0)))
    third.start()
    time.sleep(0.3)
    assert third.is_alive() and not ckpt.fs.exists(f"{ckpt.fs_root}/00003-t1-s3")
    assert _names(ckpt) == ["00001-t1-s1"], "the old checkpoint stays until the new one is committed"
    release.set()
    third.join(10)
    ckpt.wait()
    assert _names(ckpt) == ["00003-t1-s3"]
    assert ckpt.latest_valid().meta["index"] == 3


def test_in_memory_files_hold_only_the_parts_and_the_marker():
    root = f"memory://{uuid.uuid4().hex}/run"
    ckpt = Checkpointer(root, CPU, keep=2, async_writes=True)
    for index in range(1, 4):
        ckpt.write(index, f"t1-s{index}", _parts(index, float(index)))
    ckpt.wait()
    assert _names(ckpt) == ["00002-t1-s2", "00003-t1-s3"]
    newest = load_checkpoint(f"{root}/checkpoints/00003-t1-s3")
    assert torch.equal(newest.read_part("phase.pt")["best"]["w"], torch.full((3,), 3.0))
    files = {p.rsplit("/", 1)[-1] for p in ckpt.fs.ls(newest.path, detail=False)}
    assert files == {"model.pt", "ownership.pt", "meta.json", "phase.pt", COMMIT}
    commit = json.loads(ckpt.fs.cat_file(f"{newest.path}/{COMMIT}"))
    assert set(commit["files"]) == files - {COMMIT}


def test_rank_zero_commits_only_a_complete_set_of_parts(memory_root):
    """Rank 0 without a process group: another rank's manifest is missing (a clear error after
    the timeout, nothing committed), lists a part of another size, or is right."""
    rank0 = DistInfo(0, 2, 0, torch.device("cpu"), None)
    ckpt = Checkpointer(memory_root, rank0, async_writes=True, commit_timeout_s=0.3)
    start = time.perf_counter()
    ckpt.write(1, "t1-s1", _parts(1, 1.0))
    with pytest.raises(
        CheckpointError,
        match=r"rank\(s\) \[1\] did not finish their parts of gatedmem://.*"
        r"/00001-t1-s1 within 0.3 s \(no DONE-rank1.json\)",
    ):
        ckpt.wait()
    assert 0.3 <= time.perf_counter() - start < 5
    assert ckpt.latest_valid() is None
    fs = ckpt.fs
    for index, size in ((2, 5), (3, 3)):
        folder = f"{ckpt.fs_root}/0000{index}-t1-s{index}"
        fs.pipe_file(f"{folder}/optimizer-rank1.pt", b"abc")
        manifest = {"files": {"optimizer-rank1.pt": {"sha256": _sha(b"abc"), "size": size}}}
        fs.pipe_file(f"{folder}/DONE-rank1.json", json.dumps(manifest).encode())
        ckpt.write(index, f"t1-s{index}", _parts(index, float(index)))
        if size == 5:
            with pytest.raises(
                CheckpointError,
                match=r"00002-t1-s2/optimizer-rank1.pt of rank 1: 3 bytes, its "
                r"manifest says 5",
            ):
                ckpt.wait()
    ckpt.wait()
    assert _names(ckpt) == ["00003-t1-s3"]
    committed = ckpt.latest_valid()
    assert set(committed.digests) == {"model.pt", "ownership.pt", "meta.json", "phase.pt", "optimizer-rank1.pt"}
    assert committed.digests["optimizer-rank1.pt"] == _sha(b"abc")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- a kill mid-write ----------------------------------------------------------------------------
def _write_then_get_killed(root: str, marker: str) -> None:
    """Commit checkpoint 1, start checkpoint 2 and signal once its writer is stuck in a write."""
    ckpt = Checkpointer(f"gatedfile://{root}", CPU, keep=1, async_writes=True)
    ckpt.write(1, "t1-s1", _parts(1, 1.0))
    ckpt.wait()
    arrived, _ = hold("00002-t1-s2/phase.pt")
    ckpt.write(2, "t1-s2", _parts(2, 2.0))
    assert arrived.wait(20)
    Path(marker).write_text("writing")
    time.sleep(60)  # killed before this ends


@pytest.mark.slow
def test_a_kill_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    marker = tmp_path / "writing"
    child = mp.get_context("spawn").Process(target=_write_then_get_killed, args=(str(tmp_path), str(marker)))
    child.start()
    try:
        deadline = time.monotonic() + 25
        while not marker.exists() and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the writer never got stuck (exit code {child.exitcode})"
    finally:
        child.kill()  # SIGKILL: no cleanup of any kind
        child.join(10)
    assert child.exitcode == -9
    torn = tmp_path / "checkpoints" / "00002-t1-s2"
    assert (torn / "model.pt").exists() and not (torn / COMMIT).exists()
    ckpt = Checkpointer(str(tmp_path), CPU, keep=1, async_writes=True)
    assert _names(ckpt) == ["00001-t1-s1"] and ckpt.last_index() == 2
    previous = ckpt.latest_valid()
    assert previous.meta["index"] == 1 and torch.equal(previous.model["w"], torch.ones(3))


# -- two gloo ranks ------------------------------------------------------------------------------
def _two_ranks(rank: int, root: str, init: str) -> None:
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        dist = DistInfo(rank, 2, rank, torch.device("cpu"), "gloo")
        ckpt = Checkpointer(f"gatedfile://{root}", dist, keep=1, async_writes=True, commit_timeout_s=60)
        observed = {}
        for index in (1, 2):
            release = None
            if index == 2 and rank == 1:
                _, release = hold("00002-t1-s2/optimizer-rank1.pt")
            own = {f"optimizer-rank{rank}.pt": {"m": torch.full((4,), 10.0 * index + rank)}}
            ckpt.write(index, f"t1-s{index}", _parts(index, float(index)) if rank == 0 else {}, own)
            total = torch.tensor([float(rank + 1)])
            for _ in range(20):  # collectives on the training thread while the writers work
                tdist.all_reduce(total)
            observed[f"all_reduce_{index}"] = total.item()
            if index == 2 and rank == 0:
                folder = Path(root) / "checkpoints" / "00002-t1-s2"
                deadline = time.monotonic() + 20
                while not (folder / "optimizer-rank0.pt").exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(0.5)  # rank 0's writer is done with its own parts by now
                observed["rank1_part_before_release"] = (folder / "optimizer-rank1.pt").exists()
                observed["commit_before_release"] = (folder / COMMIT).exists()
                observed["committed_before_release"] = _names(ckpt)
            tdist.barrier()
            if release is not None:
                release.set()
            ckpt.wait()
        tdist.barrier()
        if rank == 0:
            newest = ckpt.latest_valid()
            observed["committed"] = _names(ckpt)
            observed["files"] = sorted(newest.digests)
            observed["values"] = {r: newest.read_part(f"optimizer-rank{r}.pt")["m"].tolist() for r in (0, 1)}
            (Path(root) / "observed.json").write_text(json.dumps(observed))
    finally:
        tdist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_commit_only_after_both_ranks_parts(tmp_path):
    mp.spawn(_two_ranks, args=(str(tmp_path), f"file://{tmp_path / 'store'}"), nprocs=2, join=True)
    observed = json.loads((tmp_path / "observed.json").read_text())
    assert observed["all_reduce_1"] == observed["all_reduce_2"] == 3.0 * 2**19
    assert observed["rank1_part_before_release"] is False
    assert observed["commit_before_release"] is False
    assert observed["committed_before_release"] == ["00001-t1-s1"]
    assert observed["committed"] == ["00002-t1-s2"]
    assert observed["files"] == [
        "meta.json",
        "model.pt",
        "optimizer-rank0.pt",
        "optimizer-rank1.pt",
        "ownership.pt",
        "phase.pt",
    ]
    assert observed["values"] == {"0": [20.0] * 4, "1": [21.0] * 4}
    assert os.path.exists(tmp_path / "checkpoints" / "00002-t1-s2" / "DONE-rank1.json")
