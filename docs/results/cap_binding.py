"""Which phases of an experiment's runs stopped at their epoch cap while still improving.

Reads every finished run under ``OUT/runs/VARIANT/METHOD/seedS`` (the validation scores in its
``log.jsonl`` and the config in its ``report.json``; no test score is read) and prints, per
method, task and phase: the runs, how many ran to their cap (early stopping never fired), and
how many chose a best epoch among the last ``--last`` epochs before the cap: those might have
gained from more epochs. T1 is left out unless ``--t1``.

    python docs/results/cap_binding.py runs/exp_paper_table2 runs/exp_paper_ablations
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from conure_dist.experiment.compare import epoch_entries
from conure_dist.train.phase import selection_score


def phases(run: Path) -> list[tuple[str, str, int, list[float]]]:
    """(task, phase, epoch cap, validation selection score per epoch from 0) of one finished run:
    its epochs from ``log.jsonl`` (``compare.epoch_entries``: an epoch trained again after a
    resume counts once), its caps and selection rule from ``report.json``'s config."""
    config = json.loads((run / "report.json").read_text())["config"]
    train = SimpleNamespace(**config["train"])
    caps = {t["name"]: {"train": t["epochs"], "retrain": t["retrain_epochs"]} for t in config["tasks"]}
    curves: dict[tuple[str, str], list[dict]] = {}
    for (task, phase, _), entry in sorted(epoch_entries(str(run)).items(), key=lambda item: item[0][2]):
        if entry.get("valid") is not None:
            curves.setdefault((task, phase), []).append(entry["valid"])
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
        for report in sorted(root.glob("runs/*/*/seed*/report.json")):
            method = report.parent.parent.name
            for task, phase, cap, scores in phases(report.parent):
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
