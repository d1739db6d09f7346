"""Effective training throughput of a finished run, per phase, from its ``log.jsonl``.

    python benchmarks/phase_throughput.py RUN [--bench benchmarks/results/h100.json] [--json OUT]

Two figures per (task, phase): the training loop's sequences per second (the ``step`` events'
windows of ``train.log_every`` steps: reading, forward, backward, update), and the phase end to
end (every trained sequence over the wall time from its first validation to its last, so
validation and checkpoints count against it). With ``--bench`` (a ``benchmarks/run.py`` JSON),
each is shown as a fraction of the benchmark's fast-path figure for T1 or a later task.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from typing import Any

import fsspec


def phase_figures(run: str, batch_sizes: dict[str, int]) -> list[dict[str, Any]]:
    """One row per (task, phase) in the order the run trained them."""
    with fsspec.open(f"{run.rstrip('/')}/log.jsonl", "r") as f:
        events = [json.loads(line) for line in f]
    windows: dict[tuple, list[float]] = defaultdict(list)
    steps: dict[tuple, int] = defaultdict(int)
    epochs: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        key = (e.get("task"), e.get("phase"))
        if e["event"] == "step":
            windows[key].append(e["sequences_per_s"])
            steps[key] = max(steps[key], e["global_step"])
        elif e["event"] == "epoch":
            epochs[key].append(e)
    rows = []
    for key, entries in epochs.items():
        task, phase = key
        trained_steps = entries[-1]["global_step"] - entries[0]["global_step"]
        wall = entries[-1]["time"] - entries[0]["time"]
        rows.append(
            {
                "task": task,
                "phase": phase,
                "epochs": len(entries) - 1,
                "steps": trained_steps,
                "loop_sequences_per_s": statistics.fmean(windows[key]) if windows[key] else None,
                "phase_sequences_per_s": trained_steps * batch_sizes[task] / wall if wall > 0 else None,
                "phase_wall_s": wall,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory (--out of conure run)")
    parser.add_argument("--bench", help="benchmarks/run.py JSON to compare with")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    report = json.loads(fsspec.open(f"{args.run.rstrip('/')}/report.json", "r").open().read())
    batch = {t["name"]: t["batch_size"] for t in report["config"]["tasks"]}
    rows = phase_figures(args.run, batch)
    bench = json.loads(open(args.bench).read()) if args.bench else None
    for row in rows:
        row["global_batch"] = batch[row["task"]]
        if bench:
            reference = bench["t1_seq_per_s" if row["task"] == report["tasks"][0]["name"] else "later_seq_per_s"]
            row["benchmark_sequences_per_s"] = reference
            for figure in ("loop_sequences_per_s", "phase_sequences_per_s"):
                if row[figure]:
                    row[figure.replace("sequences_per_s", "fraction")] = row[figure] / reference
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
