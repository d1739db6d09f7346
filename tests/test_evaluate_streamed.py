"""Evaluation's streamed ranks: the materialized scores' ranks exactly, without ever holding the
[users, items] scores."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.data.manifest import TaskInfo
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.train import metrics
from conure_dist.train.evaluate import streamed_ranks
from conure_dist.train.metrics import target_ranks


def _view(num_items: int, tied: bool) -> MaskedModel:
    torch.manual_seed(0)
    specs = [TaskSpec("t1", "sequence", num_items), TaskSpec("click", "item", num_items - 7)]
    model = ConureModel(num_items, specs, 8, 3, [1, 2])
    names = model.prunable_names()
    weights = dict(model.named_parameters())
    ownership = TaskOwnership.empty({n: weights[n].shape for n in names})
    ownership.prune(1, {n: weights[n] for n in names}, 0.5)
    if tied:  # scores from the bias alone, three distinct values: ties everywhere
        with torch.no_grad():
            for head in model.heads.values():
                head.weight.zero_()
                head.bias.copy_(torch.randint(0, 3, head.bias.shape).float())
    view = MaskedModel(model, ownership).eval()
    view.set_view("infer", 1)
    return view


def _task(name: str, kind: str, view: MaskedModel) -> TaskInfo:
    return TaskInfo(name, kind, view.model.heads[name].weight.shape[0], None, None, "", {})


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_streamed_ranks_equal_the_materialized_scores_ranks(monkeypatch, tied, precision):
    view = _view(1500, tied)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, 1500, (67, 10), generator=g)
    seq[:9, :6] = 0
    monkeypatch.setattr(metrics, "SCORE_BLOCK_ELEMENTS", 67 * 300)  # 5 and 6 blocks of 300 items
    for name, kind in (("t1", "sequence"), ("click", "item")):
        task = _task(name, kind, view)
        target = seq[:, -1] if kind == "sequence" else torch.randint(0, task.num_items, (67,), generator=g)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            want = target_ranks(view(seq, name).float(), target)
            got = streamed_ranks(view, task, seq, target, compiled=False)
        assert torch.equal(got, want), name
        assert len(set(want.tolist())) > 10  # ranks spread out: the comparison means something


def test_evaluation_never_holds_the_users_by_items_scores(monkeypatch):
    num_users, num_items = 256, 20_000  # 20 MB of fp32 scores at once; the budget holds 1 MB
    monkeypatch.setattr(metrics, "SCORE_BLOCK_ELEMENTS", 1 << 18)
    view = _view(num_items, tied=False)
    task = _task("click", "item", view)
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(1, num_items, (num_users, 10), generator=g)
    target = torch.randint(0, num_items, (num_users,), generator=g)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        streamed_ranks(view, task, seq, target, compiled=False)
    largest = max(e.self_cpu_memory_usage for e in prof.events())  # what one op allocated
    assert largest <= 4 * metrics.SCORE_BLOCK_ELEMENTS < 4 * num_users * num_items / 16
