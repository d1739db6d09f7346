"""Gradient accumulation (``train.grad_accum``): a step split into micro-batches updates the
model as the whole batch does, under the plain engine and DeepSpeed."""

import logging
import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from helpers import REPO, tiny_config

from conure_dist.config import DistConfig, load_config
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.dist import DistInfo
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.train.batches import micro_batches
from conure_dist.train.context import build_context
from conure_dist.train.engine import TorchEngine, build_engine
from conure_dist.train.phase import phase_parameters

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
SPECS = [TaskSpec("t1", "sequence", 50), TaskSpec("click", "item", 20), TaskSpec("age", "class", 4)]


def _model() -> tuple[ConureModel, MaskedModel]:
    torch.manual_seed(0)
    model = ConureModel(50, SPECS, 8, 3, [1, 2])
    names = model.prunable_names()
    ownership = TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in names})
    return model, MaskedModel(model, ownership)


def _batch(task: str, g: torch.Generator) -> tuple:
    seq = torch.randint(1, 50, (12, 9), generator=g)
    seq[:4, :5] = 0  # left padding: micro-batches hold different numbers of T1 positions
    if task == "t1":
        return seq, None, torch.randperm(49, generator=g)[:15] + 1, True
    if task == "click":
        return seq, torch.randint(0, 20, (12,), generator=g), torch.randint(0, 20, (12,), generator=g), False
    return seq, torch.randint(0, 4, (12,), generator=g), None, False


def test_micro_batches_deal_instances_as_the_stride_partition():
    seq, target, negatives = torch.arange(12)[:, None].expand(12, 3), torch.arange(12), torch.arange(100, 112)
    parts = micro_batches(3, seq, "click", target, negatives, shared=False)
    assert [p[2].tolist() for p in parts] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    assert [p[3].tolist() for p in parts] == [[100, 103, 106, 109], [101, 104, 107, 110], [102, 105, 108, 111]]
    assert all(torch.equal(p[0][:, 0], p[2]) for p in parts)
    shared = micro_batches(2, seq, "t1", None, negatives, shared=True)
    assert all(p[3] is negatives and p[2] is None for p in shared)
    (whole,) = micro_batches(1, seq, "click", target, negatives, shared=False)
    assert whole[0] is seq and whole[3] is negatives  # one part: the batch itself, no copy


@pytest.mark.parametrize("task", ["t1", "click", "age"])
def test_accumulated_step_matches_the_whole_batch(task):
    g = torch.Generator().manual_seed(1)
    seq, target, negatives, shared = _batch(task, g)
    after, means = [], []
    for k in (1, 2, 3):
        model, masked = _model()
        masked.set_view("train", 1 if task == "t1" else 2)
        trainable = phase_parameters(model, task, first_phase=task == "t1")
        engine = TorchEngine(masked, trainable, 1e-2, 0.05, CPU, "fp32")
        means.append(engine.train_step(micro_batches(k, seq, task, target, negatives, shared)).item())
        after.append({n: p.detach().clone() for n, p in trainable.items()})
    initial = {f"model.{n}": p for n, p in _model()[0].named_parameters()}
    moved = max((value - initial[n]).abs().max().item() for n, value in after[0].items())
    assert moved > 1e-3
    for k_after, k_mean in zip(after[1:], means[1:], strict=True):
        assert k_mean == pytest.approx(means[0], rel=1e-6)
        for name, value in after[0].items():
            torch.testing.assert_close(k_after[name], value, rtol=0, atol=2e-6, msg=name)


def test_batch_sizes_must_split_into_micro_batches(tmp_path):
    cfg = load_config(str(tiny_config(tmp_path, [("t1", 0.5), ("click", 0.5)])), ["train.grad_accum=3"])
    with pytest.raises(
        ValueError,
        match=r"tasks.0.batch_size=32 is not divisible by the world size 1 x "
        r"train.grad_accum 3",
    ):
        build_context(cfg, None, CPU)
    with pytest.raises(ValueError, match=r"key 'train.grad_accum': must be >= 1, got 0 \(set by the override"):
        load_config(str(tiny_config(tmp_path, [("t1", 0.5)])), ["train.grad_accum=0"])


def _deepspeed_worker(rank: int, init: str, results: dict) -> None:
    logging.disable(logging.WARNING)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what DeepSpeed reads from a launcher
    tdist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        dist = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
        cfg = DistConfig(engine="deepspeed", zero_stage=2, deepspeed_config=str(REPO / "configs/deepspeed/zero2.json"))
        seq, _, negatives, _ = _batch("t1", torch.Generator().manual_seed(2))
        out = []
        for k in (1, 2):
            model, masked = _model()
            masked.set_view("train", 1)
            trainable = phase_parameters(model, "t1", first_phase=True)
            engine = build_engine(masked, trainable, 1e-2, 0.05, dist, cfg, per_rank_batch=12, grad_accum=k)
            mean = engine.train_step(micro_batches(k, seq, "t1", None, negatives, shared=True)).item()
            steps = engine.engine.global_steps
            engine.close()
            out.append((mean, steps, {n: p.detach().clone() for n, p in trainable.items()}))
        results[0] = out
    finally:
        tdist.destroy_process_group()


@pytest.mark.multiprocess
def test_deepspeed_accumulates_micro_batches_into_one_step(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_deepspeed_worker, args=(f"file://{tmp_path / 'store'}", results), nprocs=1, join=True)
    (mean1, steps1, after1), (mean2, steps2, after2) = results[0]
    assert steps1 == steps2 == 1  # two micro-batches, one optimizer step
    assert mean2 == pytest.approx(mean1, rel=1e-6)
    for name, value in after1.items():
        torch.testing.assert_close(after2[name], value, rtol=0, atol=2e-6, msg=name)
