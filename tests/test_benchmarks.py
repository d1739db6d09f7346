"""benchmarks/run.py on a tiny model: every reported key is there and the invariants behind the
figures hold (no timing is asserted)."""

import json
import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

KEYS = [
    "device",
    "t1_seq_per_s",
    "t1_seq_per_s_plain",
    "later_seq_per_s",
    "later_seq_per_s_plain",
    "eval_users_per_s",
    "peak_mem_gb",
    "loader_seq_per_s_per_core",
    "t1_comm_bytes_per_step",
    "t1_dense_allreduce_bytes",
]


def test_benchmark_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable,
            "benchmarks/run.py",
            "--device",
            "cpu",
            "--items",
            "3000",
            "--channels",
            "16",
            "--t1-batch",
            "8",
            "--later-batch",
            "32",
            "--steps",
            "1",
            "--loader-sequences",
            "3000",
            "--comm-items",
            "20000",
            "--memory-items",
            "3000",
            "--memory-channels",
            "64",
            "--json",
            str(out),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    assert set(KEYS) <= report.keys()
    assert all(report[k] > 0 for k in KEYS if k != "device")
    assert report["sizes"]["items"] == 3000 and report["loader_sequences"] == 2400  # the 80% train split
    # 20K-item tables at a global batch of 32: the 20% shared negatives plus the touched rows.
    assert report["t1_dense_allreduce_bytes"] == (2 * 20000 * 64 + 20000) * 4
    assert 0.1 < report["t1_comm_fraction_of_dense"] < 0.25  # negatives alone: 20% of half the bytes
    assert report["t1_step_extra_rss_gb_fast"] > 0 and report["t1_step_extra_rss_gb_plain"] > 0
    assert report["t1_memory_probe"] == {"items": 3000, "channels": 64, "t1_batch": 32}
