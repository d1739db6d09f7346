"""``dist.compile``: the compiled backbone and hot kernels compute what the eager code does.

On CPU ``torch.compile`` builds C++ kernels where a GPU gets Triton ones, but the graphs captured
(and so the math) are the same. Tolerance as for the fast path: rtol/atol 1e-5 in fp32; ranks
are integers and must be equal.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from conure_dist import compiled
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.model.chunked_softmax import negative_logsumexp
from conure_dist.train.metrics import streamed_target_ranks, target_ranks

SPECS = [TaskSpec("t1", "sequence", 60), TaskSpec("clicks", "item", 25)]


@pytest.fixture
def compiling():
    torch._dynamo.reset()  # count this test's graphs only
    yield
    torch._dynamo.reset()


def _two_sum_ranks(scores_NV, target_N):
    """The rank as two separate counts: strictly higher scores, then ties with a lower id."""
    target_scores = scores_NV.gather(1, target_N[:, None])
    ids = torch.arange(scores_NV.shape[1])
    tied_before = (scores_NV == target_scores) & (ids[None, :] < target_N[:, None])
    return (scores_NV > target_scores).sum(dim=1) + tied_before.sum(dim=1)


def _softmax_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(37, 8, generator=g)
    weight, bias = torch.randn(60, 8, generator=g), torch.randn(60, generator=g)
    negatives = torch.randperm(59, generator=g)[:11] + 1
    target = torch.randint(1, 60, (37,), generator=g)
    target[:5] = negatives[:5]  # accidental hits
    return hidden, weight, bias, negatives, target


def _lse_and_grads(case, chunk: int, on: bool):
    hidden, weight, bias, negatives, target = (t.clone() for t in case)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    lse = negative_logsumexp(hidden, weight[negatives], bias[negatives], negatives, target, chunk, compiled=on)
    (lse * torch.linspace(0.5, 1.5, lse.shape[0])).sum().backward()
    return lse.detach(), hidden.grad, weight.grad, bias.grad


@pytest.mark.slow
def test_compiled_softmax_kernels_and_ranks_match_eager(compiling):
    case = _softmax_case(0)
    eager = _lse_and_grads(case, chunk=4, on=False)
    scores = torch.randint(0, 4, (9, 30)).float()  # many ties: the id order decides
    target = torch.randint(0, 30, (9,))
    eager_ranks = target_ranks(scores, target)
    assert counters["stats"]["unique_graphs"] == 0  # eager calls build no graph
    for chunk in (4, 11):  # a short last block, then a single block
        for got, want in zip(_lse_and_grads(case, chunk, on=True), eager, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(target_ranks(scores, target, compiled=True), eager_ranks)
    assert torch.equal(eager_ranks, _two_sum_ranks(scores, target))
    blocks = streamed_target_ranks(
        lambda rows, a, b: scores[:, a:b] if rows is None else scores[rows, a:b], target, 30, 7, compiled=True
    )
    assert torch.equal(blocks, eager_ranks)  # the streamed count of evaluation, compiled
    assert counters["stats"]["unique_graphs"] >= 3  # the two softmax kernels and the ranks ran compiled


@pytest.mark.slow
def test_compiled_backbone_keeps_names_and_matches_eager_under_views(compiling):
    torch.manual_seed(3)
    model = ConureModel(60, SPECS, 16, 3, [1, 2])
    reference = ConureModel(60, SPECS, 16, 3, [1, 2])
    reference.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    names = model.prunable_names()
    ownership = TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in names})
    weights = dict(model.named_parameters())
    ownership.prune(1, {n: weights[n] for n in names}, 0.6)
    compiled.compile_model(model)  # resets dynamo: count from here
    assert list(model.state_dict()) == keys
    assert model.heads["t1"].chunk == compiled.COMPILED_SOFTMAX_CHUNK
    # Compilation belongs to the model: the reference built in the same process stays eager.
    assert model.compiled and model.heads["t1"].compiled
    assert not reference.compiled and not reference.heads["t1"].compiled

    views = MaskedModel(model, ownership), MaskedModel(reference, ownership)
    seq = torch.randint(1, 60, (6, 12))
    seq[:2, :4] = 0
    target, negative = torch.randint(0, 25, (6,)), torch.randint(0, 25, (6,))
    t1_negatives = torch.randperm(59)[:20] + 1
    steps = [
        ("train", 1, "t1", (None, t1_negatives)),
        ("train", 2, "clicks", (target, negative)),
        ("infer", 1, "t1", ()),
        ("infer", 2, "clicks", ()),
    ]
    for mode, task_id, task, extra in steps:
        for view in views:
            view.set_view(mode, task_id)
        if mode == "train":
            grads = []
            for view in views:
                view.model.zero_grad(set_to_none=True)
                loss, _ = view(seq, task, *extra)
                loss.backward()
                grads.append([view.model.get_parameter(n).grad for n in names])
            for got, want in zip(*grads, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=task)
        else:
            graphs = counters["stats"]["unique_graphs"]
            with torch.no_grad():
                got, want = views[0](seq, task), views[1](seq, task)
            # Inference runs no @hot function: a new graph here is the backbone's.
            assert counters["stats"]["unique_graphs"] == graphs + 1, task
            keep = torch.isfinite(want)  # T1's padding id scores -inf
            assert torch.equal(keep, torch.isfinite(got))
            torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5, msg=task)
