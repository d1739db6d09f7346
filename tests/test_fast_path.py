"""The fast path (receptive-field-only last position, streamed sampled softmax) against the plain
eager path, in fp32 on CPU. Stated tolerance: rtol 1e-5, atol 1e-5 for losses, gradients, states
and scores. The fast path computes the same rows with the same formulas, but matrix kernels may
round differently for other row counts and the streamed softmax sums in another order.
"""

import pytest
import torch

from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.model.backbone import NextItNet
from conure_dist.model.chunked_softmax import negative_logsumexp

SPECS = [TaskSpec("t1", "sequence", 700), TaskSpec("clicks", "item", 90), TaskSpec("age", "class", 5)]


@pytest.mark.parametrize(
    ("dilations", "kernel", "length"),
    [([1, 4, 1, 4], 3, 30), ([1, 4] * 4, 3, 100), ([1, 2], 2, 9), ([8], 3, 5), ([1, 4], 3, 1)],
)
def test_last_position_pass_matches_full_pass(dilations, kernel, length):
    torch.manual_seed(len(dilations) * 100 + length)
    net = NextItNet(300, 16, kernel, dilations)
    seq = torch.randint(0, 300, (6, length))
    seq[:2, : length // 2] = 0
    fast = net(seq, last_only=True)
    assert fast.shape == (6, 16)
    torch.testing.assert_close(fast, net(seq)[:, -1], rtol=1e-5, atol=1e-5)


def test_last_position_windows_shrink_towards_the_top():
    net = NextItNet(10, 8, 3, [1, 4] * 4)  # the paper's TTL stack: dilations 1,2,4,8 x 4
    windows = net.last_position_windows(100)
    assert windows[-1] == (25, 17, 1)  # last block: conv(d=4) reads 2*4 more, conv(d=8) 2*8 more
    rows = sum(mid + out for _, mid, out in windows)
    assert rows / (2 * len(windows) * 100) == pytest.approx(0.604375)


def test_last_position_gradients_equal_full_pass():
    torch.manual_seed(3)
    nets = [NextItNet(200, 16, 3, [1, 4, 1, 4]) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    seq = torch.randint(1, 200, (5, 40))
    nets[0](seq, last_only=True).square().sum().backward()
    nets[1](seq)[:, -1].square().sum().backward()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)


def _pair(seed: int) -> tuple[ConureModel, ConureModel]:
    torch.manual_seed(seed)
    fast = ConureModel(700, SPECS, 32, 3, [1, 4, 1, 4])
    plain = ConureModel(700, SPECS, 32, 3, [1, 4, 1, 4], fast=False)
    plain.load_state_dict(fast.state_dict())
    fast.heads["t1"].chunk = 37  # many chunks, the last one partial
    return fast, plain


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, 700, (8, 25), generator=g)
    seq[:3, :10] = 0
    negatives = torch.randperm(699, generator=g)[:140] + 1
    negatives[0] = seq[4, 7]  # an accidental hit for some positions
    return seq, negatives


def test_streamed_sampled_softmax_matches_plain_loss_and_gradients():
    fast, plain = _pair(4)
    seq, negatives = _batch(4)
    (loss_f, count_f), (loss_p, count_p) = fast(seq, "t1", negatives=negatives), plain(seq, "t1", negatives=negatives)
    assert count_f == count_p == int(((seq[:, 1:] != 0) & (seq[:, :-1] != 0)).sum())
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-5)
    loss_f.backward()
    loss_p.backward()
    plain_grads = dict(plain.named_parameters())
    # Both paths send gradient to the same parameters (the whole backbone and T1's head), equal.
    with_grad = {name for name, param in fast.named_parameters() if param.grad is not None}
    assert with_grad == {name for name, param in plain_grads.items() if param.grad is not None}
    assert "backbone.embedding.weight" in with_grad and "heads.t1.weight" in with_grad
    for name in with_grad:
        grad = dict(fast.named_parameters())[name].grad
        torch.testing.assert_close(grad, plain_grads[name].grad, rtol=1e-5, atol=1e-5, msg=name)
    assert fast.heads["t1"].weight.grad.abs().sum() > 0 and fast.backbone.embedding.weight.grad.abs().sum() > 0


def test_streamed_sampled_softmax_masks_every_accidental_hit():
    # One negative only, equal to row 0's target: row 0 has no negative at all (lse = -inf),
    # its loss is 0 and it sends no gradient through the negatives; row 1 is a plain softmax.
    torch.manual_seed(5)
    hidden = torch.randn(2, 4, requires_grad=True)
    weight = torch.randn(3, 4, requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    negatives, target = torch.tensor([2]), torch.tensor([2, 1])
    lse = negative_logsumexp(hidden, weight[negatives], bias[negatives], negatives, target, chunk=1)
    assert lse[0] == float("-inf")
    torch.testing.assert_close(lse[1], hidden[1] @ weight[2])
    lse[1].backward()
    assert torch.isfinite(hidden.grad).all() and torch.equal(hidden.grad[0], torch.zeros(4))
    torch.testing.assert_close(hidden.grad[1], weight[2].detach())


def test_streamed_sampled_softmax_under_bf16_autocast_stays_close():
    fast, plain = _pair(6)
    seq, negatives = _batch(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_f, _ = fast(seq, "t1", negatives=negatives)
        loss_p, _ = plain(seq, "t1", negatives=negatives)
    assert loss_f.dtype == torch.float32
    torch.testing.assert_close(loss_f, loss_p, rtol=2e-3, atol=0.0)


def test_fast_and_plain_scores_agree_under_every_view():
    fast, plain = _pair(7)
    seq, _ = _batch(7)
    names = fast.prunable_names()
    ownership = TaskOwnership.empty({n: p.shape for n, p in fast.named_parameters() if n in names})
    weights = dict(fast.named_parameters())
    ownership.prune(1, {n: weights[n] for n in names}, 0.6)
    ownership.prune(2, {n: weights[n] for n in names}, 0.5)
    views = [MaskedModel(fast, ownership), MaskedModel(plain, ownership)]
    for task_id, task in enumerate(["t1", "clicks", "age"], start=1):
        for view in views:
            view.set_view("infer", task_id)
        with torch.no_grad():
            torch.testing.assert_close(views[0](seq, task), views[1](seq, task), rtol=1e-5, atol=1e-5, msg=task)
