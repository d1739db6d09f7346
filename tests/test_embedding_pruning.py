"""Embedding pruning (model.prune_embedding): the item embedding is partitioned between tasks
like the conv kernels, later tasks train its freed entries, and old tasks still never change."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli, cli_on, collect_scores, tiny_config

from conure_dist.checkpoint.format import load_checkpoint
from conure_dist.continual.audit import model_from_checkpoint
from conure_dist.continual.views import MaskedModel
from conure_dist.data.manifest import Manifest

TASKS = [("t1", 0.6), ("click", 0.5), ("gender", 0.5)]
EMBEDDING = "backbone.embedding.weight"


def _checkpoint(out, suffix):
    return load_checkpoint(str(sorted(p for p in (out / "checkpoints").iterdir() if p.name.endswith(suffix))[-1]))


def _logits(ckpt, manifest, task_index):
    model, ownership = model_from_checkpoint(ckpt)
    masked = MaskedModel(model, ownership)
    masked.set_view("infer", task_index + 1)
    name = ckpt.meta["tasks"][task_index]["name"]
    return collect_scores(masked, manifest, manifest.task(name), "test", 256, torch.device("cpu"))


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_embedding_pruning_shares_the_embedding_without_forgetting(tmp_path, nproc):
    path = tiny_config(tmp_path, TASKS, model={"channels": 16, "block_dilations": [1, 2], "prune_embedding": True})
    out = tmp_path / "run"
    cli_on(nproc, "run", "--config", str(path), "--out", str(out), "tasks.*.l2=0.001")
    report = json.loads((out / "report.json").read_text())
    manifest = Manifest.load(str(tmp_path / "data"))
    final = _checkpoint(out, "gender-done")
    owners = final.ownership[EMBEDDING]
    # Row 0 is padding; every task owns part of the other rows, some entries stay free.
    counts = torch.bincount(owners[1:].flatten().long(), minlength=4).tolist()
    assert all(c > 0 for c in counts), counts
    # Embedding entries that T1 kept are bit-identical at the end; freed ones were trained on.
    t1_done = _checkpoint(out, "t1-done")
    kept = owners == 1
    assert torch.equal(t1_done.model[EMBEDDING][kept], final.model[EMBEDDING][kept])
    moved = (owners[1:] >= 2) & (t1_done.model[EMBEDDING][1:] != final.model[EMBEDDING][1:])
    assert moved.any()
    for index, suffix in enumerate(["t1-done", "click-done"]):
        assert torch.equal(_logits(_checkpoint(out, suffix), manifest, index), _logits(final, manifest, index))
    for j in range(3):
        column = [row[j] for row in report["matrix"][j:]]
        assert column == [column[0]] * len(column)
    cli("audit", "--ckpt", str(out))
