"""Backbone and heads: causality, shapes, sampled softmax semantics."""

import torch

from conure_dist.model import ConureModel, TaskSpec
from conure_dist.model.backbone import CausalConv1d, NextItNet


def test_causal_conv_never_sees_future_positions():
    torch.manual_seed(0)
    conv = CausalConv1d(8, 8, kernel_size=3, dilation=2)
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(2, 12, 8, requires_grad=True)
    y = conv(x)
    for j in range(12):
        (grad,) = torch.autograd.grad(y[:, j].sum(), x, retain_graph=True)
        touched = grad.abs().sum(dim=(0, 2)).nonzero().flatten().tolist()
        assert max(touched) == j, f"output {j} reads inputs {touched}"
        # Exactly the dilated taps j, j-2, j-4 (those inside the sequence).
        assert touched == [p for p in (j - 4, j - 2, j) if p >= 0]


def test_causal_conv_matches_reference_convolution():
    torch.manual_seed(1)
    conv = CausalConv1d(5, 7, kernel_size=3, dilation=4)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(3, 20, 5)
    # Conv1d weight layout [out, in, k]; ours is [k, in, out].
    ref = torch.nn.functional.conv1d(
        torch.nn.functional.pad(x.transpose(1, 2), (8, 0)), conv.weight.permute(2, 1, 0), conv.bias, dilation=4
    ).transpose(1, 2)
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)


def test_backbone_is_causal_end_to_end():
    torch.manual_seed(2)
    net = NextItNet(50, 16, 3, [1, 4, 1, 4])
    seq = torch.randint(1, 50, (4, 30))
    changed = seq.clone()
    changed[:, 20:] = torch.randint(1, 50, (4, 10))
    h1, h2 = net(seq), net(changed)
    assert torch.equal(h1[:, :20], h2[:, :20])
    assert not torch.allclose(h1[:, 20:], h2[:, 20:])


def test_sampled_softmax_masks_accidental_hits_and_ignores_padding():
    torch.manual_seed(3)
    model = ConureModel(30, [TaskSpec("t1", "sequence", 30)], 8, 3, [1])
    seq = torch.tensor([[0, 0, 5, 6, 7], [0, 3, 4, 5, 6]])
    negatives = torch.tensor([5, 6, 7, 8, 9])
    loss_sum, count = model(seq, "t1", None, negatives)
    # Recompute by hand: positions with a real input and a real target only.
    hidden = model.backbone(seq[:, :-1])
    head = model.heads["t1"]
    losses = []
    for b in range(2):
        for j in range(4):
            inp, tgt = seq[b, j].item(), seq[b, j + 1].item()
            if inp == 0 or tgt == 0:
                continue
            h = hidden[b, j]
            pos = h @ head.weight[tgt] + head.bias[tgt]
            negs = [n for n in negatives.tolist() if n != tgt]
            neg = h @ head.weight[negs].T + head.bias[negs]
            losses.append(-torch.log_softmax(torch.cat([pos[None], neg]), 0)[0])
    assert count == len(losses) == 5
    torch.testing.assert_close(loss_sum, torch.stack(losses).sum())


def test_scores_cover_all_candidates():
    model = ConureModel(
        30, [TaskSpec("t1", "sequence", 30), TaskSpec("a", "item", 11), TaskSpec("c", "class", 4)], 8, 3, [1]
    )
    seq = torch.randint(1, 30, (5, 6))
    t1 = model(seq, "t1")
    assert t1.shape == (5, 30) and torch.isinf(t1[:, 0]).all()
    # Scores are the head applied to the last position's state (for T1: of the sequence minus
    # its last item, the target in evaluation); padding id 0 never ranks.
    with torch.no_grad():
        last = model.backbone(seq[:, :-1])[:, -1]
        head = model.heads["t1"]
        torch.testing.assert_close(t1[:, 1:], (last @ head.weight.T + head.bias)[:, 1:])
        state = model.backbone(seq)[:, -1]
        torch.testing.assert_close(model(seq, "a"), state @ model.heads["a"].weight.T + model.heads["a"].bias)
        torch.testing.assert_close(model(seq, "c"), model.heads["c"].linear(state))
    assert model(seq, "a").shape == (5, 11)
    assert model(seq, "c").shape == (5, 4)
    loss_sum, count = model(seq, "a", torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long))
    assert loss_sum.ndim == 0 and count == 5


def test_reset_parameters_reinitialises_every_parameter():
    torch.manual_seed(5)
    net = NextItNet(40, 8, 3, [1, 2])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.reset_parameters(0.02)
    for block in net.blocks:
        for norm in (block.norm1, block.norm2):
            assert torch.equal(norm.weight, torch.ones(8)) and torch.equal(norm.bias, torch.zeros(8))
        for conv in (block.conv1, block.conv2):
            assert torch.equal(conv.bias, torch.zeros(8))
            # Fresh normal weights (std 1/sqrt(fan-in) = 0.2 here), no longer centred on +1.
            assert conv.weight.mean().abs() < 0.1 and 0.1 < conv.weight.std() < 0.3
    assert torch.equal(net.embedding.weight[0], torch.zeros(8)) and net.embedding.weight.abs().max() < 0.2
