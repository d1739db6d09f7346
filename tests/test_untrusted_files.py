"""Checkpoint files are untrusted input: a checksum in ``COMMIT`` does not vouch for a part,
since whoever can write the part can rewrite ``COMMIT`` too. Every part loads weights only;
DeepSpeed's ZeRO optimizer parts may hold exactly the few DeepSpeed classes they are made of,
and a planted pickle that would run code is refused with one line naming the file."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, conure, tiny_config

from conure_dist.checkpoint.format import COMMIT, CheckpointError, load_checkpoint, load_tensors
from conure_dist.train.deepspeed_engine import zero_state_classes


class _Planted:
    """Unpickling it would create a file: what an attacker's ``__reduce__`` could do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _planted_bytes(path: Path) -> bytes:
    """A file that ``torch.load`` with ``weights_only=False`` would run: a tensor dict with the
    planted object inside, saved by torch itself."""
    buffer = io.BytesIO()
    torch.save({"optimizer": {"state": torch.zeros(2), "payload": _Planted(str(path))}}, buffer)
    return buffer.getvalue()


def _replace_part(folder: Path, fname: str, data: bytes) -> None:
    """Rewrite one part and its sha256 in ``COMMIT``, as whoever can write the folder can."""
    (folder / fname).write_bytes(data)
    commit = json.loads((folder / COMMIT).read_text())
    commit["files"][fname] = hashlib.sha256(data).hexdigest()
    (folder / COMMIT).write_text(json.dumps(commit))


def test_a_planted_pickle_is_refused_in_one_line_naming_the_file(tmp_path):
    marker = tmp_path / "created"
    with pytest.raises(CheckpointError) as info:
        load_tensors(_planted_bytes(marker), "run/checkpoints/00003-x/optimizer-rank0.pt")
    message = str(info.value)
    assert not marker.exists()
    assert message.startswith("run/checkpoints/00003-x/optimizer-rank0.pt: refused to load")
    assert "the object os.makedirs" in message and "\n" not in message
    assert "weights_only" not in message


@pytest.mark.slow
def test_zero_optimizer_state_loads_through_its_allow_list_only():
    """DeepSpeed's classes in a ZeRO part load when allowed, and are refused when not."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    buffer = io.BytesIO()
    state = {"loss_scaler": LossScaler(1.0), "stage": ZeroStageEnum.gradients, "map": fragment_address(3, 4)}
    torch.save(state, buffer)
    loaded = load_tensors(buffer.getvalue(), "optimizer-rank0.pt", zero_state_classes())
    assert loaded["stage"] is ZeroStageEnum.gradients and loaded["map"] == fragment_address(3, 4)
    assert loaded["loss_scaler"].cur_scale == 1.0
    with pytest.raises(CheckpointError, match="refused to load: it holds the object deepspeed"):
        load_tensors(buffer.getvalue(), "optimizer-rank0.pt")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resuming_a_zero_checkpoint_with_a_planted_optimizer_part_runs_nothing(tmp_path):
    """A ZeRO-2 run checkpointed inside a phase. Its real optimizer part loads (the allow-list
    covers what DeepSpeed saves); the same checkpoint with a planted ``optimizer-rank0.pt`` and a
    recomputed ``COMMIT`` is refused by ``conure run --resume`` with one line, and the planted
    code never runs."""
    path = tiny_config(tmp_path, [("t1", 0.6), ("click", 0.5)])
    args = [
        "--config",
        str(path),
        "tasks.*.retrain_epochs=0",
        "train.max_steps_per_epoch=4",
        "train.checkpoint_every_steps=2",
        "dist.engine=deepspeed",
        "dist.zero_stage=2",
    ]
    run = tmp_path / "run"
    conure("run", "--out", str(run), *args)
    folders = sorted((run / "checkpoints").iterdir())
    mid = next(p for p in folders if p.name.endswith("click-train-e1-s2"))
    assert (mid / "optimizer-rank0.pt").exists()
    real = load_checkpoint(str(mid)).read_part("optimizer-rank0.pt", zero_state_classes())
    assert real["optimizer"]["base_optimizer_state"]["state"], "the real part loads through the allow-list"
    tampered = tmp_path / "tampered"
    shutil.copytree(run, tampered)
    for folder in sorted((tampered / "checkpoints").iterdir()):
        if folder.name > mid.name:
            shutil.rmtree(folder)

    marker = tmp_path / "created"
    _replace_part(tampered / "checkpoints" / mid.name, "optimizer-rank0.pt", _planted_bytes(marker))
    result = subprocess.run(
        [sys.executable, "-m", "conure_dist", "run", "--out", str(tampered), "--resume", *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert not marker.exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {tampered / 'checkpoints' / mid.name / 'optimizer-rank0.pt'}: refused to load: it holds the "
        "object os.makedirs, which a checkpoint never holds"
    ], result.stderr[-3000:]
    assert "weights_only" not in result.stderr and "Traceback" not in result.stderr
