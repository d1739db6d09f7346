"""benchmarks/gpu_suite.sh's table (benchmarks/suite_table.py) and its CPU smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import suite_table  # noqa: E402

TARGETS_JSON = {
    "device": "cuda",
    "device_name": "NVIDIA H100 80GB HBM3",
    "precision": "bf16",
    "sizes": {"batch": 256, "seq_len": 100, "channels": 256, "items": 646000, "later_items": 646000},
    "t1_step": {"seq_per_s": 16_000.0, "peak_memory_gb": 30.5, "l2_folded": True},
    "later_step": {"error": "RuntimeError: CUDA out of memory"},
    "eval": {"users_per_s": 310_000.0, "fused_ranks": False},
}


def _write(out, name, data):
    (out / f"{name}.json").write_text(json.dumps(data))


def test_the_table_reads_each_steps_figure_and_the_cards_prediction(tmp_path):
    _write(tmp_path, "targets", TARGETS_JSON)
    _write(tmp_path, "phases", [{"task": "t1", "phase": "train", "loop_sequences_per_s": 14_000.0}])
    _write(tmp_path, "stall", {"results": [{"async": {"save_s": 0.4}}]})
    report = suite_table.table(str(tmp_path))
    rows = {r["target"]: r for r in report["rows"]}
    assert report["card"] == "NVIDIA H100 SXM"  # the step model's card for the device that ran
    assert rows["T1 sequences/s"]["measured"] == 16_000 and rows["T1 sequences/s"]["met"] is True
    assert rows["T1 peak memory GB"]["met"] is False
    assert rows["later task sequences/s"]["measured"] is None and rows["later task sequences/s"]["met"] is None
    assert rows["end to end / benchmark (T1 loop)"]["measured"] == pytest.approx(14_000 / 16_000)
    assert rows["end to end / benchmark (T1 loop)"]["met"] is False
    assert rows["phase-end checkpoint stall s"]["met"] is True
    assert rows["evaluation users/s"]["met"] is True
    predicted = rows["T1 sequences/s"]["predicted"]
    assert predicted == pytest.approx(
        suite_table.step_model.predict(suite_table.step_model.Sizes(), suite_table.step_model.CARDS["h100"])[
            "t1_seq_per_s"
        ]
    )
    text = suite_table.render(report)
    assert len(text.splitlines()) == 2 + len(suite_table.TARGETS) and " - " in text  # the failed section


def test_missing_steps_leave_dashes(tmp_path):
    report = suite_table.table(str(tmp_path))
    assert all(r["measured"] is None and r["met"] is None for r in report["rows"])


@pytest.mark.slow
def test_the_suite_runs_on_cpu_and_prints_its_table(tmp_path):
    env = {**os.environ, "SUITE_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    table = json.loads((tmp_path / "table.json").read_text())
    rows = {r["target"]: r for r in table["rows"]}
    for name in ("T1 sequences/s", "later task sequences/s", "evaluation users/s"):
        assert rows[name]["measured"] > 0 and rows[name]["predicted"] > 0, rows[name]
    assert rows["phase-end checkpoint stall s"]["measured"] > 0
    assert rows["end to end / benchmark (T1 loop)"]["measured"] > 0
    assert table["probe"] == {"softmax": True, "rank": True}
    assert "T1 sequences/s" in result.stdout
