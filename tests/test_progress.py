"""Progress under a batch job: no terminal, so no carriage-return redraws in the log, but a line
every ``LOG_INTERVAL_S`` seconds."""

import logging
import os
import subprocess
import sys

import pytest
from helpers import REPO, tiny_config

from conure_dist.train import progress


def test_without_a_terminal_progress_is_periodic_log_lines(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    caplog.set_level(logging.INFO)
    shown = progress.show_progress(range(5), total=8, initial=3, desc="click train 1/2", enabled=True)
    assert isinstance(shown, progress.LogLines)  # pytest's stderr is no terminal
    for _ in shown:
        shown.set_postfix(loss="0.5000")
    lines = [r.getMessage() for r in caplog.records if r.name == progress.__name__]
    assert lines == [f"click train 1/2: step {n}/8, loss 0.5000" for n in range(4, 9)]
    assert list(progress.show_progress(range(3), 3, 0, "x", enabled=False)) == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_redirected_run_writes_no_carriage_returns(tmp_path):
    """``conure run ... > job.log 2>&1``, as a batch job runs it (read as bytes: text mode would
    turn carriage returns into newlines)."""
    path = tiny_config(tmp_path, [("t1", 0.6), ("click", 0.5)], train={"progress": True, "keep_checkpoints": 5})
    log = tmp_path / "job.log"
    with open(log, "wb") as out:
        subprocess.run(
            [sys.executable, "-m", "conure_dist", "run", "--config", str(path), "--out", str(tmp_path / "run")],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=600,
        )
    written = log.read_bytes()
    assert b"after task" in written and b"\r" not in written
