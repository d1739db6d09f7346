"""Altered frozen weights are refused even when ``COMMIT`` was recomputed: ``eval`` (every
command loading a trained run) and ``--resume`` recompute each finished task's checksum and
compare it with the one recorded when the task finished, and that record with the run's other
records (older checkpoints, the report). With ``CONURE_CHECKPOINT_KEY``, ``COMMIT`` is signed.
A run whose newest ``COMMIT`` was deleted says loudly that an older checkpoint is used, and the
audit says how many tasks it covers and fails when the run's records show more finished."""

import hashlib
import io
import json
import os
import shutil

import pytest
import torch

from conure_dist.checkpoint.format import COMMIT, KEY_ENV, CheckpointError, read_commit, write_commit
from conure_dist.cli import main
from conure_dist.config import config_from_dict
from conure_dist.dist import DistInfo

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)


def _newest(run):
    return sorted(p for p in (run / "checkpoints").iterdir() if (p / COMMIT).exists())[-1]


def _rewrite(folder, fname: str, data: bytes) -> None:
    """Replace a part and recompute its sha256 in COMMIT, as whoever can write the folder can."""
    (folder / fname).write_bytes(data)
    commit = json.loads((folder / COMMIT).read_text())
    commit["files"][fname] = hashlib.sha256(data).hexdigest()
    (folder / COMMIT).write_text(json.dumps(commit))


def _alter_t1(folder) -> None:
    """Add 0.5 to a conv weight that T1 owns (frozen since T1 finished), COMMIT recomputed."""
    model = torch.load(folder / "model.pt", weights_only=True)
    owners = torch.load(folder / "ownership.pt", weights_only=True)
    name = next(n for n, o in owners.items() if (o == 1).any())
    position = (owners[name] == 1).nonzero()[0].tolist()
    model[name][tuple(position)] += 0.5
    buffer = io.BytesIO()
    torch.save(model, buffer)
    _rewrite(folder, "model.pt", buffer.getvalue())


@pytest.fixture
def run(tiny_trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_trained_run, copy)
    return copy


@pytest.mark.slow
def test_altered_frozen_weights_are_refused_by_eval_and_resume(run, capsys):
    newest = _newest(run)
    _alter_t1(newest)
    assert main(["eval", "--ckpt", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{newest}: the frozen weights of finished task(s) t1 do not match the checksums recorded" in err
    from conure_dist.train.loop import ContinualLoop

    cfg = config_from_dict(json.loads((newest / "meta.json").read_text())["config"], [])
    with pytest.raises(CheckpointError, match="frozen weights of finished task\\(s\\) t1 do not match"):
        ContinualLoop(cfg, str(run), CPU, resume=True)

    # The checksum in meta.json rewritten to match as well: the run's other records disagree.
    meta = json.loads((newest / "meta.json").read_text())
    from conure_dist.checkpoint.format import load_checkpoint
    from conure_dist.continual.audit import audit_checkpoint

    recomputed = {r.task: r.recomputed for r in audit_checkpoint(load_checkpoint(str(newest)))}
    meta["state"]["task_checksums"]["t1"] = recomputed["t1"]
    _rewrite(newest, "meta.json", json.dumps(meta).encode())
    assert main(["eval", "--ckpt", str(run)]) == 2
    err = capsys.readouterr().err
    assert "the recorded checksum of finished task(s) t1 differs from" in err
    assert main(["audit", "--ckpt", str(run)]) == 0  # the audit alone sees a consistent checkpoint


def test_a_signed_commit_cannot_be_recomputed_without_the_key(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    fs, folder = LocalFileSystem(), str(tmp_path)
    monkeypatch.setenv(KEY_ENV, "secret")
    write_commit(fs, folder, {"model.pt": "a" * 64})
    assert read_commit(fs, folder) == {"model.pt": "a" * 64}
    commit = json.loads((tmp_path / COMMIT).read_text())
    commit["files"]["model.pt"] = "b" * 64  # a part rewritten, its digest recomputed
    (tmp_path / COMMIT).write_text(json.dumps(commit))
    with pytest.raises(CheckpointError, match="has a signature that does not match with CONURE_CHECKPOINT_KEY"):
        read_commit(fs, folder)
    del commit["hmac"]
    (tmp_path / COMMIT).write_text(json.dumps(commit))
    with pytest.raises(CheckpointError, match="is not signed with CONURE_CHECKPOINT_KEY"):
        read_commit(fs, folder)
    monkeypatch.delenv(KEY_ENV)
    assert read_commit(fs, folder) == {"model.pt": "b" * 64}


@pytest.mark.slow
def test_a_deleted_newest_commit_is_said_and_the_audit_counts_the_tasks(run, capsys, caplog):
    assert main(["audit", "--ckpt", str(run)]) == 0
    assert "audit passed: 3 of 3 tasks checked" in capsys.readouterr().out
    newest = _newest(run)
    (newest / COMMIT).unlink()
    assert main(["audit", "--ckpt", str(run)]) == 1
    out = capsys.readouterr().out
    assert "absent from this checkpoint: gender" in out and "audit FAILED: 2 of 3 tasks checked" in out
    assert f"USING AN OLDER CHECKPOINT: {_newest(run)}; the newer {newest.name} hold no COMMIT" in caplog.text


def test_leftover_uncommitted_folders_are_removed_at_the_next_commit(tmp_path):
    from conure_dist.checkpoint.checkpointer import Checkpointer

    checkpointer = Checkpointer(str(tmp_path), CPU, keep=5)
    parts = {"model.pt": {}, "ownership.pt": {}, "meta.json": {"state": {}}}
    checkpointer.write(1, "a", parts)
    (tmp_path / "checkpoints" / "00002-b").mkdir()  # a write a kill cut short
    (tmp_path / "checkpoints" / "00002-b" / "model.pt").write_bytes(b"partial")
    checkpointer.write(3, "c", parts)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["00001-a", "00003-c"]


def test_a_remote_runs_tensorboard_copy_is_removed(tmp_path):
    from conure_dist.train.sinks import TensorBoardSink

    sink = TensorBoardSink("memory://conure-tb-test/run", ["t1"])
    local = sink.dir
    sink.log("step", {"task": "t1", "phase": "train", "global_step": 1, "loss": 1.0})
    sink.close()
    assert not os.path.exists(local)
