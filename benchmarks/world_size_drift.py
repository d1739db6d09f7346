"""How far a run on 2 processes drifts from the same run on 1, epoch by epoch, over seeds.

    python benchmarks/world_size_drift.py --seeds 0 1 2 3 4 --work /tmp/drift \\
        --json benchmarks/results/world_size_drift.json

For each seed, runs the quick start (``data.partition=stride``, one thread per process) with
``conure run`` and under ``torchrun --nproc_per_node 2``, then lines up their logs
(``conure_dist.experiment.compare``). Reports, per epoch position, whether every seed's two runs trained on
the same data, and the relative difference of their mean training losses (mean and 95% interval
over seeds); per task, the final-metric difference between 1 and 2 processes next to the
difference between two seeds on 1 process, each with a 95% interval.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from conure_dist.experiment.compare import compare_runs

T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Student's t quantile (0.975) by degrees of freedom."""


def interval(values: list[float]) -> dict[str, float]:
    """Mean and half-width of its 95% confidence interval (t distribution; 0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": 0.0, "n": len(values)}
    half = T_95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": half, "n": len(values)}


def run(out: Path, seed: int, nproc: int, data: Path) -> None:
    if (out / "report.json").exists():
        return
    args = [
        "-m",
        "conure_dist",
        "run",
        "--config",
        "configs/quickstart.yaml",
        "--out",
        str(out),
        f"data.root={data}",
        f"seed={seed}",
        "data.partition=stride",
        "train.num_threads=1",
        "train.progress=false",
    ]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *args], check=True, env=env, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--work", default="/tmp/world_size_drift", help="where the runs are written")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    work = Path(args.work)
    per_position: dict[tuple[str, str, int], dict[str, list]] = {}
    final_gap: dict[str, list[float]] = {}
    finals = []
    for seed in args.seeds:
        one, two = work / f"seed{seed}-1proc", work / f"seed{seed}-2proc"
        run(one, seed, 1, work / "data")
        run(two, seed, 2, work / "data")
        for row in compare_runs(str(one), str(two)):
            if row["epoch"] == 0:
                continue
            slot = per_position.setdefault((row["task"], row["phase"], row["epoch"]), {"loss": [], "same": []})
            slot["loss"].append(row["loss_rel_diff"])
            slot["same"].append(row["same_data"])
        a, b = (json.loads((d / "report.json").read_text()) for d in (one, two))
        finals.append(a["matrix"][-1])
        for j, task in enumerate(a["tasks"]):
            final_gap.setdefault(task["name"], []).append(abs(a["matrix"][-1][j] - b["matrix"][-1][j]))
    names = list(final_gap)
    seed_gap = {
        name: [abs(x[j] - y[j]) for x, y in zip(finals, finals[1:], strict=False)] for j, name in enumerate(names)
    }
    result = {
        "command": " ".join(["python", *sys.argv]),
        "seeds": args.seeds,
        "epochs": [
            {
                "task": t,
                "phase": p,
                "epoch": e,
                "same_data_all_seeds": all(s["same"]),
                "loss_rel_diff": interval(s["loss"]),
            }
            for (t, p, e), s in per_position.items()
        ],
        "final_metric_abs_diff_1_vs_2_processes": {n: interval(v) for n, v in final_gap.items()},
        "final_metric_abs_diff_between_consecutive_seeds": {n: interval(v) for n, v in seed_gap.items() if v},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
