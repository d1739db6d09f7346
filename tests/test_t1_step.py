"""The T1 step's GPU-side forms on CPU: the L2 term folded into Adam is the same update as the
penalty in the loss, and scoring every position with padding's losses zeroed is the same loss
and gradients as selecting the predicted rows (no host synchronisation per step)."""

from __future__ import annotations

import copy

import pytest
import torch

from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.dist import DistInfo
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.train.engine import TorchEngine
from conure_dist.train.phase import phase_parameters

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)


def _model(fast: bool = True, prune_embedding: bool = False) -> ConureModel:
    torch.manual_seed(0)
    return ConureModel(60, [TaskSpec("t1", "sequence", 60)], 8, 3, [1, 2], fast=fast, prune_embedding=prune_embedding)


def _batches(steps: int) -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        seq = torch.randint(1, 60, (6, 12), generator=g)
        seq[:2, :5] = 0  # left padding: positions the task does not predict
        out.append((seq, "t1", None, torch.randperm(59, generator=g)[:20] + 1))
    return out


def _train(model: ConureModel, fold: bool, masked_rows: bool | None = None, view: tuple | None = None):
    engine = _engine(model, fold, masked_rows, view)
    losses = [engine.train_step([b]).item() for b in _batches(4)]
    return engine, losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _engine(model: ConureModel, fold: bool, masked_rows: bool | None = None, view: tuple | None = None):
    names = model.prunable_names()
    ownership = TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in names})
    if view:
        weights = dict(model.named_parameters())
        ownership.prune(1, {n: weights[n] for n in names}, 0.5)
    masked = MaskedModel(model, ownership)
    masked.set_view(*(view or ("train", 1)))
    model.masked_rows = masked_rows
    trainable = phase_parameters(model, "t1", first_phase=view is None)
    return TorchEngine(masked, trainable, 1e-2, 0.05, CPU, "fp32", fold_l2=fold)


def test_l2_folded_into_adam_is_the_same_update():
    engine, losses, weights = _train(_model(), fold=True)
    folded = {id(p) for p in engine.optimizer.param_groups[1]["params"]}
    assert engine.optimizer.param_groups[1]["weight_decay"] == 0.05
    assert {n for n, p in engine.trainable.items() if id(p) in folded} == set(engine.trainable)  # none frozen in T1
    _, want_losses, want = _train(_model(), fold=False)
    assert losses == pytest.approx(want_losses, rel=1e-6)
    for name, w in want.items():
        # The same update; the gradient's two terms are summed in another order (float rounding).
        torch.testing.assert_close(weights[name], w, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(want["heads.t1.weight"], _model().heads.t1.weight)  # it trained


def test_tensors_with_frozen_entries_keep_the_penalty_in_the_loss():
    engine, _, _ = _train(_model(prune_embedding=True), fold=True, view=("retrain", 1))
    penalized = set(engine.penalized)
    assert {"model.backbone.embedding.weight", "model.backbone.blocks.0.conv1.weight"} <= penalized
    assert "model.heads.t1.weight" not in penalized  # the head has no frozen entries
    assert len(engine.optimizer.param_groups) == 2
    clipped = TorchEngine(engine.masked, engine.trainable, 1e-2, 0.05, CPU, "fp32", clip_grad_norm=1.0, fold_l2=True)
    assert len(clipped.optimizer.param_groups) == 1 and set(clipped.penalized) == set(engine.trainable)
    on_cpu = TorchEngine(engine.masked, engine.trainable, 1e-2, 0.05, CPU, "fp32")
    assert len(on_cpu.optimizer.param_groups) == 1  # folding defaults to CUDA only


@pytest.mark.parametrize("view", [None, ("retrain", 1)])
@pytest.mark.parametrize("saved_folded", [False, True])
def test_optimizer_state_resumes_across_the_folded_and_plain_groupings(saved_folded, view):
    """A mid-phase checkpoint of one grouping (CPU: one group; CUDA: the folded tensors apart,
    which reorders them when some have frozen entries) resumes into the other: each tensor gets
    its own Adam moments, and the next steps are those of an uninterrupted run."""
    batches = _batches(4)
    model = _model(prune_embedding=view is not None)
    before = _engine(model, saved_folded, view=view)
    for b in batches[:2]:
        before.train_step([b])
    state = copy.deepcopy(before.state_dict())  # as saved: not the live moments
    resumed = copy.deepcopy(before.masked)  # the weights, the ownership and the view
    trainable = phase_parameters(resumed.model, "t1", first_phase=view is None)
    after = TorchEngine(resumed, trainable, 1e-2, 0.05, CPU, "fp32", fold_l2=not saved_folded)
    assert len(after.optimizer.param_groups) != len(before.optimizer.param_groups)
    after.load_state_dict(state)
    moments = {n: before.optimizer.state[p]["exp_avg"] for n, p in before.trainable.items()}
    for name, param in after.trainable.items():
        assert torch.equal(after.optimizer.state[param]["exp_avg"], moments[name]), name
    assert [g["weight_decay"] for g in after.optimizer.param_groups] == ([0.0] if saved_folded else [0.0, 0.05])
    for b in batches[2:]:
        before.train_step([b])
        after.train_step([b])
    for (name, want), got in zip(model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_optimizer_state_of_other_tensors_is_refused():
    model = _model()
    engine = _engine(model, False)
    engine.train_step([_batches(1)[0]])
    state = engine.state_dict()
    state["param_order"] = [n.replace("heads.t1", "heads.other") for n in state["param_order"]]
    with pytest.raises(ValueError, match=r"missing \['model.heads.t1.bias', 'model.heads.t1.weight'\]"):
        _engine(copy.deepcopy(model), True).load_state_dict(state)


@pytest.mark.parametrize("fast", [True, False])
def test_scoring_every_position_with_padding_zeroed_equals_selecting_rows(fast):
    losses, grads = {}, {}
    seq, _, _, negatives = _batches(1)[0]
    for masked_rows in (False, True):
        model = _model(fast)
        model.masked_rows = masked_rows
        loss_sum, count = model(seq, "t1", None, negatives)
        loss_sum.backward()
        losses[masked_rows], grads[masked_rows] = (
            (loss_sum, count),
            {n: p.grad.clone() for n, p in model.named_parameters()},
        )
    assert losses[True][1] == losses[False][1] == 6 * 11 - 2 * 5
    torch.testing.assert_close(losses[True][0], losses[False][0], rtol=1e-6, atol=1e-6)
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_masked_rows_defaults_to_selection_on_cpu():
    model = _model()
    assert model.masked_rows is None
    seq, _, _, negatives = _batches(1)[0]
    reference = copy.deepcopy(model)
    reference.masked_rows = False
    assert torch.equal(model(seq, "t1", None, negatives)[0], reference(seq, "t1", None, negatives)[0])
