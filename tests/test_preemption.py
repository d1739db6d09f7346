"""Graceful preemption with real signals to real processes: SIGTERM (and SIGUSR1) or SIGINT
stops ``conure run`` at the next step boundary after a committed checkpoint, with exit status 75
(130 after SIGINT) and one line naming the checkpoint and ``--resume``; the resumed run ends
where the uninterrupted one does (forgetting matrix and frozen-weight checksums), on one process
and on two (torchrun, gloo). ``train.checkpoint_every_minutes`` checkpoints inside phases
without changing the run."""

import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import cli, conure, tiny_config

from conure_dist.config import load_config
from conure_dist.dist import DistInfo
from conure_dist.errors import UserError
from conure_dist.train import preemption

TASKS = [("t1", 0.6), ("click", 0.5)]
# The click phase trains long enough (4 epochs) for a signal sent at its first step to land
# inside it; every step is logged, so the test sees when it has begun.
OVERRIDES = ["tasks.1.epochs=4", "train.log_every=1", "train.keep_checkpoints=100"]


def test_checkpoint_every_minutes_is_validated(tmp_path):
    path = tiny_config(tmp_path, TASKS)
    assert load_config(path, ["train.checkpoint_every_minutes=0.5"]).train.checkpoint_every_minutes == 0.5
    with pytest.raises(UserError, match=r"train.checkpoint_every_minutes.*must be > 0"):
        load_config(path, ["train.checkpoint_every_minutes=0"])


def test_nccl_ranks_agree_on_stopping_only_where_the_loop_reads_its_losses(monkeypatch):
    """On NCCL reading the agreed flags waits for the device: inside a phase the ranks agree
    every ``train.log_every`` steps only, with no collective in between; on gloo at every step."""
    calls = []

    def all_reduce(flags, op):
        calls.append(flags.tolist())
        flags.copy_(torch.tensor([int(signal.SIGTERM), 0]))  # another rank was signalled

    monkeypatch.setattr(preemption.tdist, "all_reduce", all_reduce)
    flag = preemption.StopFlag()
    nccl = DistInfo(0, 2, 0, torch.device("cpu"), "nccl")
    assert [flag.decide_at_step(nccl, step, every=5).stop for step in range(1, 11)] == [0] * 4 + [15] + [0] * 4 + [15]
    assert calls == [[0, 0], [0, 0]]
    gloo = DistInfo(0, 2, 0, torch.device("cpu"), "gloo")
    assert [flag.decide_at_step(gloo, step, every=5).stop for step in (1, 2, 3)] == [15, 15, 15]
    assert len(calls) == 5
    alone = DistInfo(0, 1, 0, torch.device("cpu"), None)
    flag.signum = int(signal.SIGUSR1)
    assert flag.decide_at_step(alone, 3, every=5).stop == signal.SIGUSR1 and len(calls) == 5


def _outcome(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    return {"matrix": report["matrix"], "checksums": report["task_checksums"]}


def _signal_at_click(args: list[str], out: Path, signum: int, nproc: int = 1):
    """Start ``conure run`` (under torchrun for nproc > 1), send ``signum`` to the launched
    process once the click phase has taken a step, and return the finished process and output."""
    process = conure("run", "--out", str(out), *args, nproc=nproc, popen=True)
    log = out / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and '"task": "click", "phase": "train"' in log.read_text()):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=300)
    return process, output


def _preempted_event(out: Path) -> dict:
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    stops = [e for e in events if e["event"] == "preempted"]
    assert len(stops) == 1
    return stops[0]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_signalled_run_checkpoints_stops_and_resumes_to_the_same_result(tmp_path):
    path = tiny_config(tmp_path, TASKS)
    args = ["--config", str(path), *OVERRIDES]
    cli("run", "--out", str(tmp_path / "clean"), *args)
    clean = _outcome(tmp_path / "clean")

    for signum, code in ((signal.SIGTERM, 75), (signal.SIGINT, 130), (signal.SIGUSR1, 75)):
        out = tmp_path / signal.Signals(signum).name
        process, output = _signal_at_click(args, out, signum)
        assert process.returncode == code, output[-3000:]
        stop = _preempted_event(out)
        assert stop["signal"] == signal.Signals(signum).name
        folder = Path(stop["checkpoint"])
        assert folder.parent == out / "checkpoints" and (folder / "COMMIT").exists()
        assert folder.name.split("-", 1)[1].startswith("click-train-e"), folder.name  # inside the phase
        assert sorted((out / "checkpoints").iterdir())[-1] == folder
        hint = [line for line in output.splitlines() if line.startswith("conure: ")]
        assert hint == [
            f"conure: stopped by {signal.Signals(signum).name} after checkpoint {folder}; "
            "continue with the same command and --resume"
        ]
        assert "Traceback" not in output and not (out / "RUN.lock").exists()
        assert not (out / "report.json").exists()
        cli("run", "--out", str(out), "--resume", *args)
        assert _outcome(out) == clean, signal.Signals(signum).name

    timed = tmp_path / "timed"
    cli("run", "--out", str(timed), *args, "train.checkpoint_every_minutes=0.0002")
    assert _outcome(timed) == clean
    inside = [p.name for p in (timed / "checkpoints").iterdir() if re.search(r"-e[0-9]+-s[0-9]+$", p.name)]
    assert len(inside) >= 2, inside


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_sigtermed_two_process_run_resumed_equals_the_uninterrupted_one(tmp_path):
    """SIGTERM to torchrun, as Slurm sends it: torchrun passes it to both workers, which agree
    on one step, checkpoint it and stop; resumed on two processes, the run ends bit for bit
    where the uninterrupted two-process run does."""
    path = tiny_config(tmp_path, TASKS)
    args = ["--config", str(path), *OVERRIDES]
    conure("run", "--out", str(tmp_path / "clean"), *args, nproc=2)
    out = tmp_path / "term"
    process, output = _signal_at_click(args, out, signal.SIGTERM, nproc=2)
    assert process.returncode != 0, output[-3000:]
    stop = _preempted_event(out)
    folder = Path(stop["checkpoint"])
    assert (folder / "COMMIT").exists() and (folder / "optimizer.pt").exists(), folder
    assert json.loads((folder / "meta.json").read_text())["world_size"] == 2
    assert output.count("conure: stopped by SIGTERM after checkpoint") == 2, output[-3000:]  # each worker
    conure("run", "--out", str(out), "--resume", *args, nproc=2)
    assert _outcome(out) == _outcome(tmp_path / "clean")
