"""A run directory belongs to one run: a heartbeat lock refuses a second run while the first
lives (and is taken over once its holder is gone), and ``run.json`` refuses a run of another
method or with other result settings unless ``--force``. Reports and records are written
atomically, with the usual file mode; an unwritable ``--out`` is one line."""

import json
import os
import socket
import stat
import time

import pytest
from helpers import conure, tiny_config

from conure_dist import rundir
from conure_dist.cli import main
from conure_dist.errors import UserError
from conure_dist.report import write_report

TASKS = [("t1", 0.6), ("click", 0.5)]


def _plant_lock(out, **fields) -> None:
    out.mkdir(parents=True, exist_ok=True)
    holder = {"host": "elsewhere", "pid": 1, "slurm_job": None, "id": "x", "started": 0.0, "heartbeat": time.time()}
    (out / rundir.LOCK).write_text(json.dumps({**holder, **fields}))


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid -= 1


def test_a_live_lock_refuses_a_stale_one_is_taken_over_and_release_removes_it(tmp_path, caplog):
    out = tmp_path / "run"
    _plant_lock(out)  # another host, fresh heartbeat: alive
    with pytest.raises(UserError, match=r"another run writes to this directory \(pid 1 on elsewhere, heartbeat 0 s"):
        rundir.RunLock(str(out)).acquire()
    for stale, reason in (
        ({"heartbeat": time.time() - rundir.STALE_AFTER_S - 1}, "last heartbeat is 30"),
        ({"host": socket.gethostname(), "pid": _dead_pid()}, "on this host is gone"),
    ):
        _plant_lock(out, **stale)
        lock = rundir.RunLock(str(out))
        lock.acquire()
        assert reason in caplog.text
        held = json.loads((out / rundir.LOCK).read_text())
        assert (held["pid"], held["id"]) == (os.getpid(), lock.me["id"])
        lock.release()
        assert not (out / rundir.LOCK).exists()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _plant_lock(out, slurm_job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    lock = rundir.RunLock(str(out))
    lock.acquire()
    lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    _plant_lock(out, slurm_job="777")
    with pytest.raises(UserError, match="another run writes to this directory"):
        rundir.RunLock(str(out)).acquire()


def test_the_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    lock = rundir.RunLock(str(tmp_path))
    lock.acquire()
    first = json.loads((tmp_path / rundir.LOCK).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / rundir.LOCK).read_text())["heartbeat"] > first
    lock.release()


def test_report_is_written_atomically_with_the_usual_mode(tmp_path):
    write_report({"matrix": [[0.5]]}, str(tmp_path))
    path = tmp_path / "report.json"
    assert json.loads(path.read_text()) == {"matrix": [[0.5]]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~rundir_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no partial file left


def rundir_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    path = tiny_config(tmp_path, TASKS[:1])
    assert main(["run", "--config", str(path), "--out", "/sys/conure-unwritable"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out /sys/conure-unwritable: cannot write there (") and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_one_run_owns_a_directory(tmp_path, capsys):
    """A second run into a live run's --out is refused and touches nothing; the first finishes,
    releasing the lock. A baseline into that Conure directory, and a Conure run with another
    seed, are refused unless --force; a truncated report is an error naming the file."""
    path = tiny_config(tmp_path, TASKS)
    args = ["--config", str(path), "tasks.*.epochs=3", "tasks.*.retrain_epochs=2"]
    out = tmp_path / "run"
    first = conure("run", "--out", str(out), *args, popen=True)
    deadline = time.monotonic() + 120
    while not (out / rundir.LOCK).exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.stdout else ""
        time.sleep(0.05)
    assert main(["run", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert f"another run writes to this directory (pid {first.pid} on {socket.gethostname()}" in err
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output
    assert not (out / rundir.LOCK).exists()
    starts = [line for line in (out / "log.jsonl").read_text().splitlines() if '"event": "start"' in line]
    assert len(starts) == 1
    report = (out / "report.json").read_text()
    assert json.loads((out / rundir.RECORD).read_text())["method"] == "conure"

    assert main(["run", "--out", str(out), *args, "method.name=finetune"]) == 2
    err = capsys.readouterr().err
    assert "this directory belongs to another run: method finetune (the directory's run: conure)" in err
    assert "add --force" in err
    assert main(["run", "--out", str(out), "--resume", *args, "seed=4"]) == 2
    assert "differ from the checkpoint's: seed=4 (was 3)" in capsys.readouterr().err
    assert (out / "report.json").read_text() == report and not (out / rundir.LOCK).exists()

    # A Conure run into a baseline's directory, recorded by run.json.
    other = tmp_path / "baseline"
    other.mkdir()
    (other / rundir.RECORD).write_text(json.dumps({"method": "finetune", "config": json.loads(report)["config"]}))
    assert main(["run", "--out", str(other), *args]) == 2
    assert "method conure (the directory's run: finetune)" in capsys.readouterr().err

    # A report cut short by a kill (written before reports were atomic) names itself.
    (other / rundir.RECORD).unlink()
    (other / "report.json").write_text("")
    assert main(["run", "--out", str(other), *args]) == 2
    assert f"{other / 'report.json'} is unreadable" in capsys.readouterr().err


def test_a_truncated_report_is_an_error_naming_the_file(tmp_path):
    from conure_dist.report import read_report

    for text in ("", '{"matrix": [[0.5'):
        (tmp_path / "report.json").write_text(text)
        with pytest.raises(UserError, match=f"^{tmp_path / 'report.json'} is not a complete report"):
            read_report(str(tmp_path / "report.json"))


def test_an_experiment_reuses_a_run_that_differs_only_in_how_it_ran(tmp_path):
    """Reuse ignores the settings that do not change results (``rundir.NOT_RESULTS``: threads,
    logging, checkpoints, compilation), and refuses one that does."""
    from conure_dist.config import load_config
    from conure_dist.experiment.harness import _check_reused

    cfg = load_config(tiny_config(tmp_path, [("t1", 0.5)]))
    ran = load_config(tiny_config(tmp_path, [("t1", 0.5)]), ["dist.compile=never", "train.num_threads=1"])
    report = {"method": cfg.method.name, "seed": cfg.seed, "tasks": [{"name": "t1"}], "config": ran.to_dict()}
    _check_reused(report, cfg, "r/report.json")
    report["config"]["tasks"][0]["lr"] = 0.5
    with pytest.raises(UserError, match=r"r/report.json holds a run made with other settings: tasks.0.lr="):
        _check_reused(report, cfg, "r/report.json")
