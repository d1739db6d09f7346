"""Capacity growth: blocks appended for later tasks leave every earlier task bit-identical."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conure_dist.config import ConfigError, config_from_dict, load_config
from conure_dist.continual.audit import audit_checkpoint
from conure_dist.continual.growth import grow_for_task
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.dist import DistInfo
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.serving.export import export_task, load_exported
from conure_dist.serving.inference import load_trained, score_histories, task_view
from conure_dist.serving.multitask import MultiTaskScorer, score_all_tasks
from conure_dist.train.loop import run_conure
from conure_dist.train.state import CapacityError
from data_tools.synthetic import SyntheticSpec
from data_tools.synthetic_tasks import generate_tasks, write_synthetic_tasks

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
SPECS = [TaskSpec("t1", "sequence", 40), TaskSpec("a", "item", 30), TaskSpec("b", "class", 3)]


def _model() -> ConureModel:
    torch.manual_seed(0)
    return ConureModel(40, SPECS, channels=8, kernel_size=3, block_dilations=[1, 2])


def _seqs(rows: int = 19, length: int = 9) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    seqs = torch.randint(1, 40, (rows, length), generator=gen)
    seqs[:4, :5] = 0  # some left padding
    return seqs


@pytest.mark.parametrize("fast", [True, False])
def test_appended_blocks_start_as_identity_and_earlier_tasks_skip_them(fast):
    model = _model()
    model.fast = fast
    seqs = _seqs()
    before = {t: model(seqs, t).detach() for t in ("t1", "a", "b")}
    names = model.grow("a", [1, 4], torch.Generator().manual_seed(5))
    assert names == [f"backbone.blocks.{b}.{c}.weight" for b in (2, 3) for c in ("conv1", "conv2")]
    assert [model.depth(t) for t in ("t1", "a", "b")] == [2, 4, 4]
    assert model.block_dilations("t1") == [1, 2] and model.block_dilations("b") == [1, 2, 1, 4]
    # Identity at the start: the growing task and the later ones score exactly as before.
    for task in ("t1", "a", "b"):
        assert torch.equal(model(seqs, task).detach(), before[task]), task
    # Training the new blocks moves 'a' and 'b', never t1.
    with torch.no_grad():
        for name in names:
            dict(model.named_parameters())[name].normal_()
    assert torch.equal(model(seqs, "t1").detach(), before["t1"])
    assert not torch.equal(model(seqs, "a").detach(), before["a"])


def test_growth_names_partition_the_backbone():
    model = _model()
    model.grow("b", [1], torch.Generator().manual_seed(0))
    grown = model.grown_names("b")
    assert grown == [
        "backbone.blocks.2.norm1.weight",
        "backbone.blocks.2.norm1.bias",
        "backbone.blocks.2.conv1.bias",
        "backbone.blocks.2.norm2.weight",
        "backbone.blocks.2.norm2.bias",
        "backbone.blocks.2.conv2.bias",
    ]
    assert model.grown_names("a") == [] and not set(grown) & set(model.shared_names())
    assert model.prunable_names("a") == [f"backbone.blocks.{b}.{c}.weight" for b in (0, 1) for c in ("conv1", "conv2")]
    assert len(model.prunable_names("b")) == 6 == len(model.prunable_names())
    backbone = {f"backbone.{n}" for n, _ in model.backbone.named_parameters()}
    assert set(model.shared_names()) | set(grown) | set(model.prunable_names()) == backbone
    assert set(model.frozen_with("b")) == set(model.head_names("b")) | set(grown)
    with pytest.raises(ValueError, match="comes before 'b'"):
        model.grow("a", [1], torch.Generator())


def test_grow_for_task_reaches_the_free_fraction_or_stops_at_max_blocks():
    model = _model()
    ownership = TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in model.prunable_names()})
    ownership.prune(1, dict(model.named_parameters()), 0.1)  # t1 keeps 90%
    cfg = config_from_dict(
        {"continual": {"min_free_fraction": 0.5, "grow_dilations": [1], "max_blocks": 6}, "tasks": [{"name": "t1"}]}
    ).continual
    events = grow_for_task(model, ownership, "a", 1, 0, cfg)
    # 4 equal tensors at 10% free; a growth step adds 2 free ones: 0.4 + 2k >= 0.5 * (4 + 2k) first at k=2.
    assert [e["blocks"] for e in events] == [3, 4] and len(model.backbone.blocks) == 4
    assert events[0]["free_after"] == pytest.approx(2.4 / 6, abs=2e-3)
    assert events[-1]["free_after"] == pytest.approx(4.4 / 8, abs=2e-3) and events[0]["free_before"] < 0.5
    assert set(ownership.names) == set(model.prunable_names())
    ownership.prune(2, dict(model.named_parameters()), 0.0)  # 'a' takes everything: 4 more blocks needed
    with pytest.raises(CapacityError, match="continual.max_blocks=6"):
        grow_for_task(model, ownership, "b", 2, 0, cfg)


def test_growth_is_refused_for_methods_without_a_shared_backbone():
    with pytest.raises(ConfigError, match="continual.min_free_fraction"):
        config_from_dict(
            {"method": {"name": "stl"}, "continual": {"min_free_fraction": 0.2}, "tasks": [{"name": "t1"}]}
        )


def test_profile_tasks_are_deterministic_and_balanced():
    spec = SyntheticSpec(num_users=300, num_items=40, seq_len=8, seed=2)
    seqs, tasks, source = generate_tasks(8, spec, classes=3)
    again = generate_tasks(8, spec, classes=3)[1]
    assert [t.name for t in tasks] == ["t1", "click", "like", "gender", "age", "p01", "p02", "p03"]
    assert all(
        torch.equal(torch.from_numpy(x.targets), torch.from_numpy(y.targets))
        for x, y in zip(tasks[1:], again[1:], strict=True)
    )
    counts = torch.bincount(torch.from_numpy(tasks[-1].targets), minlength=3)
    assert counts.tolist() == [100, 100, 100]  # equal-frequency classes
    assert not torch.equal(torch.from_numpy(tasks[-1].targets), torch.from_numpy(tasks[-2].targets))
    with pytest.raises(ValueError, match="num_tasks must be >= 5"):
        generate_tasks(4, spec)


def _twelve_task_config(tmp_path: Path, data: str, min_free: float, name: str) -> Path:
    names = ["t1", "click", "like", "gender", "age"] + [f"p{j:02d}" for j in range(1, 8)]
    cfg = {
        "seed": 0,
        "data": {"root": data},
        "model": {"channels": 16, "block_dilations": [1, 2]},
        "train": {"progress": False, "eval_batch_size": 256, "keep_checkpoints": 100},
        "continual": {"min_free_fraction": min_free, "grow_dilations": [1, 2]},
        "tasks": [
            {"name": n, "epochs": 1, "retrain_epochs": 1, "lr": 3e-3, "batch_size": 64, "prune_ratio": 0.3}
            for n in names
        ],
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_twelve_tasks_grow_instead_of_running_out_and_forget_nothing(tmp_path):
    data = str(tmp_path / "tasks12")
    write_synthetic_tasks(
        data, 12, SyntheticSpec(num_users=300, num_items=40, seq_len=8, seed=1), instances_per_shard=200
    )
    # Without growth, keeping 70% of the free weights per task leaves nothing for task 8.
    with pytest.raises(CapacityError, match="'p03' cannot start"):
        run_conure(load_config(_twelve_task_config(tmp_path, data, 0.0, "fixed.yaml")), str(tmp_path / "fixed"), CPU)

    report = run_conure(
        load_config(_twelve_task_config(tmp_path, data, 0.25, "grow.yaml")), str(tmp_path / "grow"), CPU
    )
    assert len(report["matrix"]) == 12 and report["growth"], "the run must have grown"
    assert all(c["free_fraction"] > 0 for c in report["capacity"])
    last_event = {e["task"]: e for e in report["growth"]}  # a task may grow several steps
    assert all(e["free_before"] < 0.25 for e in report["growth"])
    assert all(e["free_after"] >= 0.25 for e in last_event.values())
    # No forgetting: every row of the matrix repeats the earlier rows' scores exactly.
    for i, row in enumerate(report["matrix"]):
        for later in report["matrix"][i:]:
            assert later[: i + 1] == row[: i + 1]
    blocks = [c["num_blocks"] for c in report["capacity"]]
    assert blocks == sorted(blocks) and blocks[0] == 2 and blocks[-1] == 2 + 2 * len(report["growth"])

    # The final checkpoint audits clean, and every task scores as at the checkpoint where it finished.
    ckpts = sorted((tmp_path / "grow" / "checkpoints").glob("*-done"))
    final = load_trained(str(ckpts[-1]))
    assert all(r.ok for r in audit_checkpoint(final.ckpt)) and len(final.finished) == 12
    seqs = _seqs(20, 8)
    for folder in ckpts[:-1]:
        earlier = load_trained(str(folder))
        task = earlier.finished[-1]
        assert torch.equal(
            score_histories(task_view(earlier, task), task, seqs), score_histories(task_view(final, task), task, seqs)
        ), task
    # All tasks in one call (grouped by depth) equal one call per task.
    together = score_all_tasks(final, None, seqs)
    for task in final.finished:
        assert torch.equal(together[task], score_histories(task_view(final, task), task, seqs)), task
    with pytest.raises(ValueError, match="different numbers of blocks"):
        MultiTaskScorer.from_run(final)
    # An export of a task holds only the blocks it runs, and answers as the checkpoint does.
    first, last = final.finished[1], final.finished[-1]
    for task in (first, last):
        exported = export_task(str(ckpts[-1]), task, str(tmp_path / f"export_{task}"))
        network = load_exported(exported["out"])
        config = json.loads((Path(exported["out"]) / "config.json").read_text())
        assert len(config["model"]["block_dilations"]) == final.model.depth(task)
        assert torch.equal(network(seqs), score_histories(task_view(final, task), task, seqs))


@pytest.mark.slow
def test_a_resume_rebuilds_the_grown_backbone(tmp_path):
    data = str(tmp_path / "tasks")
    write_synthetic_tasks(
        data, 6, SyntheticSpec(num_users=300, num_items=40, seq_len=8, seed=1), instances_per_shard=200
    )
    path = _twelve_task_config(tmp_path, data, 0.45, "c.yaml")
    cfg = yaml.safe_load(path.read_text())
    cfg["tasks"] = cfg["tasks"][:6]
    path.write_text(yaml.safe_dump(cfg))
    full = run_conure(load_config(path), str(tmp_path / "a"), CPU)
    assert full["growth"]

    cfg4 = dict(cfg, tasks=cfg["tasks"][:4])
    (tmp_path / "c4.yaml").write_text(yaml.safe_dump(cfg4))
    run_conure(load_config(tmp_path / "c4.yaml"), str(tmp_path / "b"), CPU)
    resumed = run_conure(load_config(path), str(tmp_path / "b"), CPU, resume=True)
    assert resumed["growth"] == full["growth"]
    assert resumed["matrix"] == full["matrix"] and resumed["task_checksums"] == full["task_checksums"]
