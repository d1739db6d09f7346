"""Methods as records: each record says what a later task trains, which backbone it starts from,
which view serves it and how many backbones are kept, and the baseline runs do exactly that;
PeterRec's patches and MTL's joint loss act from outside the model; and no module outside the
registry tests a method's name."""

from __future__ import annotations

import ast
import pathlib
import typing

import pytest
import torch
from helpers import run_method, tiny_config

from conure_dist.config import ConfigError, MethodConfig, load_config
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.dist import DistInfo
from conure_dist.methods import METHOD_NAMES, METHODS
from conure_dist.methods.joint import JointLossModel
from conure_dist.methods.patches import add_patches, patch_names, patched_tasks
from conure_dist.methods.run import RUNNERS
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.train import baselines, context

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
TASKS = [("t1", 0.6), ("click", 0.5), ("gender", 0.5)]
SPECS = [TaskSpec("t1", "sequence", 60), TaskSpec("click", "item", 20), TaskSpec("gender", "class", 2)]


class SpyPhase(context.Phase):
    """A phase that notes what it trained: its trainable names, which parameters received a
    non-zero gradient, and the parameters at its start and end."""

    seen: list[dict] = []

    def __init__(self, trainer, task_index, mode, task_cfg, **kwargs) -> None:
        super().__init__(trainer, task_index, mode, task_cfg, **kwargs)
        for param in trainer.model.parameters():
            param.grad = None
        self.start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def run(self, *args, **kwargs):
        out = super().run(*args, **kwargs)
        params = dict(self.trainer.model.named_parameters())
        SpyPhase.seen.append(
            {
                "trainable": {n.removeprefix("model.") for n in self.trainable},
                "grad": {n for n, p in params.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)},
                "moved": {n for n, p in params.items() if not torch.equal(p, self.start[n])},
                "start": self.start,
                "end": {n: p.detach().clone() for n, p in params.items()},
            }
        )
        return out


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """Every baseline run on three tasks, with its phases and the views its evaluation used."""
    tmp = tmp_path_factory.mktemp("methods")
    path = tiny_config(tmp, TASKS)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(context, "Phase", SpyPhase)
        views: list[str] = []
        evaluate = baselines.evaluate_task

        def spy_evaluate(masked, *args, **kwargs):
            views.append(masked.mode)
            return evaluate(masked, *args, **kwargs)

        mp.setattr(baselines, "evaluate_task", spy_evaluate)
        for name, method in METHODS.items():
            if method.runner != "baseline":
                continue
            SpyPhase.seen, views[:] = [], []
            cfg = load_config(str(path), [f"method.name={name}", "tasks.*.epochs=2", "tasks.*.lr=0.01"])
            report = run_method(cfg, str(tmp / name), CPU)
            out[name] = {"phases": SpyPhase.seen, "views": list(views), "report": report}
    return out


def _backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in state.items() if n.startswith("backbone.")}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_a_later_task_trains_what_its_record_says(observed):
    for name, run in observed.items():
        method = METHODS[name]
        names = set(run["phases"][0]["end"])
        backbone = {n for n in names if n.startswith("backbone.")}
        for i, task in enumerate(["click", "gender"], start=1):
            phase = run["phases"][i]
            expected = {n for n in names if n.startswith(f"heads.{task}.")}
            expected |= backbone if method.trains_backbone else set()
            expected |= {n for n in names if n.startswith(f"patches.{task}.")} if method.patches else set()
            expected |= {n for n in names if n.startswith("heads.t1.")} if method.joint_weight else set()
            assert phase["trainable"] == expected, (name, task)
            assert phase["grad"] == expected, (name, task)  # each one learns, nothing else receives a gradient
            assert phase["moved"] <= expected, (name, task)
        assert bool(patched_tasks_of(run)) is method.patches, name


def patched_tasks_of(run) -> set[str]:
    return {n.split(".")[1] for n in run["phases"][0]["end"] if n.startswith("patches.")}


@pytest.mark.slow
def test_a_later_task_starts_from_the_backbone_its_record_names(observed):
    for name, run in observed.items():
        first_end = _backbone(run["phases"][0]["end"])
        previous_end = _backbone(run["phases"][1]["end"])
        start = _backbone(run["phases"][2]["start"])
        starts_from = METHODS[name].starts_from
        assert _same(start, first_end) is (starts_from == "first_task" or not METHODS[name].trains_backbone), name
        if starts_from == "current":
            assert _same(start, previous_end), name
        if starts_from == "fresh_init":
            assert not any(torch.equal(start[n], first_end[n]) for n in start if "weight" in n and "norm" not in n)


@pytest.mark.slow
def test_tasks_are_served_and_stored_as_the_record_says(observed):
    for name, run in observed.items():
        method = METHODS[name]
        assert set(run["views"]) == {method.serve_view}, name
        assert len(run["views"]) == 1 + 2 + 3  # every task so far, after each task
        assert run["report"]["num_backbones"] == (3 if method.backbone_per_task else 1), name
        matrix = run["report"]["matrix"]
        forgot = any(matrix[i][j] != matrix[j][j] for j in range(3) for i in range(j, 3))
        assert forgot is method.forgets, name


def test_the_config_and_the_runners_read_the_registry():
    hints = typing.get_type_hints(MethodConfig)
    assert typing.get_args(hints["name"]) == METHOD_NAMES == tuple(METHODS)
    assert {m.runner for m in METHODS.values()} == set(RUNNERS)
    assert all(m.report_from is None or METHODS[m.report_from].runner == m.runner for m in METHODS.values())
    for name, method in METHODS.items():
        assert method.name == name
        # Only a method that shares the backbone through ownership keeps checkpoints and can grow it.
        assert method.keeps_checkpoints is method.partitions_backbone is (method.runner == "continual")


def test_only_conures_kind_may_grow_the_backbone(tmp_path):
    path = tiny_config(tmp_path, TASKS)
    for name, method in METHODS.items():
        overrides = [f"method.name={name}", "continual.min_free_fraction=0.2"]
        if method.partitions_backbone:
            load_config(str(path), overrides)
        else:
            with pytest.raises(ConfigError, match="continual.min_free_fraction"):
                load_config(str(path), overrides)


def _model(**kwargs) -> ConureModel:
    torch.manual_seed(0)
    return ConureModel(60, SPECS, 16, 3, [1, 2], **kwargs)


def test_patches_are_added_from_outside_with_the_keys_and_draws_of_the_model_they_extend():
    plain, patched = _model(), _model()
    add_patches(patched, ["click", "gender"], 4)
    # Created after the backbone and heads: those initialise as without patches.
    state = patched.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in plain.state_dict().items())
    assert list(state)[: len(plain.state_dict())] == list(plain.state_dict())
    assert patched_tasks(patched) == ["click", "gender"] and patched_tasks(plain) == []
    assert patch_names(patched, "t1") == []
    assert patch_names(patched, "click")[:2] == ["patches.click.0.down.weight", "patches.click.0.down.bias"]
    assert len(patch_names(patched, "click")) == 4 * 2 * 2  # 2 blocks x 2 convs, each down and up (weight, bias)
    seq = torch.randint(1, 60, (5, 10))
    for task in ("t1", "click", "gender"):  # a new patch (W2 = 0) leaves the network as it was
        assert torch.equal(patched(seq, task), plain(seq, task))
    with torch.no_grad():
        for name, param in patched.named_parameters():
            if name.startswith("patches.click."):
                param.add_(0.3)
    assert not torch.equal(patched(seq, "click"), plain(seq, "click"))
    for task in ("t1", "gender"):  # each task runs its own patches only
        assert torch.equal(patched(seq, task), plain(seq, task))
    assert torch.equal(patched(seq, "t1"), plain(seq, "t1"))


def test_every_methods_model_has_the_state_dict_layout_its_checkpoints_were_written_with(tmp_path):
    """A checkpoint's ``model.pt`` pickles the state dict's metadata, which lists every submodule:
    every method's model keeps the (empty unless PeterRec) patch container, so bytes stay as written."""
    path = tiny_config(tmp_path, TASKS)
    for name, method in METHODS.items():
        model = context.build_model(load_config(str(path), [f"method.name={name}"]), 60, SPECS)
        assert "patches" in model.state_dict()._metadata, name
        assert patched_tasks(model) == (["click", "gender"] if method.patches else []), name


def test_the_joint_loss_adds_t1s_weighted_mean_loss_from_outside_the_model():
    model = _model()
    masked = MaskedModel(model, TaskOwnership.empty({}))
    masked.set_view("dense", 2)
    joint = JointLossModel(masked)
    assert [n for n, _ in joint.named_parameters()] == [n for n, _ in masked.named_parameters()]
    seq, t1_seq = torch.randint(1, 60, (6, 10)), torch.randint(1, 60, (4, 11))
    target, negatives, t1_negatives = torch.randint(0, 20, (6,)), torch.randint(0, 20, (6,)), torch.arange(1, 30)
    loss, count = masked(seq, "click", target, negatives)
    t1_loss, t1_count = masked(t1_seq, "t1", None, t1_negatives)
    joint_loss, joint_count = joint(seq, "click", target, negatives, ("t1", t1_seq, t1_negatives, 0.25))
    assert torch.equal(joint_count, count)
    assert torch.equal(joint_loss, loss + 0.25 * t1_loss * (count / t1_count))
    assert torch.equal(joint(seq, "click", target, negatives)[0], loss)


def _string_constants(tree: ast.AST) -> list[ast.Constant]:
    """String constants that are not docstrings (bare string statements)."""
    bare = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare
    ]


ALLOWED = {("conure_dist/cli.py", "conure")}
"""Strings equal to a method's name that are something else: the program's name."""


def test_no_module_outside_the_registry_names_a_method():
    registry = ROOT / "conure_dist/methods/registry.py"
    found = []
    for path in sorted((ROOT / "conure_dist").rglob("*.py")):
        if path == registry:
            continue
        rel = str(path.relative_to(ROOT))
        for node in _string_constants(ast.parse(path.read_text())):
            if node.value in METHODS and (rel, node.value) not in ALLOWED:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert found == []


def test_the_name_finder_finds_a_test_on_a_name():
    tree = ast.parse('"""Docstring: mtl."""\nx = 1\n"""peterrec"""\nif m == "mtl" or m in ("stl",):\n    pass\n')
    assert sorted(n.value for n in _string_constants(tree) if n.value in METHODS) == ["mtl", "stl"]
