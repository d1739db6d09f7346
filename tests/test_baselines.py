"""The baselines over the same backbone, data and evaluation: what each one trains, serves and
stores, on a tiny synthetic sequence of three tasks."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import conure, run_method, tiny_config

from conure_dist.config import load_config
from conure_dist.dist import DistInfo

TASKS = [("t1", 0.6), ("click", 0.5), ("gender", 0.5)]
CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """One run per method, all on the same shards and config."""
    tmp = tmp_path_factory.mktemp("baselines")
    path = tiny_config(tmp, TASKS)
    out = {}
    for method in ("conure", "conure_minus", "finetune", "stl", "finesmax", "sinmo", "peterrec", "mtl"):
        cfg = load_config(str(path), [f"method.name={method}", "tasks.*.epochs=3", "tasks.*.lr=0.01"])
        out[method] = run_method(cfg, str(tmp / method), CPU)
        assert json.loads((tmp / method / "report.json").read_text())["method"] == method
    return out


def column(report, j):
    return [row[j] for row in report["matrix"][j:]]


@pytest.mark.slow
def test_every_method_trains_t1_the_same_way(reports):
    # Deterministic kernels, same seed, same data: T1's train phase is bit-identical everywhere
    # (for Conure: its score before T1's own pruning).
    t1 = reports["finetune"]["matrix"][0][0]
    assert t1 > reports["finetune"]["reference"]["t1"]
    for method in ("stl", "finesmax", "sinmo", "peterrec", "mtl"):
        assert reports[method]["matrix"][0][0] == t1, method
    assert reports["conure"]["before_prune"]["t1"] == t1
    assert reports["conure_minus"]["matrix"][0][0] == t1


@pytest.mark.slow
def test_every_method_reuses_t1_from_the_first_task_cache_with_the_same_results(reports, tmp_path):
    """train.first_task_cache: Conure stores its T1 train phase, every other method loads it and
    reports exactly what it reported training T1 itself (the fixture's runs)."""
    path = next(iter(reports.values()))["config"]
    cache = tmp_path / "cache"
    for method in ("conure", "conure_minus", "finetune", "stl", "finesmax", "sinmo", "peterrec", "mtl"):
        cfg = load_config(_config_file(tmp_path, path), [f"method.name={method}", f"train.first_task_cache={cache}"])
        report = run_method(cfg, str(tmp_path / method), CPU)
        marker = json.loads((tmp_path / method / "first_task.json").read_text())
        assert marker["reused"] is (method != "conure"), method
        assert report["matrix"] == reports[method]["matrix"], method
        assert report["before_prune"] == reports[method]["before_prune"], method
        assert report["task_checksums"] == reports[method]["task_checksums"], method
    assert len(list(cache.iterdir())) == 1  # one T1 for all eight


def _config_file(tmp_path, cfg_dict) -> str:
    """A fixture run's resolved config as a file (the same runs again)."""
    import yaml

    file = tmp_path / "resolved.yaml"
    file.write_text(yaml.safe_dump(cfg_dict))
    return str(file)


@pytest.mark.slow
def test_methods_that_keep_old_tasks_never_change_them(reports):
    for method in ("conure", "stl", "finesmax", "sinmo", "peterrec", "mtl"):
        for j in range(3):
            values = column(reports[method], j)
            assert values == [values[0]] * len(values), (method, j)


@pytest.mark.slow
def test_sequential_finetuning_moves_old_tasks(reports):
    t1 = column(reports["finetune"], 0)
    assert t1[1] != t1[0] and t1[2] != t1[1]


@pytest.mark.slow
def test_methods_that_serve_t1s_backbone_share_it(reports):
    # FineSmax and PeterRec never train the backbone after T1; a new patch starts as identity,
    # so both serve T1 identically and STL's T1 is the same model too.
    assert column(reports["finesmax"], 0) == column(reports["peterrec"], 0) == column(reports["stl"], 0)


@pytest.mark.slow
def test_conure_minus_scores_each_task_before_its_pruning(reports):
    conure, minus = reports["conure"], reports["conure_minus"]
    for i, task in enumerate(["t1", "click", "gender"]):
        assert minus["matrix"][i][i] == conure["before_prune"][task]
        for j in range(i):  # older tasks: the same model as Conure's
            assert minus["matrix"][i][j] == conure["matrix"][i][j]
    # Its final test metrics agree with its matrix's last row, and so does the experiment's view.
    from conure_dist.report import as_before_pruning

    for report in (minus, as_before_pruning(conure, "conure_minus")):
        assert report["test_metrics"]["gender"]["acc"] == report["matrix"][2][2] == conure["before_prune"]["gender"]
        assert report["test_metrics"]["t1"] == conure["test_metrics"]["t1"]


@pytest.mark.slow
def test_storage_per_method(reports):
    backbones = {m: r["num_backbones"] for m, r in reports.items()}
    assert backbones == {
        "conure": 1,
        "conure_minus": 1,
        "finetune": 1,
        "finesmax": 1,
        "peterrec": 1,
        "stl": 3,
        "sinmo": 3,
        "mtl": 3,
    }
    stored = {m: r["stored_parameters"] for m, r in reports.items()}
    assert stored["conure"] == stored["finesmax"] == stored["finetune"]
    assert stored["finesmax"] < stored["peterrec"] < stored["stl"] == stored["sinmo"] < stored["mtl"]
    assert reports["conure"]["ownership_bytes"] > 0


@pytest.mark.slow
def test_baselines_run_from_the_start_under_resume(tmp_path, caplog):
    """The launch scripts pass --resume to every run; a baseline keeps no checkpoint and reruns."""
    path = tiny_config(tmp_path, TASKS[:2])
    cfg = load_config(str(path), ["method.name=stl"])
    report = run_method(cfg, str(tmp_path / "out"), CPU, resume=True)
    assert "method 'stl' keeps no checkpoints; it runs from the start" in caplog.text
    assert len(report["matrix"]) == 2 and not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.multiprocess
def test_a_baseline_runs_under_torchrun(tmp_path):
    path = tiny_config(tmp_path, TASKS)
    conure("run", "--config", str(path), "--out", str(tmp_path / "two"), "method.name=mtl", nproc=2)
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["world_size"] == 2 and report["method"] == "mtl" and report["num_backbones"] == 3
    assert all(v is not None for v in report["matrix"][-1])
