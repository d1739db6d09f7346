"""A torchrun worker for test_comm_model: T1's train phase and a later task's train phase, with
the bytes every collective was handed counted at the seam (``train.step_timing``), and the
communication model's bytes for the same steps: exact from each step's batch (the touched rows
of every rank, gathered outside the counted exchange) and dense sizes from the config alone.

    torchrun --standalone --nproc_per_node N tests/comm_bytes_worker.py CONFIG OUT.json [KEY=VALUE ...]
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch.distributed as tdist

from conure_dist.config import load_config
from conure_dist.dist import process_group
from conure_dist.scaling.comm_model import ddp_step, touched_rows
from conure_dist.scaling.shapes import phase_shapes
from conure_dist.train.context import build_context, task_specs
from conure_dist.train.exchange_choice import table_kind
from conure_dist.train.phase import Phase
from data_tools.prepare import build_missing_shards


def run_phase(ctx, index: int, shape) -> dict:
    dist = ctx.dist
    phase = Phase(ctx, index, "train", ctx.cfg.tasks[index])
    sparse = [t for t in shape.tables if t.name in phase.exchange.row_sparse]
    dense_bytes = shape.dense_bytes + sum(t.bytes for t in shape.tables if t not in sparse)
    exact: Counter[str] = Counter()
    original = phase.engine.train_step

    def step(micro_batches):
        seq, _, _, negatives = micro_batches[0]
        rows = {k: v.tolist() for k, v in touched_rows(seq, negatives).items()}
        ranks = [rows]
        if dist.is_distributed:
            ranks = [None] * dist.world_size
            tdist.all_gather_object(ranks, rows)
        kinds = [table_kind(t.name) for t in sparse]
        local = [[len(r[k]) for k in kinds] for r in ranks]
        union = [len(set().union(*(r[k] for r in ranks))) for k in kinds]
        exact.update(ddp_step(dist.world_size, dense_bytes, sparse, local, union).by_collective())
        return original(micro_batches)

    phase.engine.train_step = step
    try:
        phase.run()
    finally:
        del phase.engine.train_step  # no engine -> step -> engine cycle outliving the process group
    timing = phase.timing()
    return {
        "task": phase.info.name,
        "steps": phase.timer.steps,
        "measured": dict(phase.timer.comm.bytes),
        "exact": dict(exact),
        "expected_per_step": timing["predicted_bytes_per_step"],
        "row_sparse": phase.exchange.row_sparse,
    }


def main() -> None:
    config, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    timing = ["train.step_timing=true", "train.timing_warmup_steps=0", "train.validation=false"]
    cfg = load_config(config, timing + overrides)
    with process_group(cfg.dist) as dist:
        build_missing_shards(cfg.data, dist)
        ctx = build_context(cfg, None, dist)
        shapes = {(s.task, s.mode): s for s in phase_shapes(cfg, ctx.manifest.num_seq_items, task_specs(ctx.infos))}
        results = [run_phase(ctx, 0, shapes[(ctx.infos[0].name, "train")])]
        ctx.prune(0, cfg.tasks[0].prune_ratio)
        results.append(run_phase(ctx, 1, shapes[(ctx.infos[1].name, "train")]))
        gathered = [None] * dist.world_size
        if dist.is_distributed:
            tdist.all_gather_object(gathered, results)
        else:
            gathered = [results]
    if dist.is_main:
        with open(out, "w") as f:
            json.dump({"world_size": dist.world_size, "ranks": gathered}, f)


if __name__ == "__main__":
    main()
