"""Where two runs part: their logs side by side, epoch by epoch.

Every epoch of every phase logs its mean training loss, a fingerprint of the data it trained
on (the global batches, their order and their negatives) and its validation metrics. Two runs
of one config (1 against N processes, resumed against uninterrupted, two machines) line up by
(task, phase, epoch): the fingerprints say whether they saw the same data, the loss and metric
differences how far their parameters have drifted. ``conure compare RUN_A RUN_B`` prints it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import fsspec

from conure_dist.fs import join


def epoch_entries(run: str) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(task, phase, epoch) -> the epoch's log entry, from ``{run}/log.jsonl``. An epoch logged
    twice (trained again after a resume) keeps its last entry."""
    path = join(run, "log.jsonl")
    entries = {}
    with fsspec.open(path, "r") as f:
        for line_no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path} line {line_no}: not JSON ({exc})") from None
            if record.get("event") == "epoch":
                entries[(record["task"], record["phase"], record["epoch"])] = record
    return entries


def _relative(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def compare_runs(run_a: str, run_b: str) -> list[dict[str, Any]]:
    """One row per epoch logged by both runs, in the first run's order: the two losses and their
    relative difference, whether the data fingerprints agree (None before the first epoch, which
    trains nothing), whether the validation counts agree, and each validation metric's largest
    relative difference so far."""
    a, b = epoch_entries(run_a), epoch_entries(run_b)
    rows = []
    for key, ea in a.items():
        eb = b.get(key)
        if eb is None:
            continue
        task, phase, epoch = key
        va, vb = ea["valid"], eb["valid"]
        metrics = {name: _relative(va[name], vb.get(name)) for name in va if name != "count"}
        rows.append({"task": task, "phase": phase, "epoch": epoch, "loss_a": ea["loss"], "loss_b": eb["loss"],
                     "loss_rel_diff": _relative(ea["loss"], eb["loss"]),
                     "same_data": None if ea.get("data") is None else ea.get("data") == eb.get("data"),
                     "same_count": va.get("count") == vb.get("count"), "valid_rel_diff": metrics})
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``compare_runs``' rows."""
    def num(x: float | None) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"

    lines = ["| task | phase | epoch | loss A | loss B | loss rel. diff | same data | valid rel. diff (max) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diffs = [d for d in r["valid_rel_diff"].values() if d is not None]
        same = {None: "-", True: "yes", False: "NO"}[r["same_data"]]
        lines.append(f"| {r['task']} | {r['phase']} | {r['epoch']} | {num(r['loss_a'])} | {num(r['loss_b'])} | "
                     f"{num(r['loss_rel_diff'])} | {same} | {num(max(diffs, default=None))} |")
    return "\n".join(lines)
