"""benchmarks/step_model.py: its FLOP counts are those of the real steps (torch's FLOP counter over
a forward and backward of the model), and its CPU prediction is read against a timed CPU step."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from helpers import REPO
from torch.utils.flop_counter import FlopCounterMode

from conure_dist.model import ConureModel, TaskSpec

sys.path.insert(0, str(REPO / "benchmarks"))
import step_model  # noqa: E402

SMALL = replace(step_model.CPU_CHECK, batch=4, seq_len=30, channels=16, items=500, later_batch=8, later_items=300)


def _model(s) -> ConureModel:
    torch.manual_seed(0)
    tasks = [TaskSpec("t1", "sequence", s.items), TaskSpec("later", "item", s.later_items)]
    return ConureModel(s.items, tasks, s.channels, s.kernel_size, list(s.dilations))


def _counted(model, *inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(*inputs)
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("masked_rows", [False, True])
def test_t1_flops_are_the_models(masked_rows):
    model, g = _model(SMALL), torch.Generator().manual_seed(1)
    model.masked_rows = masked_rows
    seq = torch.randint(1, SMALL.items, (SMALL.batch, SMALL.seq_len), generator=g)
    seq[0, :7] = 0  # padding: fewer predicted rows on the selecting path
    negatives = torch.randperm(SMALL.items - 1, generator=g)[: SMALL.negatives] + 1
    rows = SMALL.batch * (SMALL.seq_len - 1) if masked_rows else int(model.example_count(seq, "t1"))
    s = replace(SMALL, rows=rows)
    step = step_model.count_t1_step(s)
    want = _counted(model, seq, "t1", None, negatives)
    # The products only (element-wise work is counted in bytes): backbone convs and softmax.
    assert step.parts["backbone"].flops + step.parts["softmax"].flops == want
    assert step.parts["softmax"].flops == 8 * rows * s.negatives * s.channels
    backbone = sum(p.numel() for n, p in model.backbone.named_parameters() if "embedding" not in n)
    assert step_model.backbone_params(s) == backbone


def test_later_task_flops_are_the_models():
    model, g = _model(SMALL), torch.Generator().manual_seed(2)
    seq = torch.randint(1, SMALL.items, (SMALL.later_batch, SMALL.seq_len), generator=g)
    target, negative = (torch.randint(0, SMALL.later_items, (SMALL.later_batch,), generator=g) for _ in range(2))
    step = step_model.count_later_step(SMALL)
    # The last position's receptive field only (the fast path); the BPR head's dot products are
    # element-wise work for torch's counter.
    assert step.parts["backbone"].flops == _counted(model, seq, "later", target, negative)


def test_predictions_follow_the_cards_and_the_switches():
    ttl = step_model.Sizes()
    h100, h200 = step_model.CARDS["h100"], step_model.CARDS["h200"]
    t1 = step_model.count_t1_step(ttl)
    assert t1.parts["softmax"].flops == 8 * 256 * 99 * 129_200 * 256  # four products
    assert t1.per_second(h200) > t1.per_second(h100)  # more bandwidth, same FLOP/s
    unfolded = step_model.count_t1_step(replace(ttl, l2_folded=False))
    assert unfolded.parts["l2"].bytes == 5 * 4 * (2 * 646_000 * 256 + 646_000 + step_model.backbone_params(ttl))
    assert unfolded.seconds(h100) > t1.seconds(h100)
    chunked = step_model.count_t1_step(replace(ttl, softmax="chunked"))
    assert chunked.parts["softmax"].bytes > 3 * t1.parts["softmax"].bytes  # logits in memory
    partials = step_model.count_t1_step(replace(ttl, deterministic=True))
    assert partials.parts["softmax"].bytes > t1.parts["softmax"].bytes  # partials per pair of tiles
    evaluation = step_model.predict(ttl, h100)
    assert evaluation["eval_users_per_s_fused"] > evaluation["eval_users_per_s"]


@pytest.mark.slow
def test_the_cpu_prediction_is_within_a_factor_of_four_of_the_measured_step():
    """Stated tolerance: the model (roofline per part, CPU rates calibrated at the start) predicts
    the best of three timed CPU steps to within a factor of 4 either way (measured on 2 shared
    cores: ratios 1.3 to 2.5, up to 3.6 with other jobs running); benchmarks/results/
    step_model_cpu.json records the figures."""
    report = step_model.check_cpu(replace(step_model.CPU_CHECK, batch=8, items=10_000), steps=3)
    for task in ("t1", "later"):
        assert 1 / 4 < report[task]["ratio"] < 4, report[task]
