"""The quick start, end to end through the CLI: report, no forgetting, audit, eval and predict."""

import io
import json
import shutil

import pytest
import torch
from helpers import collect_scores

from conure_dist.checkpoint.format import COMMIT, load_checkpoint
from conure_dist.cli import main
from conure_dist.continual.audit import model_from_checkpoint
from conure_dist.continual.views import MaskedModel
from conure_dist.data.manifest import Manifest

pytestmark = pytest.mark.slow


def test_report_has_tasks_of_every_kind(quickstart_run):
    _, _, report = quickstart_run
    kinds = [t["kind"] for t in report["tasks"]]
    assert len(kinds) >= 4 and kinds[0] == "sequence" and {"item", "class"} <= set(kinds)
    assert report["world_size"] == 1 and report["engine"] == "ddp"
    assert report["wall_seconds"] > 0
    n = len(kinds)
    assert len(report["matrix"]) == n and all(len(row) == n for row in report["matrix"])
    assert [c["task"] for c in report["capacity"]] == [t["name"] for t in report["tasks"]]
    # What the figures depend on, so that they can be matched: threads, torch, device, commit.
    env = report["environment"]
    assert env["threads"] >= 1 and env["device"] == "cpu" and env["torch"] and "commit" in env
    assert set(report["valid_examples"]) == {t["name"] for t in report["tasks"]}
    assert report["learned_nothing"] == []  # every quick-start task beats its reference


def test_old_tasks_never_change_in_the_matrix(quickstart_run):
    _, _, report = quickstart_run
    matrix = report["matrix"]
    for i, row in enumerate(matrix):
        assert all(v is None for v in row[i + 1 :])
        for j in range(i + 1):
            assert row[j] == matrix[j][j], f"task {j} changed after task {i}"


def test_every_task_beats_its_trivial_reference(quickstart_run):
    _, _, report = quickstart_run
    final = report["matrix"][-1]
    for j, task in enumerate(report["tasks"]):
        assert final[j] > report["reference"][task["name"]], (task["name"], final[j], report["reference"])


def test_capacity_shrinks_and_is_accounted(quickstart_run):
    _, _, report = quickstart_run
    free = [c["free_fraction"] for c in report["capacity"]]
    assert all(a > b for a, b in zip(free, free[1:], strict=False))
    for c in report["capacity"]:
        assert c["owned_fraction"] + c["free_fraction"] == pytest.approx(1.0)
    # T1 prunes 70%: it keeps 30% of the kernels.
    assert report["capacity"][0]["owned_fraction"] == pytest.approx(0.3, abs=1e-3)


def test_old_task_logits_are_bit_identical_after_later_tasks(quickstart_run):
    data, out, report = quickstart_run
    manifest = Manifest.load(str(data))
    names = [t["name"] for t in report["tasks"]]
    folders = sorted(p for p in (out / "checkpoints").iterdir() if p.name.endswith("-done"))
    assert len(folders) == len(names)

    def logits(folder, task_index):
        model, ownership = model_from_checkpoint(load_checkpoint(str(folder)))
        masked = MaskedModel(model, ownership)
        masked.set_view("infer", task_index + 1)
        return collect_scores(masked, manifest, manifest.task(names[task_index]), "test", 512, torch.device("cpu"))

    for j in range(len(names) - 1):
        right_after = logits(folders[j], j)
        at_the_end = logits(folders[-1], j)
        assert right_after.shape[0] == manifest.task(names[j]).splits["test"].num_instances
        assert torch.equal(right_after, at_the_end), f"task {names[j]} forgot"


def test_audit_passes_then_fails_on_a_changed_frozen_weight(quickstart_run, tmp_path, capsys):
    _, out, report = quickstart_run
    assert main(["audit", "--ckpt", str(out), "--json"]) == 0
    audited = json.loads(capsys.readouterr().out)
    assert audited["ok"] and set(audited["tasks"]) == {t["name"] for t in report["tasks"]}
    # The checkpoints folder itself names the same newest checkpoint.
    assert main(["audit", "--ckpt", str(out / "checkpoints"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == audited
    assert main(["audit", "--ckpt", str(tmp_path)]) != 0
    assert "no committed checkpoint at" in capsys.readouterr().err

    final = sorted((out / "checkpoints").iterdir())[-1]
    tampered = tmp_path / final.name
    shutil.copytree(final, tampered)
    ckpt = load_checkpoint(str(tampered))
    model, ownership = model_from_checkpoint(ckpt)
    name = ownership.names[3]
    position = (ownership.owners[name] == 2).nonzero()[0]  # a weight frozen by task 2
    state = dict(ckpt.model)
    state[name] = state[name].clone()
    state[name][tuple(position)] += 1e-3
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (tampered / "model.pt").write_bytes(buffer.getvalue())
    # Without re-signing, loading refuses the file outright.
    assert main(["audit", "--ckpt", str(tampered)]) != 0
    assert "does not match its checksum" in capsys.readouterr().err
    # Re-signed (a deliberate edit): the audit recomputes and names the task whose weight changed.
    import hashlib

    commit = json.loads((tampered / COMMIT).read_text())
    commit["files"]["model.pt"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (tampered / COMMIT).write_text(json.dumps(commit))
    assert main(["audit", "--ckpt", str(tampered), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert not result["ok"]
    assert [t for t, r in result["tasks"].items() if not r["ok"]] == [report["tasks"][1]["name"]]


def test_eval_and_predict_from_the_checkpoint(quickstart_run, capsys):
    data, out, report = quickstart_run
    assert main(["eval", "--ckpt", str(out), "--json", "--data-root", str(data)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for j, task in enumerate(report["tasks"]):
        assert evaluated[task["name"]][task["primary_metric"]] == report["matrix"][-1][j]
    item_task = next(t["name"] for t in report["tasks"] if t["kind"] == "item")
    assert (
        main(["predict", "--ckpt", str(out), "--task", item_task, "--k", "3", "--limit", "4", "--data-root", str(data)])
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and all(len(x["items"]) == 3 for x in lines)
    assert all(x["scores"] == sorted(x["scores"], reverse=True) for x in lines)
