"""Gather the ML-100K leave-one-out comparison of T1 into one JSON and a markdown table
(docs/results/ml100k_loo.md): Conure's T1 over seeds (``conure experiment`` reports), the
count-based references (``benchmarks/sequential_references.py``) and RecBole's NextItNet
(``benchmarks/recbole_peer.py``), each with MRR@5, NDCG@5 and HR@5 on the test users and, where
there are several seeds, the 95% interval of the mean.

    python docs/results/ml100k_loo.py --experiment runs/exp_ml100k_loo --references refs.json \\
        --recbole runs/recbole --out docs/results/ml100k_loo/summary.json
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path
from typing import Any

from conure_dist.experiment.stats import interval

METRICS = ("mrr@5", "ndcg@5", "hr@5")
RECBOLE_NAMES = {"mrr@5": "mrr@5", "ndcg@5": "ndcg@5", "hr@5": "hit@5"}
RECBOLE_ROW = "RecBole 1.2.1 NextItNet"
TARGETS_PER_EPOCH = 97_171
"""Training targets of an epoch on both sides: every training rating but each user's first."""


def _ours(experiment: str, before_pruning: bool) -> dict[str, Any]:
    """Conure's T1 runs: test metrics after pruning and retraining, or the same runs' before."""
    paths = sorted(glob.glob(f"{experiment}/runs/t1/conure/seed*/report.json"))
    reports = [json.loads(Path(p).read_text()) for p in paths]
    key = "before_prune_metrics" if before_pruning else "test_metrics"
    per_metric = {m: [r[key]["t1"][m] for r in reports] for m in METRICS}
    return {
        "seeds": [r["seed"] for r in reports],
        "test": {m: interval(v) for m, v in per_metric.items()},
        "per_seed": per_metric,
        "environment": reports[0].get("environment") if reports else None,
    }


def _our_throughput(experiment: str) -> dict[str, Any]:
    """Training sequences per second from each run's step events (T1 train phase), as predicted
    targets per second: a window of ``seq_len`` holds on average 97,171 / windows targets."""
    rates, epochs = [], []
    for path in sorted(glob.glob(f"{experiment}/runs/t1/conure/seed*/log.jsonl")):
        events = [json.loads(line) for line in Path(path).read_text().splitlines()]
        steps = [e for e in events if e["event"] == "step" and e["phase"] == "train" and e["epoch"] > 1]
        rates += [e["sequences_per_s"] for e in steps]
        epochs.append(max((e["epoch"] for e in events if e["event"] == "epoch" and e["phase"] == "train"), default=0))
    mean = sum(rates) / len(rates) if rates else None
    return {"train_sequences_per_s_mean_of_steps": mean, "train_epochs_per_seed": epochs}


def _recorded_recbole(summary_path: str) -> list[dict[str, Any]]:
    """RecBole's seeds as an earlier summary recorded them (for runs whose folders are gone), in
    the shape of ``result.json``: the test metrics, epochs, throughput and settings."""
    row = json.loads(Path(summary_path).read_text())["rows"][RECBOLE_ROW]
    results = []
    for i, seed in enumerate(row["seeds"]):
        results.append(
            {
                "test": {RECBOLE_NAMES[m]: row["per_seed"][m][i] for m in METRICS},
                "settings": {**row["settings"], "seed": seed},
                "best_epoch": row["best_epoch"][i],
                "epochs_run": row["epochs_run"][i],
                "train_prefixes_per_s": row["train_prefixes_per_s"][i],
                "recbole": row["recbole"],
                "threads": row["threads"],
                "recorded_in": summary_path,
            }
        )
    return results


def _recbole(folder: str, recorded: str | None = None) -> dict[str, Any]:
    """RecBole's seeds under ``folder`` (``seed*/result.json``), after those of an earlier summary
    (``recorded``) that the folder does not hold."""
    results = [json.loads(Path(p).read_text()) for p in sorted(glob.glob(f"{folder}/seed*/result.json"))]
    if recorded:
        ran = {r["settings"]["seed"] for r in results}
        results = [r for r in _recorded_recbole(recorded) if r["settings"]["seed"] not in ran] + results
        results.sort(key=lambda r: r["settings"]["seed"])
    per_metric = {m: [r["test"][RECBOLE_NAMES[m]] for r in results] for m in METRICS}
    return {
        "seeds": [r["settings"]["seed"] for r in results],
        "recorded_seeds": [r["settings"]["seed"] for r in results if "recorded_in" in r],
        "test": {m: interval(v) for m, v in per_metric.items()} if results else {},
        "per_seed": per_metric,
        "best_epoch": [r["best_epoch"] for r in results],
        "epochs_run": [r["epochs_run"] for r in results],
        "train_prefixes_per_s": [r["train_prefixes_per_s"] for r in results],
        "recbole": results[0]["recbole"] if results else None,
        "settings": results[0]["settings"] if results else None,
        "threads": results[0]["threads"] if results else None,
    }


def table(summary: dict[str, Any]) -> str:
    lines = ["| T1 on ML-100K, leave-one-out | seeds | MRR@5 | NDCG@5 | HR@5 |", "|---|---|---|---|---|"]

    def cell(stat: dict[str, Any]) -> str:
        return f"{stat['mean']:.4f} ± {stat['ci95']:.4f}" if stat["n"] > 1 else f"{stat['mean']:.4f}"

    for name, row in summary["rows"].items():
        if row["test"]:
            lines.append(
                f"| {name} | {len(row['seeds'])} | " + " | ".join(cell(row["test"][m]) for m in METRICS) + " |"
            )
    for name, metrics in summary["references"].items():
        lines.append(f"| {name} | (counts) | " + " | ".join(f"{metrics[m]:.4f}" for m in METRICS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--references", required=True)
    parser.add_argument("--recbole", required=True, help="a folder of RecBole runs, seed*/result.json")
    parser.add_argument(
        "--recbole-recorded",
        help="an earlier summary.json whose RecBole seeds count where --recbole does not hold them",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    refs = json.loads(Path(args.references).read_text())["test"]
    summary = {
        "rows": {
            "Conure T1 (pruned 70%, retrained)": _ours(args.experiment, before_pruning=False),
            "Conure T1 before pruning": _ours(args.experiment, before_pruning=True),
            RECBOLE_ROW: _recbole(args.recbole, args.recbole_recorded),
        },
        "references": {
            "most popular": refs["popular"],
            "first-order Markov": refs["markov1"],
            "second-order Markov (back-off)": refs["markov2"],
        },
        "our_throughput": _our_throughput(args.experiment),
        "train_targets_per_epoch": TARGETS_PER_EPOCH,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    return summary


if __name__ == "__main__":
    main()
