"""Capacity: automatic prune ratios against the fixed ones, and a twelve-task run that grows.

    python benchmarks/capacity.py --seeds 0 1 2 3 4 --out runs/bench_capacity

1. ``auto``: the quick start (``configs/quickstart.yaml``) with its fixed ratios, and again with
   ``prune_ratio: auto`` for every task (default candidates, ``--tolerance``), seed by seed.
   Reported per task: the ratios chosen, the free fraction left after the last task (the
   capacity saved is the difference), and the test score, each a 95% interval over the seeds and
   the paired difference auto - fixed.
2. ``growth``: ``configs/growth_12tasks.yaml`` on ``python -m data_tools.synthetic_tasks`` data,
   once with ``continual.min_free_fraction=0`` (a fixed backbone: how far it gets) and once as
   configured (it grows): tasks finished, blocks, free fraction, every task's score against its
   reference, and whether any earlier task's score moved.

Writes ``benchmarks/results/capacity_cpu.json`` (or ``--json``) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from conure_dist.config import load_config
from conure_dist.dist import DistInfo
from conure_dist.experiment.stats import interval, paired
from conure_dist.train.loop import run_conure
from conure_dist.train.state import CapacityError
from data_tools.prepare import build_missing_shards
from data_tools.synthetic_tasks import write_synthetic_tasks

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)


def _run(config: Path, overrides: list[str], out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    cfg = load_config(config, ["train.progress=false", "train.sinks=[]", *overrides])
    build_missing_shards(cfg.data, CPU)  # as `conure run` does on first use
    report = run_conure(cfg, str(out), CPU)
    report["bench_seconds"] = time.perf_counter() - start
    return report


def auto_against_fixed(seeds: list[int], tolerance: float, out: Path) -> dict[str, Any]:
    config = REPO / "configs" / "quickstart.yaml"
    runs: dict[str, list[dict[str, Any]]] = {"fixed": [], "auto": []}
    for seed in seeds:
        base = [f"seed={seed}", f"data.root={out / 'data_quickstart'}"]
        runs["fixed"].append(_run(config, base, out / f"fixed_s{seed}"))
        runs["auto"].append(
            _run(
                config,
                [*base, "tasks.*.prune_ratio=auto", f"tasks.*.prune_tolerance={tolerance}"],
                out / f"auto_s{seed}",
            )
        )
    tasks = [t["name"] for t in runs["fixed"][0]["tasks"]]
    per_task = {}
    for i, task in enumerate(tasks):
        score = {k: [r["matrix"][i][i] for r in v] for k, v in runs.items()}
        per_task[task] = {
            "fixed_ratio": runs["fixed"][0]["capacity"][i]["prune_ratio"],
            "auto_ratios": [r["capacity"][i]["prune_ratio"] for r in runs["auto"]],
            "probes": [len(r["prune_search"][task]["probes"]) for r in runs["auto"]],
            "score_fixed": interval(score["fixed"]),
            "score_auto": interval(score["auto"]),
            "score_auto_minus_fixed": paired(score["auto"], score["fixed"]),
        }
    free = {k: [r["capacity"][-1]["free_fraction"] for r in v] for k, v in runs.items()}
    return {
        "config": "configs/quickstart.yaml",
        "tolerance": tolerance,
        "seeds": seeds,
        "tasks": per_task,
        "free_after_last_fixed": interval(free["fixed"]),
        "free_after_last_auto": interval(free["auto"]),
        "free_auto_minus_fixed": paired(free["auto"], free["fixed"]),
        "seconds": {k: interval([r["bench_seconds"] for r in v]) for k, v in runs.items()},
    }


def twelve_tasks(out: Path) -> dict[str, Any]:
    config = REPO / "configs" / "growth_12tasks.yaml"
    data = out / "data_tasks12"
    if not (data / "manifest.json").exists():
        write_synthetic_tasks(str(data), 12, instances_per_shard=2000)
    result: dict[str, Any] = {"config": "configs/growth_12tasks.yaml"}
    try:
        _run(config, [f"data.root={data}", "continual.min_free_fraction=0"], out / "fixed12")
        result["fixed_backbone"] = "finished every task"
    except CapacityError as exc:
        result["fixed_backbone"] = f"CapacityError: {exc}"
    report = _run(config, [f"data.root={data}"], out / "grow12")
    matrix = report["matrix"]
    result.update(
        {
            "tasks_finished": len(matrix),
            "growth": report["growth"],
            "blocks": [c["num_blocks"] for c in report["capacity"]],
            "free_after_each_task": [round(c["free_fraction"], 4) for c in report["capacity"]],
            "score": {t["name"]: matrix[i][i] for i, t in enumerate(report["tasks"])},
            "reference": report["reference"],
            "earlier_scores_moved": any(
                matrix[j][i] != matrix[i][i] for i in range(len(matrix)) for j in range(i, len(matrix))
            ),
            "seconds": report["bench_seconds"],
        }
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_capacity"))
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "capacity_cpu.json")
    parser.add_argument("--skip", choices=["auto", "growth"], action="append", default=[])
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    result: dict[str, Any] = {
        "command": "python benchmarks/capacity.py "
        + " ".join([f"--seeds {' '.join(map(str, args.seeds))}", f"--tolerance {args.tolerance}"]),
        "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    if "auto" not in args.skip:
        result["auto_against_fixed"] = auto_against_fixed(args.seeds, args.tolerance, args.out)
    if "growth" not in args.skip:
        result["twelve_tasks"] = twelve_tasks(args.out)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1)[:4000])


if __name__ == "__main__":
    main()
