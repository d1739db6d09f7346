"""Ownership records: nesting, disjointness, counts, and frozen weights that never move."""

import pytest
import torch

from conure_dist.config import DistConfig
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.dist import DistInfo
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.train.engine import build_engine

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)


def _model() -> ConureModel:
    torch.manual_seed(0)
    specs = [TaskSpec("t1", "sequence", 40), TaskSpec("b", "item", 15), TaskSpec("c", "class", 3)]
    return ConureModel(40, specs, 12, 3, [1, 2])


def _ownership(model: ConureModel) -> TaskOwnership:
    params = dict(model.named_parameters())
    return TaskOwnership.empty({n: params[n].shape for n in model.prunable_names()})


def test_prune_counts_and_keeps_largest_magnitudes():
    model = _model()
    own = _ownership(model)
    weights = dict(model.named_parameters())
    own.prune(1, weights, 0.7)
    for name, owner in own.owners.items():
        n = owner.numel()
        kept = owner == 1
        assert int(kept.sum()) == round(0.3 * n)
        w = weights[name].detach().abs()
        assert w[kept].min() >= w[~kept].max()
    cap = own.capacity()
    assert cap.owned[1] == pytest.approx(sum(round(0.3 * o.numel()) for o in own.owners.values()) / cap.total)
    assert cap.free == pytest.approx(1 - cap.owned[1])


def test_later_prunes_only_take_free_weights_and_masks_nest():
    model = _model()
    own = _ownership(model)
    weights = dict(model.named_parameters())
    own.prune(1, weights, 0.5)
    before = {n: o.clone() for n, o in own.owners.items()}
    with torch.no_grad():  # task-1 weights become the largest: pruning must still not take them
        for name, p in weights.items():
            if name in own.owners:
                p.copy_(torch.where(own.owners[name] == 1, p * 100, p))
    own.prune(2, weights, 0.5)
    own.prune(3, weights, 0.0)
    for name, owner in own.owners.items():
        assert torch.equal(owner[before[name] == 1], before[name][before[name] == 1])
        free_before = int((before[name] == 0).sum())
        assert int((owner == 2).sum()) == round(0.5 * free_before)
        assert int((owner == 0).sum()) == 0  # ratio 0 gives the rest to task 3
        # Nesting: inference masks grow with the task id; training masks are disjoint from frozen.
        infer = [own.masks(name, "infer", t)[1] for t in (1, 2, 3)]
        assert torch.all(infer[0] <= infer[1]) and torch.all(infer[1] <= infer[2])
        for t in (1, 2, 3):
            for mode in ("train", "retrain"):
                trainable, frozen = own.masks(name, mode, t)
                assert not torch.any(trainable & frozen)
    with pytest.raises(ValueError, match="not after"):
        own.prune(2, weights, 0.5)


def _steps(masked, trainable, mode_task, steps, l2):
    engine = build_engine(masked, trainable, lr=1e-2, l2=l2, dist=CPU, cfg=DistConfig())
    torch.manual_seed(5)
    for _ in range(steps):
        seq = torch.randint(1, 40, (8, 10))
        if mode_task == "b":
            engine.train_step([(seq, "b", torch.randint(0, 15, (8,)), torch.randint(0, 15, (8,)))])
        else:
            engine.train_step([(seq, "t1", None, torch.arange(1, 40))])
    return engine


@pytest.mark.parametrize("l2", [0.0, 0.1])
def test_frozen_and_excluded_weights_untouched_by_optimizer(l2):
    model = _model()
    own = _ownership(model)
    masked = MaskedModel(model, own)
    own.prune(1, dict(model.named_parameters()), 0.6)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}

    # Task 2, train phase: task-1 weights frozen, free weights trainable.
    masked.set_view("train", 2)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = {}
    for name, p in model.named_parameters():
        if name in own.names or name.startswith("heads.b."):
            p.requires_grad_(True)
            trainable[f"model.{name}"] = p
    engine = _steps(masked, trainable, "b", 20, l2)
    for name in own.names:
        p = dict(model.named_parameters())[name]
        t1 = own.owners[name] == 1
        assert torch.equal(p[t1], snapshot[name][t1]), name
        assert not torch.equal(p[~t1], snapshot[name][~t1]), f"{name}: free weights did not train"
        state = engine.optimizer.state[p]
        assert torch.count_nonzero(state["exp_avg"][t1]) == 0
        assert torch.count_nonzero(state["exp_avg_sq"][t1]) == 0
    for name, p in model.named_parameters():
        if not (name in own.names or name.startswith("heads.b.")):
            assert torch.equal(p, snapshot[name]), f"{name} moved"

    # Retrain: only task 2's weights move; free (excluded) and task-1 weights stay.
    own.prune(2, dict(model.named_parameters()), 0.5)
    masked.set_view("retrain", 2)
    after_train = {n: p.detach().clone() for n, p in model.named_parameters()}
    _steps(masked, trainable, "b", 10, l2)
    for name in own.names:
        p = dict(model.named_parameters())[name]
        mine = own.owners[name] == 2
        assert torch.equal(p[~mine], after_train[name][~mine])
        assert not torch.equal(p[mine], after_train[name][mine])


def test_excluded_weights_do_not_affect_inference():
    model = _model()
    own = _ownership(model)
    masked = MaskedModel(model, own)
    own.prune(1, dict(model.named_parameters()), 0.5)
    masked.set_view("infer", 1)
    seq = torch.randint(1, 40, (4, 10))
    with torch.no_grad():
        before = masked(seq, "t1")
        for name in own.names:
            p = dict(model.named_parameters())[name]
            p.add_(torch.where(own.owners[name] == 0, 1.0, 0.0))
        after = masked(seq, "t1")
    assert torch.equal(before, after)


def test_checksum_and_state_roundtrip():
    model = _model()
    own = _ownership(model)
    own.prune(1, dict(model.named_parameters()), 0.5)
    copy = TaskOwnership.from_state_dict(own.state_dict())
    assert copy.checksum() == own.checksum()
    next(iter(copy.owners.values())).view(-1)[0] ^= 1
    assert copy.checksum() != own.checksum()
