"""``conure scale``: the same config at several world sizes, strong and weak, through the real
command (torchrun + gloo); a size that cannot run is recorded and the others finish."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, tiny_config

from conure_dist.config import load_config
from conure_dist.dist import DistInfo
from conure_dist.errors import UserError
from conure_dist.scaling.job import ScaleSpec, emit_sbatch, run_scale, scaled_overrides
from conure_dist.train.context import check_batch_split

PHASES = ["t1/train", "t1/retrain", "click/train", "click/retrain"]


def scale(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "conure_dist", "scale", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """One strong run at 1, 2 and 3 processes (3 does not divide the batch of 32) and one weak
    run at 1 and 2, on one tiny dataset."""
    tmp = tmp_path_factory.mktemp("scale")
    config = str(tiny_config(tmp, [("t1", 0.5), ("click", 0.5)]))
    out = {}
    for mode, sizes in (("strong", "1,2,3"), ("weak", "1,2")):
        folder = tmp / mode
        result = scale(
            "--config",
            config,
            "--world-sizes",
            sizes,
            "--out",
            str(folder),
            "--mode",
            mode,
            "--no-eval",
            "--warmup-steps",
            "2",
        )
        out[mode] = (result, json.loads((folder / "results.json").read_text()), folder)
    return out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_strong_scaling_records_every_phase_and_the_failed_size(scaled):
    result, summary, folder = scaled["strong"]
    assert result.returncode == 1  # a size failed: the command says so after writing everything
    assert summary["failed"] == [{"world_size": 3, "seed": 0, "error": summary["failed"][0]["error"]}]
    assert "not divisible by the world size 3; set tasks.0.batch_size=30 or 33" in summary["failed"][0]["error"]
    assert list(summary["phases"]) == PHASES
    for name in PHASES:
        one, two = summary["phases"][name]["1"], summary["phases"][name]["2"]
        assert one["global_batch"] == two["global_batch"] == 32
        assert (one["nodes"], one["ranks_per_node"], two["ranks_per_node"]) == (1, 1, 2)
        assert one["efficiency"] == 1.0
        assert two["efficiency"] == pytest.approx(two["sequences_per_s"] / 2 / one["sequences_per_s"])
        for row in (one, two):
            assert row["timed_steps"] > 0 and row["peak_memory_bytes"] > 0
            assert sum(row["seconds"].values()) == pytest.approx(row["step_seconds"])
            assert row["sequences_per_s"] == pytest.approx(32 / row["step_seconds"])
        assert one["bytes_total"] == 0 and one["seconds"]["communication"] == 0
        # DDP's buckets hold exactly what the model says; the loss exchange adds 16 bytes.
        assert two["bytes_dense"] == two["predicted_bytes_dense"] > 0
        assert two["bytes_total"] == two["bytes_dense"] + two["bytes_row_sparse"] + 16
    prov = summary["run_provenance"]
    assert prov["torch"] == torch.__version__ and prov["nodes"] == 1 and prov["threads"] == 1
    assert set(summary["metrics"]) == {"t1", "click"} and "vs_smallest" in summary["metrics"]["t1"]["2"]
    table = (folder / "table.md").read_text()
    assert "## t1/train" in table and "## Failed sizes" in table and "| 3 | 0 | exit code" in table
    assert sorted(p.name for p in (folder / "plots").iterdir()) == ["bytes.png", "step_split.png", "throughput.png"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_finished_runs_are_reused_only_with_the_same_settings(scaled):
    """A second call on the same --out reuses the finished sizes (nothing is launched: the
    summary is the same); with another setting it names the run and the key instead."""
    _, summary, folder = scaled["weak"]
    config = str(folder.parent / "c.yaml")
    spec = ScaleSpec(config, [1, 2], str(folder), mode="weak", evaluate=False, warmup_steps=2)
    again = run_scale(spec)
    assert again["phases"] == summary["phases"]
    spec.overrides = ["train.log_every=7"]
    with pytest.raises(
        UserError, match=r"ws1-seed0 holds a finished run with other settings: train.log_every=7 \(the run: 50\)"
    ):
        run_scale(spec)
    with pytest.raises(UserError, match=r"ws1-seed0 holds a finished run with other settings: train.log_every=7"):
        run_scale(spec, collect_only=True)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_weak_scaling_keeps_the_per_rank_batch_and_scales_the_learning_rate(scaled):
    result, summary, folder = scaled["weak"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary["failed"] == [] and "sqrt(W/W0)" in summary["rule"]
    for name in PHASES:
        assert summary["phases"][name]["1"]["global_batch"] == 32
        assert summary["phases"][name]["2"]["global_batch"] == 64
    config = json.loads((folder / "runs/ws2-seed0/report.json").read_text())["config"]
    assert config["tasks"][0]["batch_size"] == 64
    assert config["tasks"][0]["lr"] == pytest.approx(3e-3 * math.sqrt(2))
    assert config["train"]["validation"] is False and config["train"]["step_timing"] is True


def test_weak_overrides_and_sbatch_scripts(tmp_path):
    cfg = load_config(str(tiny_config(tmp_path, [("t1", 0.5), ("click", 0.5)])))
    assert scaled_overrides(cfg, 8, 2, "strong") == []
    weak = scaled_overrides(cfg, 8, 2, "weak")
    assert weak[:2] == ["tasks.0.batch_size=128", f"tasks.0.lr={3e-3 * 2.0!r}"]
    spec = ScaleSpec(str(tmp_path / "c.yaml"), [8, 16], str(tmp_path / "out"), launcher="srun")
    scripts = emit_sbatch(spec, cfg)
    assert [p.name for p in scripts] == ["ws8-seed0.sbatch", "ws16-seed0.sbatch"]
    text = scripts[1].read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    assert "--nnodes 2 --nproc_per_node 8" in text and "--rdzv_endpoint $HEAD_ADDR:29500" in text
    assert f"--out {tmp_path}/out/runs/ws16-seed0" in text and "train.step_timing=true" in text


def test_a_global_batch_too_small_for_the_world_says_what_to_set():
    check_batch_split(0, 32, 8, 1)
    with pytest.raises(UserError, match=r"tasks.0.batch_size=32 is a global batch: it gives less than one sequence"):
        check_batch_split(0, 32, 64, 1)
    with pytest.raises(UserError, match=r"set tasks.0.batch_size=64 or more .* e.g. 2048 to keep 32 per rank"):
        check_batch_split(0, 32, 64, 1)
    with pytest.raises(UserError, match=r"not divisible by the world size 3; set tasks.1.batch_size=30 or 33"):
        check_batch_split(1, 32, 3, 1)
    assert DistInfo(0, 16, 0, torch.device("cpu"), "nccl", 8).num_nodes == 2


def test_runs_without_validation_need_fixed_prune_ratios(tmp_path):
    from conure_dist.config import ConfigError

    config = str(tiny_config(tmp_path, [("t1", 0.5), ("click", 0.5)]))
    assert load_config(config, ["train.validation=false"]).train.validation is False
    with pytest.raises(ConfigError, match="tasks.1.prune_ratio.*needs train.validation: true"):
        load_config(config, ["train.validation=false", "tasks.1.prune_ratio=auto"])
