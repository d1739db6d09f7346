"""Training curves: TensorBoard (local and uploaded from S3 runs), MLflow and W&B through one
sink interface, and the profiler over a step range. Every curve equals what log.jsonl says."""

import json
import os

import fsspec
import pytest
from helpers import cli, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conure_dist.train.sinks import make_sinks

TASKS = [("t1", 0.6), ("click", 0.5), ("gender", 0.5)]


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_writes_its_curves_to_tensorboard_and_mlflow_and_profiles_its_steps(tmp_path):
    out = tmp_path / "run"
    cli(
        "run",
        "--config",
        str(tiny_config(tmp_path, TASKS)),
        "--out",
        str(out),
        "train.log_every=2",
        "train.sinks=[tensorboard,mlflow]",
        "train.profile_steps=[1,3]",
    )
    log, curves = _log(out), _scalars(out / "tensorboard")
    steps = [e for e in log if e["event"] == "step"]
    t1_steps = [e for e in steps if e["task"] == "t1"]
    assert t1_steps and all(e["global_step"] % 2 == 0 for e in t1_steps)
    # TensorBoard stores float32: the values equal the log's up to that rounding.
    assert [s for s, _ in curves["train/t1/loss"]] == [e["global_step"] for e in t1_steps]
    assert [v for _, v in curves["train/t1/loss"]] == pytest.approx([e["loss"] for e in t1_steps], rel=1e-6)
    assert all(v > 0 for _, v in curves["train/t1/sequences_per_s"])
    assert [v for _, v in curves["train/click/lr"]] == pytest.approx([3e-3] * len(curves["train/click/lr"]))
    epochs = [e for e in log if e["event"] == "epoch" and e["task"] == "click"]
    assert [v for _, v in curves["valid/click/mrr@5"]] == pytest.approx([e["valid"]["mrr@5"] for e in epochs], rel=1e-6)
    done = {e["task"]: e for e in log if e["event"] == "task_done"}
    assert curves["test/gender/acc"][0][1] == pytest.approx(done["gender"]["test"]["acc"], rel=1e-6)
    assert [v for _, v in curves["capacity/free_fraction"]] == pytest.approx(
        [done[t]["capacity"]["free_fraction"] for t, _ in TASKS], rel=1e-6
    )
    assert {t for t in curves if t.startswith("capacity/owned_by_")} == {f"capacity/owned_by_{t}" for t, _ in TASKS}
    assert [v for _, v in curves["capacity/owned_by_click"]] == pytest.approx(
        [done[t]["capacity"]["owned_fraction"]["2"] for t in ("click", "gender")], rel=1e-6
    )
    for tag, points in curves.items():  # no curve folds back: every tag's steps strictly increase
        assert all(a < b for (a, _), (b, _) in zip(points, points[1:], strict=False)), tag

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "conure_dist"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "valid/click/mrr_at_5")
    assert [m.value for m in history] == pytest.approx([e["valid"]["mrr@5"] for e in epochs], rel=1e-12)
    for tag in ("valid/t1/mrr_at_5", "valid/click/mrr_at_5"):  # MLflow's curves never share a step either
        steps = [m.step for m in client.get_metric_history(run.info.run_id, tag)]
        assert len(steps) == len(set(steps)) == len(curves[tag.replace("_at_", "@")]), tag
    assert run.data.params["train.log_every"] == "2" and run.data.params["seed"] == "3"  # the config

    profile = out / "profile"
    trace = json.loads((profile / "trace-steps1-3-rank0.json").read_text())
    assert any("aten::" in ev.get("name", "") for ev in trace["traceEvents"])
    assert "Self CPU" in (profile / "top-ops-steps1-3-rank0.txt").read_text()


def test_tensorboard_steps_strictly_increase_per_tag_and_capacity_curves_carry_task_names(tmp_path):
    """The retrain's first validation (before any retrain step) comes at the train phase's last
    step: it goes one step later on its curve. Capacity curves are named by task."""
    (sink,) = make_sinks(["tensorboard"], str(tmp_path), {"tasks": [{"name": "t1"}, {"name": "click"}]})
    for phase, epoch, step, mrr in [
        ("train", 1, 5, 0.1),
        ("train", 2, 10, 0.2),
        ("retrain", 0, 10, 0.25),
        ("retrain", 1, 15, 0.3),
    ]:
        sink.log(
            "epoch",
            {
                "task": "t1",
                "phase": phase,
                "epoch": epoch,
                "global_step": step,
                "loss": 1.0,
                "valid": {"mrr@5": mrr, "count": 9},
            },
        )
    sink.log(
        "task_done",
        {
            "task": "click",
            "global_step": 20,
            "test": {"mrr@5": 0.4, "count": 9},
            "capacity": {"owned_fraction": {"1": 0.3, "2": 0.2}, "free_fraction": 0.5},
        },
    )
    sink.close()
    curves = _scalars(tmp_path / "tensorboard")
    assert curves["valid/t1/mrr@5"] == [
        (5, pytest.approx(0.1)),
        (10, pytest.approx(0.2)),
        (11, pytest.approx(0.25)),
        (15, pytest.approx(0.3)),
    ]
    assert [s for s, _ in curves["epoch_loss/t1/retrain"]] == [10, 15]  # its own tag: no collision
    assert curves["capacity/owned_by_t1"] == [(20, pytest.approx(0.3))]
    assert curves["capacity/owned_by_click"] == [(20, pytest.approx(0.2))]
    assert not any("owned_by_task" in tag for tag in curves)


@pytest.mark.slow
def test_an_s3_run_uploads_its_tensorboard_files(s3_endpoint, tmp_path):
    out = "s3://conure-test/curves/run"
    cli("run", "--config", str(tiny_config(tmp_path, TASKS[:2])), "--out", out, "train.log_every=2")
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    names = fs.ls("conure-test/curves/run/tensorboard")
    assert names and all(os.path.basename(n).startswith("events.out.tfevents") for n in names)
    local = tmp_path / "tb"
    local.mkdir()
    for name in names:
        fs.get_file(name, str(local / os.path.basename(name)))
    curves = _scalars(local)
    assert "valid/click/mrr@5" in curves and "capacity/free_fraction" in curves  # uploaded after the last task


@pytest.mark.slow
def test_no_sinks_writes_no_curves(tmp_path):
    out = tmp_path / "run"
    cli("run", "--config", str(tiny_config(tmp_path, TASKS[:1])), "--out", str(out), "train.sinks=[]")
    assert not (out / "tensorboard").exists() and any(e["event"] == "epoch" for e in _log(out))


@pytest.mark.slow
def test_wandb_offline_receives_the_same_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (sink,) = make_sinks(["wandb"], str(tmp_path), {"seed": 3})
    sink.log(
        "epoch", {"task": "t1", "phase": "train", "loss": 1.25, "valid": {"mrr@5": 0.5, "count": 9}, "global_step": 4}
    )
    sink.log(
        "step",
        {"task": "t1", "loss": 2.0, "lr": 0.01, "sequences_per_s": 100.0, "gpu_memory_gb": None, "global_step": 6},
    )
    assert sink.run.summary["valid/t1/mrr@5"] == 0.5 and sink.run.summary["train/t1/loss"] == 2.0
    assert sink.run.config["seed"] == 3
    sink.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
