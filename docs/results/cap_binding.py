"""Which phases of an experiment's runs stopped at their epoch cap while still improving.

Reads every run's ``log.jsonl`` under ``OUT/runs/VARIANT/METHOD/seedS`` (validation scores only;
no test score is read) and prints, per method, task and phase: the runs, how many ran to their cap
(early stopping never fired), and how many chose a best epoch among the last ``--last`` epochs
before the cap: those might have gained from more epochs. T1 is left out unless ``--t1``.

    python docs/results/cap_binding.py runs/exp_paper_table2 runs/exp_paper_ablations
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from conure_dist.train.phase import selection_score


def phases(log: Path) -> list[tuple[str, str, int, list[float]]]:
    """(task, phase, epoch cap, validation selection score per epoch from 0) of one run's log."""
    config, curves = None, {}
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "start":
            config = event["config"]
        elif event["event"] == "epoch" and event.get("valid") is not None:
            curves.setdefault((event["task"], event["phase"]), []).append(event["valid"])
    if config is None:
        raise ValueError(f"{log}: no start event")
    train = SimpleNamespace(**config["train"])
    caps = {t["name"]: {"train": t["epochs"], "retrain": t["retrain_epochs"]} for t in config["tasks"]}
    out = []
    for (task, phase), valid in curves.items():
        score = selection_score("class" if "acc" in valid[0] else "item", train)
        out.append((task, phase, caps[task][phase], [score(v) for v in valid]))
    return out


def cap_binding(roots: list[Path], last: int = 3, t1: bool = False) -> dict[tuple[str, str, str], Counter]:
    """(method, task, phase) -> counts of runs, runs that reached the cap, and runs whose best
    epoch (the first of the best scores, as training keeps it) is a trained one among the last
    ``last`` before the cap."""
    counts: dict[tuple[str, str, str], Counter] = {}
    for root in roots:
        for log in sorted(root.glob("runs/*/*/seed*/log.jsonl")):
            method = log.parent.parent.name
            for task, phase, cap, scores in phases(log):
                if task == "t1" and not t1:
                    continue
                best = max(range(len(scores)), key=lambda i: (scores[i], -i))
                c = counts.setdefault((method, task, phase), Counter())
                c["runs"] += 1
                c["reached_cap"] += len(scores) - 1 >= cap
                c["best_near_cap"] += 0 < best and best > cap - last  # the start is never near
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outs", nargs="+", type=Path, help="experiment output directories")
    parser.add_argument("--last", type=int, default=3, help="epochs before the cap that count as near it")
    parser.add_argument("--t1", action="store_true", help="include T1's phases")
    args = parser.parse_args()
    print(f"| method | task | phase | runs | reached the cap | best epoch in the last {args.last} |")
    print("|---|---|---|---|---|---|")
    for (method, task, phase), c in sorted(cap_binding(args.outs, args.last, args.t1).items()):
        print(f"| {method} | {task} | {phase} | {c['runs']} | {c['reached_cap']} | {c['best_near_cap']} |")


if __name__ == "__main__":
    main()
