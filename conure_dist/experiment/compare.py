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

from conure_dist.config import config_changes
from conure_dist.errors import UserError
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
                raise UserError(f"{path} line {line_no}: not JSON ({exc})") from None
            if record.get("event") == "epoch":
                entries[(record["task"], record["phase"], record["epoch"])] = record
    return entries


def start_entry(run: str) -> dict[str, Any] | None:
    """The run's last ``start`` log entry (its world size and config), None if it logs none."""
    last = None
    with fsspec.open(join(run, "log.jsonl"), "r") as f:
        for line in f:
            if '"start"' in line and (record := json.loads(line)).get("event") == "start":
                last = record
    return last


# Keys that decide which batches an epoch trains on, besides the world size.
DATA_KEYS = ("seed", "data.")


def data_note(run_a: str, run_b: str, rows: list[dict[str, Any]]) -> str | None:
    """Why the runs saw other data, when some epoch's fingerprints differ, and what to set."""
    if not any(r["same_data"] is False for r in rows):
        return None
    a, b = start_entry(run_a), start_entry(run_b)
    if a is None or b is None or "config" not in a or "config" not in b:
        return "the runs trained on other data (their logs record no config to say why)"
    sizes = (a["world_size"], b["world_size"])
    partitions = (a["config"]["data"]["partition"], b["config"]["data"]["partition"])
    if sizes[0] != sizes[1] and partitions != ("stride", "stride"):
        return (
            f"the runs trained on other data because they ran {sizes[0]} and {sizes[1]} processes with "
            f"data.partition={partitions[0]} and {partitions[1]}: under range (and auto, wherever a split "
            "has as many shards as processes) each process reads shards of its own, so the global "
            "batches differ with the number of processes. To compare them on the same data, run both "
            "with data.partition=stride (the processes' batches together are then the 1-process batch)."
        )
    changes = [
        f"{k}: {x} / {y}" for k, (x, y) in config_changes(a["config"], b["config"]).items() if k.startswith(DATA_KEYS)
    ]
    if changes:
        return f"the runs trained on other data: their configs differ in {'; '.join(changes)}"
    return (
        f"the runs trained on other data with the same data settings on {sizes[0]} and {sizes[1]} "
        "processes: check that data.root holds the same shards"
    )


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
        va, vb = ea["valid"] or {}, eb["valid"] or {}  # None: train.validation was off
        metrics = {name: _relative(va[name], vb.get(name)) for name in va if name != "count"}
        rows.append(
            {
                "task": task,
                "phase": phase,
                "epoch": epoch,
                "loss_a": ea["loss"],
                "loss_b": eb["loss"],
                "loss_rel_diff": _relative(ea["loss"], eb["loss"]),
                "same_data": None if ea.get("data") is None else ea.get("data") == eb.get("data"),
                "same_count": va.get("count") == vb.get("count"),
                "valid_rel_diff": metrics,
            }
        )
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``compare_runs``' rows."""

    def num(x: float | None) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"

    lines = [
        "| task | phase | epoch | loss A | loss B | loss rel. diff | same data | valid rel. diff (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diffs = [d for d in r["valid_rel_diff"].values() if d is not None]
        same = {None: "-", True: "yes", False: "NO"}[r["same_data"]]
        lines.append(
            f"| {r['task']} | {r['phase']} | {r['epoch']} | {num(r['loss_a'])} | {num(r['loss_b'])} | "
            f"{num(r['loss_rel_diff'])} | {same} | {num(max(diffs, default=None))} |"
        )
    return "\n".join(lines)
