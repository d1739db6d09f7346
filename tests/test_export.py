"""``conure export``: one finished task as safetensors + config + torch.export program, scoring
bit for bit what the checkpoint's inference view (``conure predict``) scores."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, cli
from safetensors import safe_open

from conure_dist.continual.views import MaskedModel
from conure_dist.data.stream import iter_batches
from conure_dist.serving.export import export_task, load_exported, task_input
from conure_dist.serving.inference import TrainedRun, load_trained, manifest_for, predict

pytestmark = pytest.mark.slow
TASKS = [("t1", 0.6), ("click", 0.5), ("gender", 0.5)]
NAMES = [name for name, _ in TASKS]


@pytest.fixture(scope="module")
def run_dir(tiny_trained_run: Path) -> Path:
    return tiny_trained_run


@pytest.fixture(scope="module")
def exports(run_dir: Path) -> dict[str, Path]:
    """Every task exported through the real CLI."""
    out = {}
    for name in NAMES:
        out[name] = run_dir.parent / f"export-{name}"
        summary = json.loads(cli("export", "--ckpt", str(run_dir), "--task", name, "--out", str(out[name])))
        assert summary["task"] == name and summary["verified"]
        assert set(summary["files"]) >= {"config.json", "model.safetensors", "program.pt2"}
    return out


def view_scores(run: TrainedRun, task: str, seq: torch.Tensor) -> torch.Tensor:
    """What ``conure predict`` computes: the checkpoint's model under the task's inference view."""
    masked = MaskedModel(run.model, run.ownership).eval()
    masked.set_view("infer", run.task_names.index(task) + 1)
    with torch.no_grad():
        return masked(seq, task)


def num_outputs(run: TrainedRun, task: str) -> int:
    return next(s["num_outputs"] for s in run.ckpt.meta["tasks"] if s["name"] == task)


def task_sequences(run: TrainedRun, task: str, limit: int = 64) -> torch.Tensor:
    """The task's first test histories, fed as ``conure predict`` feeds them."""
    manifest = manifest_for(run.ckpt, None)
    batch = next(iter(iter_batches(manifest, task, "test", limit, shuffle=False, seed=0, epoch=0)))
    return task_input(batch.seq, run.model.kinds[task])


@pytest.mark.parametrize("task", NAMES)
def test_loader_and_program_score_exactly_as_the_inference_view(run_dir, exports, task):
    run = load_trained(str(run_dir))
    seq = task_sequences(run, task)
    want = view_scores(run, task, seq)
    with torch.no_grad():
        loaded = load_exported(exports[task])(seq)
        program = torch.export.load(str(exports[task] / "program.pt2")).module()(seq)
    assert torch.equal(loaded, want)
    assert torch.equal(program, want)
    if run.model.kinds[task] != "class":
        # conure predict ranks these very scores.
        records = predict(run, task, k=5, limit=10)
        assert [r["items"] for r in records] == torch.topk(loaded[:10], 5).indices.tolist()


@pytest.mark.parametrize("task", ["t1", "gender"])
def test_program_takes_any_batch_size(run_dir, exports, task):
    run = load_trained(str(run_dir))
    seq = task_sequences(run, task)
    program = torch.export.load(str(exports[task] / "program.pt2")).module()
    network = load_exported(exports[task])
    for size in (1, 2, 3, 17, seq.shape[0]):
        with torch.no_grad():
            got = program(seq[:size])
            assert got.shape == (size, num_outputs(run, task))
            assert torch.equal(got, network(seq[:size]))
            assert torch.equal(got, view_scores(run, task, seq[:size]))


@pytest.mark.parametrize("task", NAMES)
def test_weights_are_the_view_and_this_head_only(run_dir, exports, task):
    run = load_trained(str(run_dir))
    task_id = run.task_names.index(task) + 1
    with safe_open(str(exports[task] / "model.safetensors"), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    heads = {name.split(".")[1] for name in tensors if name.startswith("heads.")}
    assert heads == {task}, "no other task's head is stored"
    backbone = {n for n in run.model.state_dict() if n.startswith("backbone.")}
    assert set(tensors) == backbone | set(run.model.head_names(task))
    state = run.model.state_dict()
    for name, owner in run.ownership.owners.items():
        used = (owner > 0) & (owner <= task_id)
        assert torch.equal(tensors[name], torch.where(used, state[name], 0.0))
        excluded = tensors[name][~used]
        assert not excluded.signbit().any(), "excluded weights are +0.0, as the view reads them"
    for name in set(tensors) - set(run.ownership.owners):
        assert torch.equal(tensors[name], state[name])
    config = json.loads((exports[task] / "config.json").read_text())
    assert config["task"] == {
        "name": task,
        "kind": run.model.kinds[task],
        "num_outputs": num_outputs(run, task),
        "id": task_id,
    }
    assert config["source"]["task_checksum"] == run.ckpt.meta["state"]["task_checksums"][task]
    assert config["source"]["checkpoint"] == run.ckpt.url
    assert config["input_len"] == run.ckpt.meta["seq_len"] + (run.model.kinds[task] == "sequence")
    if task == "gender":
        assert config["class_names"] == ["F", "M"]


def fails(*args: str) -> subprocess.CompletedProcess:
    """The real CLI, expected to refuse (exit code 2)."""
    result = subprocess.run(
        [sys.executable, "-m", "conure_dist", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-3000:]
    return result


def test_unknown_and_unfinished_tasks_are_refused(run_dir, tmp_path):
    unknown = fails("export", "--ckpt", str(run_dir), "--task", "nope", "--out", str(tmp_path / "a"))
    assert "no task 'nope'" in unknown.stderr and "its tasks: t1, click, gender" in unknown.stderr
    before_gender = next((run_dir / "checkpoints").glob("*-gender-trained"))
    unfinished = fails("export", "--ckpt", str(before_gender), "--task", "gender", "--out", str(tmp_path / "b"))
    assert "'gender' is not finished" in unfinished.stderr and "finished: t1, click" in unfinished.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_only_an_empty_directory_or_a_previous_export_is_written(run_dir, exports, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = fails("export", "--ckpt", str(run_dir), "--task", "click", "--out", str(foreign))
    assert "not empty and not a previous conure export" in refused.stderr and "notes.txt" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "mine"
    # A previous export (of another task) is replaced.
    again = tmp_path / "again"
    again.mkdir()
    for name in ("config.json", "model.safetensors", "program.pt2"):
        (again / name).write_bytes((exports["t1"] / name).read_bytes())
    summary = export_task(str(run_dir), "gender", str(again))
    assert summary["task"] == "gender" and summary["num_parameters"] > 0
    assert json.loads((again / "config.json").read_text())["task"]["name"] == "gender"
    assert load_exported(again).task == "gender"


def test_every_file_has_the_usual_mode(run_dir, exports):
    """Export files, COMMIT and report.json are created as a plain write creates files (0644
    under the usual umask), not 0600 as temporary files and safetensors' own writer make them."""
    mask = os.umask(0)
    os.umask(mask)
    files = [*exports["t1"].iterdir(), run_dir / "report.json", *run_dir.glob("checkpoints/*/COMMIT")]
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "program.pt2", "report.json", "COMMIT"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(0o666 & ~mask) for p in files}
