"""``conure experiment``: runs, aggregation over seeds, table, JSON, plots, continuation and
config errors."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml
from helpers import conure, tiny_config

from conure_dist.config import ConfigError
from conure_dist.experiment import load_experiment

TASKS = [("t1", 0.6), ("click", 0.5), ("gender", 0.5)]


def write_experiment(tmp_path, **fields):
    base = tiny_config(tmp_path, TASKS)
    spec = {"base": base.name, "overrides": ["tasks.0.epochs=2"], "methods": ["conure", "conure_minus", "finetune"],
            "seeds": [0, 1], "variants": {"main": {}, "no_click": {"tasks": ["t1", "gender"], "methods": ["conure"]}}}
    spec.update(fields)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_experiment_tables_plots_and_continuation(tmp_path):
    path = write_experiment(tmp_path)
    out = tmp_path / "out"
    conure("experiment", "--config", str(path), "--out", str(out))
    summary = json.loads((out / "results.json").read_text())
    main, no_click = summary["variants"]["main"], summary["variants"]["no_click"]
    assert list(main) == ["conure", "conure_minus", "finetune"] and list(no_click) == ["conure"]
    assert no_click["conure"]["tasks"] == ["t1", "gender"]
    # Means and stds are over the seed runs' reports.
    runs = [json.loads((out / f"runs/main/conure/seed{s}/report.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1]
    clicks = [r["matrix"][1][1] for r in runs]
    assert main["conure"]["learned"]["click"]["mean"] == pytest.approx(statistics.mean(clicks))
    assert main["conure"]["learned"]["click"]["std"] == pytest.approx(statistics.stdev(clicks))
    # Conure- comes from the same runs: the scores before each task's pruning.
    assert not (out / "runs/main/conure_minus").exists()
    minus = [r["before_prune"]["click"] for r in runs]
    assert main["conure_minus"]["learned"]["click"]["mean"] == pytest.approx(statistics.mean(minus))
    # Conure keeps T1; the table reports T1 after the last task and the storage.
    assert main["conure"]["after_last_task"]["t1"] == main["conure"]["learned"]["t1"]
    assert main["finetune"]["num_backbones"] == main["conure"]["num_backbones"] == 1
    table = (out / "table.md").read_text()
    assert "## Variant `main`" in table and "| conure_minus |" in table and "trivial reference" in table
    for name in ("main_forgetting", "main_tasks", "main_storage", "no_click_forgetting"):
        png = (out / "plots" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not (out / "plots" / "no_click_storage.png").exists()  # one method: nothing to compare
    # A second call reuses every finished run and gives the same summary.
    (out / "results.json").unlink()
    again = conure("experiment", "--config", str(path), "--out", str(out))
    assert "report exists, not run again" in again.stderr
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["variants"] == summary["variants"]
    # The reused runs count with the time they took: the total is not the few seconds of reuse.
    ran = sum(json.loads(p.read_text())["wall_seconds"] for p in (out / "runs").rglob("report.json"))
    assert rerun["wall_seconds"] >= round(ran, 1) > 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"methods": ["conure", "magic"]}, r"key 'methods': unknown method 'magic'"),
        ({"seeds": [0, "one"]}, r"key 'seeds' must be a list of int"),
        ({"variants": {"v": {"tasks": ["click", "t1"]}}}, r"key 'variants\.v\.tasks': must start with 't1'"),
        ({"variants": {"v": {"overrides": ["train.nope=1"]}}}, r"variant 'v', method 'conure'.*train\.nope"),
        ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
        ({"seeds": [0, 0]}, r"key 'seeds' must list distinct seeds"),
        ({"methods": []}, r"key 'methods' must list at least one method"),
        ({"methods": ["finetune", "finetune"]}, r"key 'methods': \['finetune'\] listed twice"),
        ({"variants": {"v": {"tasks": ["t1", "click", "click"]}}}, r"key 'variants\.v\.tasks': \['click'\] listed twice"),
        ({"variants": {"v": {"methods": ["stl", "stl"]}}}, r"key 'variants\.v\.methods': \['stl'\] listed twice"),
    ],
)
def test_experiment_config_errors_name_the_key(tmp_path, fields, message):
    path = write_experiment(tmp_path, **fields)
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(path)
    assert str(path) in str(info.value)


def test_a_finished_run_is_reused_only_for_the_same_tasks(tmp_path):
    path = write_experiment(tmp_path, methods=["conure"], seeds=[0], variants={"main": {"tasks": ["t1", "gender"]}})
    out = tmp_path / "out"
    conure("experiment", "--config", str(path), "--out", str(out))
    write_experiment(tmp_path, methods=["conure"], seeds=[0], variants={"main": {"tasks": ["t1", "click"]}})
    with pytest.raises(AssertionError, match=r"holds a run of \(method, seed, tasks\) = \('conure', 0, \['t1', 'gender'\]\)"):
        conure("experiment", "--config", str(path), "--out", str(out))
    # Same tasks, other settings: refused too, naming them; settings that do not change results are free.
    write_experiment(tmp_path, methods=["conure"], seeds=[0], variants={"main": {"tasks": ["t1", "gender"]}},
                     overrides=["tasks.0.epochs=2", "tasks.2.lr=0.05"])  # gender: tasks.1 of the run
    with pytest.raises(AssertionError, match=r"made with other settings: tasks\.1\.lr=0\.05 \(the run: 0\.003\)"):
        conure("experiment", "--config", str(path), "--out", str(out))
    write_experiment(tmp_path, methods=["conure"], seeds=[0], variants={"main": {"tasks": ["t1", "gender"]}},
                     overrides=["tasks.0.epochs=2", "train.eval_batch_size=64"])
    assert "report exists, not run again" in conure("experiment", "--config", str(path), "--out", str(out)).stderr


def test_results_name_files_inside_the_working_directory_relative_to_it(tmp_path, monkeypatch):
    from conure_dist.experiment import _shown

    (tmp_path / "configs").mkdir()
    monkeypatch.chdir(tmp_path / "configs")
    assert _shown(tmp_path / "configs" / "ml100k.yaml") == "ml100k.yaml"
    assert _shown(tmp_path / "elsewhere.yaml") == str(tmp_path / "elsewhere.yaml")
