"""Heads start as their task's trivial predictor, and a phase competes with where it started."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from conure_dist.config import load_config
from conure_dist.dist import DistInfo
from conure_dist.run import build_trainer
from conure_dist.train.evaluate import evaluate_task, reference_metrics

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
TASKS = [("t1", 0.5), ("click", 0.5), ("like", 0.5), ("gender", 0.5), ("age", 0.5)]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prior")
    return build_trainer(load_config(str(tiny_config(tmp, TASKS))), None, CPU)


@pytest.mark.parametrize("task_index", [1, 2, 3, 4])
def test_an_untrained_head_scores_exactly_as_the_trivial_reference(trainer, task_index):
    info = trainer.infos[task_index]
    trainer.masked.set_view("train", task_index + 1)
    for split in ("valid", "test"):
        model = evaluate_task(trainer.masked, trainer.manifest, info, split, 256, 5, CPU)
        reference = reference_metrics(trainer.manifest, info, split, 5)
        assert model == reference, (info.name, split)


def test_without_head_prior_the_heads_start_random(tmp_path):
    cfg = load_config(str(tiny_config(tmp_path, TASKS)), ["model.head_prior=false"])
    trainer = build_trainer(cfg, None, CPU)
    assert trainer.model.heads["click"].weight.abs().sum() > 0
    assert trainer.model.heads["gender"].linear.weight.abs().sum() > 0


def test_a_phase_keeps_its_start_when_no_epoch_validates_better(trainer):
    # A learning rate far too large wrecks the class head; the kept parameters are the best
    # validated ones, the start (epoch 0) included.
    info, index = trainer.infos[3], 3
    cfg = trainer.cfg.tasks[index]
    cfg = type(cfg)(**{**cfg.__dict__, "epochs": 2, "lr": 50.0})
    start = {n: p.detach().clone() for n, p in trainer.model.heads[info.name].named_parameters()}
    result = trainer.run_phase(index, "train", cfg)
    epochs = result["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    best = max(e["valid"]["acc"] for e in epochs)
    assert result["best_valid"] == best
    trainer.masked.set_view("train", index + 1)
    kept = evaluate_task(trainer.masked, trainer.manifest, info, "valid", 256, 5, CPU)["acc"]
    assert kept == best
    assert epochs[0]["valid"]["acc"] == best > epochs[-1]["valid"]["acc"]  # no epoch beat the start: kept
    for name, param in trainer.model.heads[info.name].named_parameters():
        assert torch.equal(param, start[name]), name
