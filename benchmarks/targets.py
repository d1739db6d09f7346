"""The performance targets measured as real runs train and evaluate.

    python benchmarks/targets.py --device cuda --json OUT/targets.json
    python benchmarks/targets.py --device cpu --preset smoke --json OUT/targets.json   # seconds

Sections, each guarded (a failing one records its error and the next runs), the JSON rewritten
after each:

* ``t1_step``: T1's train phase as a run builds it: ``ConureModel`` (compiled backbone on CUDA,
  ``dist.compile: auto``), the masked view, ``TorchEngine`` with Adam and L2 (folded into Adam on
  CUDA), the run's autocast precision, sequences of ``seq_len`` items with left padding, 20% of
  the items as shared negatives drawn by the run's sampler on the CPU each step and copied as
  ``Phase`` copies them. Sequences/s and the step's peak device memory.
* ``later_step``: an item task's train phase after T1 was pruned (its masked view, BPR
  negatives from the popularity sampler, Adam and L2 over the convs and its head).
* ``eval``: ``evaluate_task``'s per-batch work in the precision runs evaluate in (fp32: the
  materialized scores and ``target_ranks``, or the fused ranks where ``auto`` picks them): users/s.
* ``eval_bf16``: the same under bf16 autocast, where ``auto`` ranks with the fused kernel on a
  GPU (runs do not evaluate so today: bf16 scores tie more often, which changes ranks).

On CPU only the ``smoke`` preset is meant: it checks that every section runs and the JSON is
complete, not the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from bench_report import environment

from conure_dist.compiled import compile_model, resolve
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.data.manifest import TaskInfo
from conure_dist.dist import DistInfo
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.train.batches import to_device
from conure_dist.train.engine import TorchEngine
from conure_dist.train.evaluate import _batch_sums, fused_table
from conure_dist.train.phase import phase_parameters
from conure_dist.train.samplers import PopularityNegativeSampler, SharedNegativeSampler

PRESETS = {
    "ttl": {
        "items": 646_000,
        "later_items": 646_000,
        "channels": 256,
        "dilations": [1, 4, 1, 4, 1, 4, 1, 4],
        "seq_len": 100,
        "batch": 256,
        "later_batch": 4096,
        "eval_users": 4096,
        "steps": 20,
    },
    "smoke": {
        "items": 2_000,
        "later_items": 500,
        "channels": 16,
        "dilations": [1, 4],
        "seq_len": 20,
        "batch": 8,
        "later_batch": 32,
        "eval_users": 64,
        "steps": 2,
    },
}
SECTIONS = ("t1_step", "later_step", "eval", "eval_bf16")
NEGATIVE_FRACTION, L2, BPR_RHO = 0.2, 0.02, 0.3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, steps: int, warmup: int = 3) -> dict[str, float]:
    """Seconds per call over ``steps`` calls after ``warmup``; peak device memory of the timed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    out = {"seconds_per_step": (time.perf_counter() - start) / steps}
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def sequences(batch: int, seq_len: int, items: int, g: torch.Generator) -> torch.Tensor:
    """Item sequences with left padding of varying length (a quarter of them shorter than seq_len)."""
    seq = torch.randint(1, items, (batch, seq_len), generator=g)
    pad = torch.randint(0, seq_len // 2, (batch,), generator=g) * (torch.rand(batch, generator=g) < 0.25)
    return seq.masked_fill(torch.arange(seq_len)[None, :] < pad[:, None], 0)


class Setup:
    """A model and its ownership as a run holds them: T1 and an item task, T1 pruned."""

    def __init__(self, cfg: dict[str, Any], dist: DistInfo, compile_setting: str) -> None:
        torch.manual_seed(0)
        tasks = [TaskSpec("t1", "sequence", cfg["items"]), TaskSpec("later", "item", cfg["later_items"])]
        self.model = ConureModel(cfg["items"], tasks, cfg["channels"], 3, cfg["dilations"]).to(dist.device)
        if resolve(compile_setting, dist.device):
            compile_model(self.model)
        names = self.model.prunable_names()
        self.ownership = TaskOwnership.empty({n: p.shape for n, p in self.model.named_parameters() if n in names})
        self.masked = MaskedModel(self.model, self.ownership)
        self.cfg, self.dist = cfg, dist
        self.g = torch.Generator().manual_seed(0)

    def prune_t1(self) -> None:
        weights = dict(self.model.named_parameters())
        self.ownership.prune(1, {n: weights[n] for n in self.model.prunable_names()}, 0.7)


def t1_step(setup: Setup, precision: str, steps: int) -> dict[str, Any]:
    cfg, dist = setup.cfg, setup.dist
    setup.masked.set_view("train", 1)
    engine = TorchEngine(setup.masked, phase_parameters(setup.model, "t1", True), 1e-3, L2, dist, precision)
    sampler = SharedNegativeSampler(cfg["items"], NEGATIVE_FRACTION)
    batches = [sequences(cfg["batch"], cfg["seq_len"], cfg["items"], setup.g) for _ in range(4)]
    state = {"i": 0}

    def step() -> None:
        seq = to_device(batches[state["i"] % len(batches)], dist.device)
        negatives = to_device(sampler.sample(setup.g), dist.device)
        engine.train_step([(seq, "t1", None, negatives)])
        state["i"] += 1

    out = timed(step, dist.device, steps)
    out["seq_per_s"] = cfg["batch"] / out["seconds_per_step"]
    out["negatives"] = sampler.num_negatives
    out["l2_folded"] = len(engine.optimizer.param_groups) > 1
    return out


def later_step(setup: Setup, precision: str, steps: int) -> dict[str, Any]:
    cfg, dist = setup.cfg, setup.dist
    setup.prune_t1()
    setup.masked.set_view("train", 2)
    engine = TorchEngine(setup.masked, phase_parameters(setup.model, "later", False), 1e-4, L2, dist, precision)
    counts = np.random.default_rng(0).zipf(1.3, cfg["later_items"]).astype(np.int64)
    sampler = PopularityNegativeSampler(counts, BPR_RHO)
    seq = sequences(cfg["later_batch"], cfg["seq_len"], cfg["items"], setup.g)
    target = torch.randint(0, cfg["later_items"], (cfg["later_batch"],), generator=setup.g)

    def step() -> None:
        negatives = to_device(sampler.sample(cfg["later_batch"], setup.g), dist.device)
        engine.train_step([(to_device(seq, dist.device), "later", to_device(target, dist.device), negatives)])

    out = timed(step, dist.device, steps)
    out["seq_per_s"] = cfg["later_batch"] / out["seconds_per_step"]
    return out


def evaluation(setup: Setup, steps: int, bf16: bool = False) -> dict[str, Any]:
    """One evaluation batch of the later task per call, as ``evaluate_task`` computes it
    (``bf16``: under bf16 autocast)."""
    cfg, dist = setup.cfg, setup.dist
    setup.masked.set_view("infer", 2)
    setup.masked.eval()
    info = TaskInfo("later", "item", cfg["later_items"], None, None, "", {})
    seq = to_device(sequences(cfg["eval_users"], cfg["seq_len"], cfg["items"], setup.g), dist.device)
    target = to_device(torch.randint(0, cfg["later_items"], (cfg["eval_users"],), generator=setup.g), dist.device)
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        table = fused_table(setup.masked, info, dist.device)
    compiled = setup.model.compiled

    @torch.no_grad()
    def run() -> None:
        with autocast:
            _batch_sums(setup.masked, info, seq, target, [5, 10], table, compiled)

    out = timed(run, dist.device, steps, warmup=2)
    out["users_per_s"] = cfg["eval_users"] / out["seconds_per_step"]
    out["fused_ranks"] = table is not None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ttl")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--compile", choices=["auto", "always", "never"], default="auto")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg = dict(PRESETS[args.preset])
    steps = args.steps or cfg["steps"]
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dist = DistInfo(0, 1, 0, device, None)
    report: dict[str, Any] = {
        **environment("benchmarks/targets.py", argv, args.device),
        "preset": args.preset,
        "sizes": cfg,
        "precision": precision,
        "l2": L2,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    setup = Setup(cfg, dist, args.compile)
    sections = {
        "t1_step": lambda: t1_step(setup, precision, steps),
        "later_step": lambda: later_step(setup, precision, steps),
        "eval": lambda: evaluation(setup, steps),
        "eval_bf16": lambda: evaluation(setup, steps, bf16=True),
    }
    for name in SECTIONS:
        if name not in args.only:
            continue
        try:
            report[name] = sections[name]()
        except Exception as exc:  # recorded; the next section still runs
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as f:
                f.write(json.dumps(report, indent=2) + "\n")
        print(name, json.dumps({k: v for k, v in report[name].items() if k != "traceback"}), flush=True)
    sys.exit(1 if any("error" in report.get(s, {}) for s in args.only) else 0)


if __name__ == "__main__":
    main()
