"""A DeepSpeed engine per phase, on a real one-rank gloo group: closing a phase's engine unhooks
it, so earlier phases neither stay in memory nor keep reducing gradients."""

import gc
import logging
import os
import weakref

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from helpers import REPO

from conure_dist.config import DistConfig
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.dist import DistInfo
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.train.engine import build_engine
from conure_dist.train.phase import phase_parameters

pytestmark = pytest.mark.multiprocess
PHASES = 3


def _worker(rank: int, init: str, results: dict) -> None:
    from deepspeed.runtime.torch_autocast import get_comm_dtype
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    logging.disable(logging.WARNING)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what DeepSpeed reads from a launcher
    tdist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    calls: dict[int, int] = {}
    reduce = DeepSpeedZeroOptimizer.process_gradients

    def counted(self, *args):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return reduce(self, *args)

    DeepSpeedZeroOptimizer.process_gradients = counted
    try:
        torch.manual_seed(0)
        model = ConureModel(40, [TaskSpec("t1", "sequence", 40), TaskSpec("gender", "class", 2)], 8, 3, [1, 2])
        masked = MaskedModel(
            model, TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in model.prunable_names()})
        )
        masked.set_view("train", 1)
        cfg = DistConfig(engine="deepspeed", zero_stage=2, deepspeed_config=str(REPO / "configs/deepspeed/zero2.json"))
        dist = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
        seq, negatives = torch.randint(1, 40, (8, 10)), torch.randperm(39)[:8] + 1
        alive, per_step = [], []
        for _ in range(PHASES):
            engine = build_engine(masked, phase_parameters(model, "t1", False), 1e-2, 0.0, dist, cfg, per_rank_batch=8)
            calls.clear()
            engine.train_step([(seq, "t1", None, negatives)])
            per_step.append(sorted(calls.values()))
            refs = (weakref.ref(engine.engine), weakref.ref(engine.optimizer))
            engine.close()
            del engine
            gc.collect()
            alive.append(sum(ref() is not None for ref in refs))
        # In bf16 (autocast) every gradient is still exchanged in fp32, as under DDP.
        bf16 = DistConfig(
            engine="deepspeed",
            zero_stage=2,
            precision="bf16",
            deepspeed_config=str(REPO / "configs/deepspeed/zero2.json"),
        )
        engine = build_engine(masked, phase_parameters(model, "t1", False), 1e-2, 0.0, dist, bf16, per_rank_batch=8)
        comm = {str(get_comm_dtype(p)) for p in model.parameters()}
        engine.close()
        results[0] = (alive, per_step, len(masked._forward_hooks) + len(masked._forward_pre_hooks), comm)
    finally:
        DeepSpeedZeroOptimizer.process_gradients = reduce
        tdist.destroy_process_group()


def test_closed_deepspeed_engines_are_released(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", results), nprocs=1, join=True)
    alive, per_step, hooks, comm = results[0]
    assert comm == {"torch.float32"}
    assert alive == [0] * PHASES
    # One ZeRO optimizer reduces each trainable kernel and head tensor per step, in every phase.
    assert len(per_step) == PHASES and all(len(calls) == 1 for calls in per_step)
    assert per_step[0] == per_step[-1] and per_step[0][0] > 0
    assert hooks == 0
