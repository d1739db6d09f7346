"""``conure experiment``: runs, aggregation over seeds, table, JSON, plots, continuation and
config errors."""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cli, tiny_config

from conure_dist.cli import main
from conure_dist.config import ConfigError
from conure_dist.experiment.spec import load_experiment

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "configs" / "experiments").glob("*.yaml"))
TASKS = [("t1", 0.6), ("click", 0.5), ("gender", 0.5)]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_experiment_loads(path):
    """Each file's base, variants, methods and contrasts resolve: ``load_experiment`` builds the
    run config of every variant and method and checks that each contrast names planned runs."""
    assert len(load_experiment(path).seeds) >= 2, "an interval needs two seeds"


def test_the_shipped_experiments_are_found():
    assert {"paper_synthetic_table2.yaml", "paper_synthetic_ablations.yaml"} <= {p.name for p in EXPERIMENTS}


def write_experiment(tmp_path, **fields):
    base = tiny_config(tmp_path, TASKS)
    spec = {
        "base": base.name,
        "overrides": ["tasks.0.epochs=2"],
        "methods": ["conure", "conure_minus", "finetune"],
        "seeds": [0, 1],
        "variants": {"main": {}, "no_click": {"tasks": ["t1", "gender"], "methods": ["conure"]}},
    }
    spec.update(fields)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_experiment_tables_plots_and_continuation(tmp_path, caplog):
    path = write_experiment(
        tmp_path, contrasts={"no_click_costs": {"a": "main/conure", "b": "no_click/conure", "tasks": ["gender"]}}
    )
    out = tmp_path / "out"
    cli("experiment", "--config", str(path), "--out", str(out))
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
    # Two seeds: the 95% half-width is t(0.975, 1) = 12.7062 standard errors.
    assert main["conure"]["learned"]["click"]["ci95"] == pytest.approx(12.7062 * statistics.stdev(clicks) / 2**0.5)
    # The contrast pairs the runs seed by seed: gender after click minus gender right after T1.
    alone = [json.loads((out / f"runs/no_click/conure/seed{s}/report.json").read_text()) for s in (0, 1)]
    diffs = [r["matrix"][2][2] - a["matrix"][1][1] for r, a in zip(runs, alone, strict=True)]
    contrast = summary["differences"]["no_click_costs"]
    assert contrast["a"] == "main/conure" and contrast["seeds"] == [0, 1] and list(contrast["tasks"]) == ["gender"]
    assert contrast["tasks"]["gender"]["mean"] == pytest.approx(statistics.mean(diffs))
    assert "relative_mean" not in contrast  # one task: nothing to average
    tuned = [json.loads((out / f"runs/main/finetune/seed{s}/report.json").read_text()) for s in (0, 1)]
    forgot = summary["differences"]["main: finetune forgetting"]["tasks"]
    assert list(forgot) == ["t1", "click"]
    assert forgot["t1"]["mean"] == pytest.approx(statistics.mean(r["matrix"][2][0] - r["matrix"][0][0] for r in tuned))
    # Conure- comes from the same runs: the scores before each task's pruning.
    assert not (out / "runs/main/conure_minus").exists()
    minus = [r["before_prune"]["click"] for r in runs]
    assert main["conure_minus"]["learned"]["click"]["mean"] == pytest.approx(statistics.mean(minus))
    # Conure keeps T1; the table reports T1 after the last task and the storage.
    assert main["conure"]["after_last_task"]["t1"] == main["conure"]["learned"]["t1"]
    assert main["finetune"]["num_backbones"] == main["conure"]["num_backbones"] == 1
    table = (out / "table.md").read_text()
    assert "## Variant `main`" in table and "| conure_minus |" in table and "trivial reference" in table
    assert "| no_click_costs | main/conure | no_click/conure | gender |" in table
    for name in ("main_forgetting", "main_tasks", "main_storage", "no_click_forgetting"):
        png = (out / "plots" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not (out / "plots" / "no_click_storage.png").exists()  # one method: nothing to compare
    # A second call reuses every finished run and gives the same summary.
    (out / "results.json").unlink()
    caplog.set_level(logging.INFO, logger="conure_dist.experiment.harness")
    cli("experiment", "--config", str(path), "--out", str(out))
    assert "report exists, not run again" in caplog.text
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["variants"] == summary["variants"]
    # The reused runs count with the time they took: the total is not the few seconds of reuse.
    ran = sum(json.loads(p.read_text())["wall_seconds"] for p in (out / "runs").rglob("report.json"))
    assert rerun["wall_seconds"] >= round(ran, 1) > 0
    assert rerun["reused_seconds"] == round(ran, 1) and summary["reused_seconds"] == 0
    reused = rerun["reused_seconds"]  # the table shows the summary's figure, rounded to the second
    assert f"(of which {reused:.0f} s are runs reused from earlier calls" in (out / "table.md").read_text()


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
        (
            {"variants": {"v": {"tasks": ["t1", "click", "click"]}}},
            r"key 'variants\.v\.tasks': \['click'\] listed twice",
        ),
        ({"variants": {"v": {"methods": ["stl", "stl"]}}}, r"key 'variants\.v\.methods': \['stl'\] listed twice"),
        (
            {"contrasts": {"c": {"a": "main/stl", "b": "main/conure"}}},
            r"key 'contrasts\.c\.a': 'main/stl' is not a VARIANT/METHOD",
        ),
        (
            {"contrasts": {"c": {"a": "main/conure", "b": "no_click/conure", "tasks": ["click"]}}},
            r"key 'contrasts\.c\.tasks': \['click'\] not among the tasks that both sides learn \(\['t1', 'gender'\]\)",
        ),
        ({"contrasts": {"c": {"a": "main/conure"}}}, r"key 'contrasts\.c': expected a mapping with a, b"),
    ],
)
def test_experiment_config_errors_name_the_key(tmp_path, fields, message):
    path = write_experiment(tmp_path, **fields)
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(path)
    assert str(path) in str(info.value)


@pytest.mark.slow
def test_a_finished_run_is_reused_only_for_the_same_tasks(tmp_path, capsys, caplog):
    """Through the CLI's main in this process: the one run trains once, every later call only
    checks it against the experiment."""
    caplog.set_level(logging.INFO, logger="conure_dist.experiment.harness")
    path = write_experiment(tmp_path, methods=["conure"], seeds=[0], variants={"main": {"tasks": ["t1", "gender"]}})
    out = tmp_path / "out"
    command = ["experiment", "--config", str(path), "--out", str(out)]

    def refused() -> str:
        capsys.readouterr()
        assert main(command) == 2
        return capsys.readouterr().err

    def reused() -> bool:
        caplog.clear()
        cli(*command)
        return "report exists, not run again" in caplog.text

    assert not reused()
    write_experiment(tmp_path, methods=["conure"], seeds=[0], variants={"main": {"tasks": ["t1", "click"]}})
    assert re.search(r"holds a run of \(method, seed, tasks\) = \('conure', 0, \['t1', 'gender'\]\)", refused())
    # Same tasks, other settings: refused too, naming them; settings that do not change results are free.
    write_experiment(
        tmp_path,
        methods=["conure"],
        seeds=[0],
        variants={"main": {"tasks": ["t1", "gender"]}},
        overrides=["tasks.0.epochs=2", "tasks.2.lr=0.05"],
    )  # gender: tasks.1 of the run
    assert re.search(r"made with other settings: tasks\.1\.lr=0\.05 \(the run: 0\.003\)", refused())
    write_experiment(
        tmp_path,
        methods=["conure"],
        seeds=[0],
        variants={"main": {"tasks": ["t1", "gender"]}},
        overrides=["tasks.0.epochs=2", "train.eval_batch_size=64"],
    )
    assert reused()
    # A run made before a key existed counts as made with its default; another value is refused.
    report_path = out / "runs/main/conure/seed0/report.json"
    report = json.loads(report_path.read_text())
    del report["config"]["train"]["patience"], report["config"]["tasks"][1]["l2"]
    report_path.write_text(json.dumps(report))
    assert reused()
    write_experiment(
        tmp_path,
        methods=["conure"],
        seeds=[0],
        variants={"main": {"tasks": ["t1", "gender"]}},
        overrides=["tasks.0.epochs=2", "train.patience=3"],
    )
    assert re.search(r"made with other settings: train\.patience=3 \(the run: None\)", refused())


@pytest.mark.slow
def test_seeds_on_the_command_line_replace_the_files_and_reuse_its_runs(tmp_path, capsys, caplog):
    """``--seeds 0-1`` over a file that lists seed 0: seed 0's run is reused, seed 1 runs, and
    the summary is over both (as for a replication pooled with the runs before it)."""
    caplog.set_level(logging.INFO, logger="conure_dist.experiment.harness")
    path = write_experiment(tmp_path, methods=["conure"], seeds=[0], variants={"main": {"tasks": ["t1", "gender"]}})
    out = tmp_path / "out"
    cli("experiment", "--config", str(path), "--out", str(out))
    caplog.clear()
    # The runs switch on deterministic mode (train.deterministic); the in-process CLI puts it back.
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = True
    cli("experiment", "--config", str(path), "--out", str(out), "--seeds", "0-1")
    assert not torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory
    assert "main/conure/seed0: report exists, not run again" in caplog.text
    assert "main/conure/seed1: running" in caplog.text
    runs = [json.loads((out / f"runs/main/conure/seed{s}/report.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1] and runs[0]["matrix"] != runs[1]["matrix"]
    summary = json.loads((out / "results.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["variants"]["main"]["conure"]["seeds"] == [0, 1]
    learned = summary["variants"]["main"]["conure"]["learned"]["gender"]
    assert learned["mean"] == pytest.approx(statistics.mean(r["matrix"][1][1] for r in runs))
    for bad, message in (
        ("3-1", "the range '3-1' in '3-1' ends before it starts"),
        ("0-2,1", "lists a seed twice"),
        ("1-", "expected seeds such as 0-4,10, got '1-'"),
        ("x", "got 'x'"),
    ):
        with pytest.raises(SystemExit):
            main(["experiment", "--config", str(path), "--out", str(out), "--seeds", bad])
        assert message in capsys.readouterr().err
    # Another experiment file would overwrite this one's table: refused, naming both.
    other = tmp_path / "other.yaml"
    other.write_text(path.read_text())
    assert main(["experiment", "--config", str(other), "--out", str(out)]) == 2
    assert f"holds the results of {path}, not of {other}" in capsys.readouterr().err


@pytest.mark.slow
def test_jobs_give_the_sequential_runs_and_name_the_runs_that_fail(tmp_path):
    """``--jobs 2``: each run's report is the one the sequential loop writes (one thread per run);
    a run that fails (its shards were built otherwise) is named, and the others' reports stay."""
    overrides = ["tasks.0.epochs=2", "train.num_threads=1"]
    path = write_experiment(tmp_path, overrides=overrides, methods=["conure", "finetune"], variants={"main": {}})
    seq, par = tmp_path / "seq", tmp_path / "par"
    cli("experiment", "--config", str(path), "--out", str(seq))
    write_experiment(
        tmp_path,
        overrides=overrides,
        methods=["conure", "finetune"],
        variants={"main": {}, "other_data": {"methods": ["finetune"], "overrides": ["data.synthetic.num_users=300"]}},
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    failed = subprocess.run(
        [sys.executable, "-m", "conure_dist", "experiment", "--config", str(path), "--out", str(par), "--jobs", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "2 of 6 runs failed" in failed.stderr
    for seed in (0, 1):
        assert f"other_data/finetune/seed{seed}: UserError: data.root=" in failed.stderr
    reports = sorted(p.relative_to(seq) for p in (seq / "runs").rglob("report.json"))
    assert len(reports) == 4 and sorted(p.relative_to(par) for p in (par / "runs").rglob("report.json")) == reports
    for rel in reports:
        a, b = (json.loads((root / rel).read_text()) for root in (seq, par))
        for report, root in ((a, seq), (b, par)):  # each experiment shares T1 through its own folder
            assert report["config"]["train"].pop("first_task_cache") == str(root / "first_task")
        assert a["matrix"] == b["matrix"] and a["config"] == b["config"], rel
        assert a.get("before_prune") == b.get("before_prune") and a.get("task_checksums") == b.get("task_checksums"), (
            rel
        )


def test_results_name_files_inside_the_working_directory_relative_to_it(tmp_path, monkeypatch):
    from conure_dist.experiment.report import _shown

    (tmp_path / "configs").mkdir()
    monkeypatch.chdir(tmp_path / "configs")
    assert _shown(tmp_path / "configs" / "ml100k.yaml") == "ml100k.yaml"
    assert _shown(tmp_path / "elsewhere.yaml") == str(tmp_path / "elsewhere.yaml")


def test_t_quantiles_match_the_table_and_its_continuation():
    from conure_dist.experiment.stats import t_quantile_975

    # Hand values of t(0.975, df) from printed tables.
    for df, value in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert t_quantile_975(df) == value
    for df, value in [(31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799), (10_000, 1.9602)]:
        assert t_quantile_975(df) == pytest.approx(value, abs=2e-4), df
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile_975(0)


def test_intervals_and_paired_differences_by_hand():
    from conure_dist.experiment.stats import contrast, interval, paired

    five = interval([1.0, 2.0, 3.0, 4.0, 5.0])  # std sqrt(2.5), standard error sqrt(0.5)
    assert five["mean"] == 3.0 and five["std"] == pytest.approx(1.581139) and five["n"] == 5
    assert five["ci95"] == pytest.approx(2.7764 * 0.7071068) and five["low"] == pytest.approx(3 - 1.963211, abs=1e-6)
    two = interval([0.1, 0.3])
    assert two["ci95"] == pytest.approx(12.7062 * 0.1)
    assert interval([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1, "ci95": 0.0, "low": 0.5, "high": 0.5}
    # Differences 1, 2, 3: mean 2, std 1, half-width 4.3027 / sqrt(3) = 2.4842: includes zero.
    wide = paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert wide["ci95"] == pytest.approx(2.484166) and not wide["excludes_zero"]
    # Differences 0.3, 0.4, 0.5 on top of scores that vary far more: pairing keeps them apart.
    base = [0.1, 5.0, 9.0]
    narrow = paired([b + d for b, d in zip(base, [0.3, 0.4, 0.5], strict=True)], base)
    assert narrow["mean"] == pytest.approx(0.4) and narrow["low"] == pytest.approx(0.4 - 0.248417, abs=1e-6)
    assert narrow["excludes_zero"] and not paired([0.2], [0.1])["excludes_zero"]  # one seed proves nothing
    below = paired([0.0, 0.0, 0.0], [0.3, 0.4, 0.5])
    assert below["high"] < 0 and below["excludes_zero"]
    with pytest.raises(ValueError, match="as many runs"):
        paired([1.0], [1.0, 2.0])

    def report(seed, click, gender):
        return {
            "seed": seed,
            "tasks": [{"name": "t1"}, {"name": "click"}, {"name": "gender"}],
            "matrix": [[0.2, None, None], [0.2, click, None], [0.2, click, gender]],
        }

    a = [report(0, 0.12, 0.70), report(1, 0.14, 0.74)]
    b = [report(0, 0.10, 0.70), report(1, 0.10, 0.70)]
    out = contrast(a, b, ["click", "gender"])
    assert out["tasks"]["click"]["mean"] == pytest.approx(0.03) and out["tasks"]["gender"]["mean"] == pytest.approx(
        0.02
    )
    # Relative mean per seed: (0.02/0.10 + 0/0.70) / 2 = 0.1 and (0.04/0.10 + 0.04/0.70) / 2 = 0.228571.
    assert out["relative_mean"]["mean"] == pytest.approx((0.1 + 0.228571) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="same seeds"):
        contrast(a, [b[1], b[0]], ["click"])


@pytest.mark.slow
def test_command_line_overrides_reach_every_run_and_guard_reuse(tmp_path, capsys, caplog):
    """``conure experiment ... key=value``: applied after the file's overrides, validated like
    ``conure run``'s before any compute, recorded in results.json, and a report made without
    them is refused rather than mixed in."""
    caplog.set_level(logging.INFO, logger="conure_dist.experiment.harness")
    path = write_experiment(tmp_path, methods=["conure"], seeds=[0], variants={"main": {"tasks": ["t1", "gender"]}})
    out = tmp_path / "out"
    command = ["experiment", "--config", str(path), "--out", str(out)]
    for bad, message in (
        (
            "tasks.2.lr=fast",
            "key 'tasks.2.lr': expected a finite number, got 'fast' (set by the override 'tasks.2.lr=fast')",
        ),
        ("seed=4", "override 'seed=4': the experiment sets each run's seed and method"),
    ):
        assert main([*command, bad]) == 2
        assert message in capsys.readouterr().err, bad
        assert not out.exists(), "refused before any compute"
    cli(*command, "tasks.2.lr=0.05", "tasks.0.epochs=1")  # gender is the base config's tasks.2
    report = json.loads((out / "runs/main/conure/seed0/report.json").read_text())
    assert report["config"]["tasks"][1]["lr"] == 0.05 and report["config"]["tasks"][0]["epochs"] == 1
    summary = json.loads((out / "results.json").read_text())
    assert summary["overrides"] == ["tasks.0.epochs=2"]
    assert summary["command_overrides"] == ["tasks.2.lr=0.05", "tasks.0.epochs=1"]
    assert "then from the command line ['tasks.2.lr=0.05', 'tasks.0.epochs=1']" in (out / "table.md").read_text()
    capsys.readouterr()
    assert main(command) == 2  # without them: the stored run was made with other settings
    err = capsys.readouterr().err
    assert "tasks.0.epochs=2 (the run: 1)" in err and "tasks.1.lr=0.003 (the run: 0.05)" in err
    caplog.clear()
    cli(*command, "tasks.2.lr=0.05", "tasks.0.epochs=1", "train.eval_batch_size=64")
    assert "main/conure/seed0: report exists, not run again" in caplog.text


def test_error_bars_stop_at_the_metrics_bounds():
    from conure_dist.experiment.plots import clipped_error_bars

    below, above = clipped_error_bars([0.02, 0.5, 0.99, 0.0], [0.05, 0.1, 0.03, 0.0])
    assert below == pytest.approx([0.02, 0.1, 0.03, 0.0]) and above == pytest.approx([0.05, 0.1, 0.01, 0.0])
    assert all(m - b >= 0 and m + a <= 1 + 1e-12 for m, b, a in zip([0.02, 0.5, 0.99, 0.0], below, above, strict=True))


@pytest.mark.slow
def test_plots_of_a_summary_with_small_scores(tmp_path):
    """Scores near 0 with wide intervals (two seeds): the bars reach 0 and not below."""
    from conure_dist.experiment.plots import write_plots

    def row(scores, stored):
        learned = {t: {"mean": m, "ci95": 0.2, "std": 0.1} for t, m in scores.items()}
        n = len(scores)
        matrix = [[list(scores.values())[j] if j <= i else None for j in range(n)] for i in range(n)]
        return {
            "tasks": list(scores),
            "metrics": ["mrr@5", "mrr@5", "acc"],
            "learned": learned,
            "matrix_mean": matrix,
            "reference": {"t1": 0.01, "click": 0.02, "gender": 0.5},
            "stored_parameters": stored,
        }

    summary = {
        "variants": {
            "main": {
                "conure": row({"t1": 0.05, "click": 0.03, "gender": 0.7}, 1e5),
                "stl": row({"t1": 0.05, "click": 0.04, "gender": 0.9}, 3e5),
            }
        }
    }
    paths = write_plots(summary, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["main_forgetting.png", "main_tasks.png", "main_storage.png"]
    assert all((tmp_path / "plots" / p.rsplit("/", 1)[1]).stat().st_size > 10_000 for p in paths)
