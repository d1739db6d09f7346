"""The checkpointer over the run's parts, end to end.

The format on disk is the one earlier checkpoints have: folder names, part names, ``COMMIT`` and
``meta.json`` keys are compared with a recorded list, so a change to the format fails here (and
needs an explicit, tested upgrade in ``checkpoint.format``). A run resumed from a checkpoint taken
inside a phase, or between phases, or between tasks, ends bit for bit where the uninterrupted run
does: forgetting matrix, task checksums and final weights.
"""

import hashlib
import json
import shutil

import pytest
import torch
from helpers import run_conure, tiny_config

from conure_dist.checkpoint.format import COMMIT, FORMAT_VERSION
from conure_dist.config import load_config
from conure_dist.dist import DistInfo

pytestmark = pytest.mark.slow

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
TASKS = [("t1", 0.6), ("click", 0.5)]
OVERRIDES = ["tasks.*.epochs=2", "tasks.*.retrain_epochs=2", "train.keep_checkpoints=1000"]
EVERY = "train.checkpoint_every_steps=8"

RECORDED_FOLDERS = [
    "00001-t1-train-e1-s8",
    "00002-t1-train-e2-s8",
    "00003-t1-trained",
    "00004-t1-retrain-e1-s8",
    "00005-t1-retrain-e2-s8",
    "00006-t1-done",
    "00007-click-train-e1-s8",
    "00008-click-train-e1-s16",
    "00009-click-train-e2-s8",
    "00010-click-train-e2-s16",
    "00011-click-trained",
    "00012-click-retrain-e1-s8",
    "00013-click-retrain-e1-s16",
    "00014-click-retrain-e2-s8",
    "00015-click-retrain-e2-s16",
    "00016-click-done",
]
"""The checkpoints of the run below, as today's format names them: ``{index:05d}-{task}-{stage}``."""
BETWEEN_PHASES = ["COMMIT", "meta.json", "model.pt", "ownership.pt"]
INSIDE_A_PHASE = [*BETWEEN_PHASES, "optimizer.pt", "phase.pt"]
META_KEYS = [
    "config",
    "data_root",
    "format_version",
    "num_seq_items",
    "ownership_checksum",
    "seq_len",
    "state",
    "tasks",
    "world_size",
]
STATE_KEYS = [
    "before_prune",
    "capacity",
    "global_step",
    "growth",
    "history",
    "matrix",
    "metrics",
    "num_checkpoints",
    "phase",
    "prune_search",
    "reference",
    "stage",
    "task_checksums",
    "task_index",
    "wall_seconds",
]
PHASE_KEYS = ["best_value", "data_digest", "epoch", "epochs_log", "loss_total", "mode", "since_best", "step"]
TASK_KEYS = ["kind", "name", "num_outputs"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run checkpointed every 8 steps besides between phases."""
    tmp = tmp_path_factory.mktemp("checkpoint_resume")
    path = tiny_config(tmp, TASKS)
    clean = run_conure(load_config(path, OVERRIDES), str(tmp / "clean"), CPU)
    every = run_conure(load_config(path, [*OVERRIDES, EVERY]), str(tmp / "every"), CPU)
    return tmp, path, clean, every


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _last(out):
    return sorted((out / "checkpoints").iterdir())[-1]


def test_checkpoints_do_not_change_the_run(runs):
    tmp, _, clean, every = runs
    assert every["matrix"] == clean["matrix"] and every["task_checksums"] == clean["task_checksums"]
    assert _sha(_last(tmp / "every") / "model.pt") == _sha(_last(tmp / "clean") / "model.pt")


def test_the_format_on_disk_is_the_recorded_one(runs):
    tmp = runs[0]
    folders = sorted((tmp / "every" / "checkpoints").iterdir())
    assert [f.name for f in folders] == RECORDED_FOLDERS
    for folder in folders:
        inside = folder.name.rsplit("-", 2)[-1].startswith("s")
        files = sorted(p.name for p in folder.iterdir())
        assert files == sorted(INSIDE_A_PHASE if inside else BETWEEN_PHASES), folder.name
        commit = json.loads((folder / COMMIT).read_text())
        assert list(commit) == ["files"] and sorted(commit["files"]) == sorted(set(files) - {COMMIT}), folder.name
        for name, digest in commit["files"].items():
            assert _sha(folder / name) == digest, (folder.name, name)
        meta = json.loads((folder / "meta.json").read_text())
        assert sorted(meta) == META_KEYS and meta["format_version"] == FORMAT_VERSION == 1, folder.name
        assert sorted(meta["state"]) == STATE_KEYS, folder.name
        assert all(sorted(t) == TASK_KEYS for t in meta["tasks"])
        if inside:
            task, mode = folder.name.split("-")[1:3]
            assert meta["state"]["stage"] == f"in_{mode}" and sorted(meta["state"]["phase"]) == PHASE_KEYS
            phase = torch.load(folder / "phase.pt", weights_only=True)
            assert sorted(phase) == ["best", "generator"] and phase["best"], folder.name
        else:
            assert meta["state"]["phase"] is None, folder.name
    stages = [json.loads((f / "meta.json").read_text())["state"]["stage"] for f in folders if f.name.endswith("ed")]
    assert stages == ["trained", "trained"]
    assert json.loads((folders[-1] / "meta.json").read_text())["state"]["stage"] == "start"


@pytest.mark.parametrize(
    "cut", ["t1-train-e2-s8", "t1-trained", "t1-done", "click-train-e1-s16", "click-retrain-e2-s8"]
)
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(runs, cut):
    tmp, path, clean, _ = runs
    index = next(i for i, f in enumerate(RECORDED_FOLDERS) if f[6:] == cut)
    out = tmp / f"cut-{cut}"
    shutil.copytree(tmp / "every", out)
    for folder in RECORDED_FOLDERS[index + 1 :]:
        (out / "checkpoints" / folder / COMMIT).unlink()
    resumed = run_conure(load_config(path, [*OVERRIDES, EVERY]), str(out), CPU, resume=True)
    start = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"start"' in line][-1]
    saved = json.loads((out / "checkpoints" / RECORDED_FOLDERS[index] / "meta.json").read_text())["state"]
    assert (start["resume"], start["task_index"], start["stage"]) == (True, saved["task_index"], saved["stage"])
    assert resumed["matrix"] == clean["matrix"]
    assert resumed["task_checksums"] == clean["task_checksums"]
    assert _sha(_last(out) / "model.pt") == _sha(_last(tmp / "clean") / "model.pt")
    assert _sha(_last(out) / "ownership.pt") == _sha(_last(tmp / "clean") / "ownership.pt")
