"""Data-parallel throughput and gradient traffic on CPU (gloo).

    python benchmarks/dist_cpu.py --json benchmarks/results/dist_cpu_1proc.json
    torchrun --standalone --nproc_per_node 2 benchmarks/dist_cpu.py --json benchmarks/results/dist_cpu_2proc.json

Measures, on the quick-start model and data, optimizer steps per second in T1 and in a later
task (item recommendation, after T1 was pruned), and the bytes exchanged per step per rank:
DDP's dense gradient buckets (counted by a communication hook) and, separately, the row-sparse
exchange of T1's item tables (embedding, softmax), which stay out of DDP's buckets. A ring all-reduce of S bytes sends
and receives about 2 (W-1)/W * S bytes per rank.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as tdist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from conure_dist.config import load_config
from conure_dist.data.stream import iter_batches
from conure_dist.dist import process_group
from conure_dist.train.batches import negative_drawer
from conure_dist.train.context import RunContext, build_context
from conure_dist.train.engine import TorchEngine
from conure_dist.train.phase import phase_parameters
from data_tools.prepare import build_missing_shards


def measure(trainer: RunContext, task_index: int, steps: int) -> dict:
    info, task_cfg, dist = trainer.infos[task_index], trainer.cfg.tasks[task_index], trainer.dist
    trainer.masked.set_view("train", task_index + 1)
    trainable = phase_parameters(trainer.model, info.name, task_index == 0)
    engine = TorchEngine(
        trainer.masked,
        trainable,
        task_cfg.lr,
        task_cfg.l2,
        dist,
        "fp32",
        row_sparse=[f"model.{n}" for n in trainer.model.item_table_names()],
    )
    reduced, sparse = [0], [0]
    if dist.is_distributed:

        def counting_hook(state, bucket):
            reduced[0] += bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(state, bucket)

        engine.module.register_comm_hook(None, counting_hook)
    draw = negative_drawer(trainer.cfg, trainer.manifest, trainer.dist, info, task_cfg.batch_size)
    generator = torch.Generator().manual_seed(0)
    batches = iter_batches(
        trainer.manifest,
        info.name,
        "train",
        task_cfg.batch_size // dist.world_size,
        shuffle=True,
        seed=0,
        epoch=0,
        rank=dist.rank,
        world_size=dist.world_size,
        num_steps=steps + 5,
        drop_last=True,
    )
    for step, batch in enumerate(batches):
        if step == 5:  # warm-up excluded
            reduced[0] = 0
            if dist.is_distributed:
                tdist.barrier()
            start = time.perf_counter()
            sparse[0] = 0
        target = None if batch.target is None else batch.target
        engine.train_step([(batch.seq, info.name, target, draw(generator))])
        if engine.sparse is not None:
            sparse[0] += engine.sparse.bytes_last_step
    elapsed = time.perf_counter() - start
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    return {
        "task": info.name,
        "global_batch": task_cfg.batch_size,
        "steps_per_s": steps / elapsed,
        "sequences_per_s": steps * task_cfg.batch_size / elapsed,
        "allreduced_bytes_per_step_per_rank": reduced[0] / steps,
        "row_sparse_bytes_per_step_per_rank": sparse[0] / steps,
        "ring_wire_bytes_per_step_per_rank": 2 * (dist.world_size - 1) / dist.world_size * reduced[0] / steps,
        "trainable_parameter_bytes": trainable_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", help="write the figures here (rank 0)")
    args = parser.parse_args()
    cfg = load_config(args.config, ["train.progress=false"])
    with process_group(cfg.dist) as dist:
        build_missing_shards(cfg.data, dist)  # as `conure run` does on first use
        trainer = build_context(cfg, None, dist)
        results = {
            "world_size": dist.world_size,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "config": args.config,
            "t1": measure(trainer, 0, args.steps),
        }
        trainer.prune(0, cfg.tasks[0].prune_ratio)
        results["later"] = measure(trainer, 1, args.steps)
    if dist.is_main:
        text = json.dumps(results, indent=1)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
