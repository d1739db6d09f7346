"""Heads start as their task's trivial predictor, and a phase competes with where it started."""

from __future__ import annotations

import pytest
import torch
from helpers import build_context, tiny_config

from conure_dist.config import load_config
from conure_dist.dist import DistInfo
from conure_dist.train.evaluate import evaluate_task, reference_metrics

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
TASKS = [("t1", 0.5), ("click", 0.5), ("like", 0.5), ("gender", 0.5), ("age", 0.5)]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prior")
    return build_context(load_config(str(tiny_config(tmp, TASKS))), None, CPU)


@pytest.mark.parametrize("task_index", [1, 2, 3, 4])
def test_an_untrained_head_scores_exactly_as_the_trivial_reference(trainer, task_index):
    info = trainer.infos[task_index]
    trainer.masked.set_view("train", task_index + 1)
    for split in ("valid", "test"):
        model = evaluate_task(trainer.masked, trainer.manifest, info, split, 256, 5, CPU)
        reference = reference_metrics(trainer.manifest, info, split, 5)
        assert {key: model[key] for key in reference} == reference, (info.name, split)


def test_without_head_prior_the_heads_start_random(tmp_path):
    cfg = load_config(str(tiny_config(tmp_path, TASKS)), ["model.head_prior=false"])
    trainer = build_context(cfg, None, CPU)
    assert trainer.model.heads["click"].weight.abs().sum() > 0
    assert trainer.model.heads["gender"].linear.weight.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["acc", "nll"])
def test_a_phase_keeps_its_best_validated_state_the_start_included(tmp_path, selection):
    # A learning rate far too large wrecks the class head; the kept parameters are the best
    # validated ones (by accuracy, or by the lowest cross-entropy), the start (epoch 0) included.
    cfg = load_config(str(tiny_config(tmp_path, TASKS)), [f"train.class_selection={selection}"])
    trainer = build_context(cfg, None, CPU)
    info, index = trainer.infos[3], 3
    task_cfg = trainer.cfg.tasks[index]
    task_cfg = type(task_cfg)(**{**task_cfg.__dict__, "epochs": 2, "lr": 50.0})
    start = {n: p.detach().clone() for n, p in trainer.model.heads[info.name].named_parameters()}
    result = trainer.run_phase(index, "train", task_cfg)
    epochs = result["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    score = (lambda v: v["acc"]) if selection == "acc" else (lambda v: -v["nll"])
    best = max(score(e["valid"]) for e in epochs)
    assert result["best_valid"] == best
    trainer.masked.set_view("train", index + 1)
    kept = evaluate_task(trainer.masked, trainer.manifest, info, "valid", 256, 5, CPU)
    assert score(kept) == best
    assert score(epochs[0]["valid"]) == best > score(epochs[-1]["valid"])  # no epoch beat the start: kept
    for name, param in trainer.model.heads[info.name].named_parameters():
        assert torch.equal(param, start[name]), name
