"""``prune_ratio: auto``: the bisection, the tolerance rule, and whole runs that choose ratios."""

import json
import shutil

import pytest
import torch
from helpers import cli, conure, run_conure, tiny_config

from conure_dist.checkpoint.format import COMMIT
from conure_dist.config import ConfigError, config_from_dict, load_config
from conure_dist.dist import DistInfo
from conure_dist.train.prune_search import bisect_largest, within_tolerance

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
AUTO = ["continual.prune_candidates=[0.3,0.5,0.7,0.9]", "tasks.1.prune_tolerance=0.05", "tasks.2.prune_tolerance=0.05"]


@pytest.mark.parametrize(
    "threshold, chosen, tried",
    [
        (0.75, 0.7, [0.7, 0.8]),  # passes up to 0.7: the middle first, then one step up
        (1.0, 0.9, [0.7, 0.8, 0.9]),  # every candidate passes
        (0.1, None, [0.7, 0.3]),  # none passes
        (0.3, 0.3, [0.7, 0.3, 0.5]),
    ],
)
def test_bisection_finds_the_largest_passing_candidate_in_few_probes(threshold, chosen, tried):
    calls = []

    def passes(ratio):
        calls.append(ratio)
        return ratio <= threshold

    assert bisect_largest([0.9, 0.3, 0.5, 0.7, 0.8], passes) == (chosen, tried)
    assert calls == tried and len(calls) <= 3  # ceil(log2(5 + 1))


def test_tolerance_is_relative_to_the_unpruned_score_for_either_sign():
    assert within_tolerance(0.099, 0.1, 0.01) and not within_tolerance(0.0989, 0.1, 0.01)
    assert within_tolerance(0.1, 0.1, 0.0) and not within_tolerance(0.0999, 0.1, 0.0)
    # A negated loss (class tasks select on -nll): -1.01 is 1% worse than -1.0.
    assert within_tolerance(-1.009, -1.0, 0.01) and not within_tolerance(-1.02, -1.0, 0.01)


def test_auto_and_its_settings_are_validated():
    with pytest.raises(ConfigError, match="tasks.0.prune_ratio"):
        config_from_dict({"tasks": [{"name": "t1", "prune_ratio": "half"}]})
    with pytest.raises(ConfigError, match="continual.prune_candidates.1"):
        config_from_dict({"continual": {"prune_candidates": [0.5, 1.0]}, "tasks": [{"name": "t1"}]})
    with pytest.raises(ConfigError, match="lists a ratio twice"):
        config_from_dict({"continual": {"prune_candidates": [0.5, 0.5]}, "tasks": [{"name": "t1"}]})
    assert config_from_dict({"tasks": [{"name": "t1", "prune_ratio": "auto"}]}).tasks[0].prune_ratio == "auto"


def _events(out, event):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if f'"event": "{event}"' in x]


@pytest.mark.slow
def test_a_run_chooses_each_ratio_by_validation_and_a_resume_keeps_it(tmp_path):
    path = tiny_config(tmp_path, [("t1", 0.5), ("click", "auto"), ("gender", "auto")])
    report = run_conure(load_config(path, AUTO), str(tmp_path / "a"), CPU)
    history = {(h["task"], h["phase"]): h["best_valid"] for h in report_history(tmp_path / "a")}
    for i, task in enumerate(("click", "gender"), start=1):
        search = report["prune_search"][task]
        assert search["unpruned"] == history[(task, "train")]
        probes = {p["ratio"]: p for p in search["probes"]}
        for probe in probes.values():
            assert probe["within_tolerance"] == within_tolerance(probe["valid"], search["unpruned"], 0.05)
        passing = [r for r, p in probes.items() if p["within_tolerance"]]
        assert search["chosen"] == (max(passing) if passing else 0.3)
        assert all(not p["within_tolerance"] for r, p in probes.items() if r > search["chosen"])
        assert report["capacity"][i]["prune_ratio"] == search["chosen"]
        if search["chosen"] in probes:  # the real retrain repeats the chosen probe exactly
            assert history[(task, "retrain")] == probes[search["chosen"]]["valid"]
    assert len(_events(tmp_path / "a", "prune_probe")) == sum(len(s["probes"]) for s in report["prune_search"].values())

    # Resume from gender's ratio checkpoint: the search is not repeated, the result is the same.
    folders = sorted((tmp_path / "a" / "checkpoints").iterdir())
    ratio_ckpt = next(f for f in folders if f.name.endswith("gender-ratio"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for folder in folders:
        if folder.name > ratio_ckpt.name:
            (tmp_path / "b" / "checkpoints" / folder.name / COMMIT).unlink()
    probes_before = len(_events(tmp_path / "b", "prune_probe"))
    resumed = run_conure(load_config(path, AUTO), str(tmp_path / "b"), CPU, resume=True)
    assert len(_events(tmp_path / "b", "prune_probe")) == probes_before
    assert resumed["matrix"] == report["matrix"] and resumed["task_checksums"] == report["task_checksums"]
    assert resumed["prune_search"] == report["prune_search"]


def report_history(out):
    """The phases' summaries, as the final checkpoint's run state records them."""
    last = sorted((out / "checkpoints").iterdir())[-1]
    return json.loads((last / "meta.json").read_text())["state"]["history"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_choose_the_same_ratio_and_grow_the_same_way(tmp_path):
    path = tiny_config(tmp_path, [("t1", 0.6), ("click", "auto"), ("gender", 0.5)])
    overrides = [*AUTO[:2], "continual.min_free_fraction=0.7", "continual.grow_dilations=[1]"]
    conure("run", "--config", str(path), "--out", str(tmp_path / "two"), *overrides, nproc=2)
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    # Rank 1 took every decision from rank 0: ownership equal on both ranks (checked at every prune,
    # a mismatch stops the run), and the audit of the final checkpoint passes.
    assert (
        report["world_size"] == 2
        and report["growth"]
        and report["prune_search"]["click"]["chosen"] in (0.3, 0.5, 0.7, 0.9)
    )
    audit = json.loads(cli("audit", "--ckpt", str(tmp_path / "two"), "--json"))
    assert audit["ok"] and set(audit["tasks"]) == {"t1", "click", "gender"}
