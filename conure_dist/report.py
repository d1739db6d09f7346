"""``report.json`` and the end-of-run table."""

from __future__ import annotations

import json
from typing import Any

import fsspec

from conure_dist.config import RunConfig
from conure_dist.data.manifest import TaskInfo
from conure_dist.dist import DistInfo
from conure_dist.errors import UserError
from conure_dist.fs import join, write_atomic
from conure_dist.methods import METHODS
from conure_dist.train.metrics import primary_metric_name
from conure_dist.train.state import RunState


def build_report(
    cfg: RunConfig, infos: list[TaskInfo], state: RunState, dist: DistInfo, storage: dict[str, int] | None = None
) -> dict[str, Any]:
    """``storage``: ``num_backbones`` and ``stored_parameters`` (what serving every task keeps)."""
    k = cfg.train.topk
    metric = {t.name: primary_metric_name(t.kind, k) for t in infos}
    report = {
        "method": cfg.method.name,
        "tasks": [{"name": t.name, "kind": t.kind, "primary_metric": metric[t.name]} for t in infos],
        "matrix": state.matrix,
        "before_prune": {name: m[metric[name]] for name, m in state.before_prune.items()},
        "before_prune_metrics": state.before_prune,
        "reference": {name: ref[metric[name]] for name, ref in state.reference.items()},
        "capacity": [
            {
                "task": c["task"],
                "owned_fraction": sum(c["owned_fraction"].values()),
                "free_fraction": c["free_fraction"],
                "owned_by_task": c["owned_fraction"],
                **{k: c[k] for k in ("prune_ratio", "num_blocks", "num_weights") if k in c},
            }
            for c in state.capacity
        ],
        "growth": state.growth,
        "prune_search": state.prune_search,
        "test_metrics": state.metrics[-1] if state.metrics else {},
        "reference_metrics": state.reference,
        "task_checksums": state.task_checksums,
        **(storage or {}),
        "wall_seconds": round(state.wall_seconds, 3),
        "world_size": dist.world_size,
        "engine": cfg.dist.engine,
        "precision": cfg.dist.precision,
        "seed": cfg.seed,
        "data_root": cfg.data.root,
        "config": cfg.to_dict(),
    }
    return as_before_pruning(report, cfg.method.name) if METHODS[cfg.method.name].before_pruning else report


def as_before_pruning(report: dict[str, Any], method: str) -> dict[str, Any]:
    """A Conure report seen as ``method`` (Conure-): each task scored as it was before its own
    pruning and retraining (the matrix's diagonal and the last task's final test metrics; earlier
    tasks read the same pruned weights under both)."""
    names = [t["name"] for t in report["tasks"]]
    matrix = [list(row) for row in report["matrix"]]
    for i, row in enumerate(matrix):
        row[i] = report["before_prune"].get(names[i], row[i])
    test_metrics = dict(report["test_metrics"])
    last = names[len(matrix) - 1] if matrix else None
    if last in report.get("before_prune_metrics", {}):
        test_metrics[last] = report["before_prune_metrics"][last]
    return {**report, "method": method, "matrix": matrix, "test_metrics": test_metrics}


def write_report(report: dict[str, Any], out: str) -> None:
    """``report.json``, atomically: a kill leaves the previous report or the whole new one."""
    write_atomic(join(out, "report.json"), json.dumps(report, indent=1))


def read_report(path: str) -> dict[str, Any]:
    """A ``report.json``; an empty, truncated or foreign file is an error naming it."""
    try:
        with fsspec.open(path) as f:
            report = json.load(f)
    except ValueError as exc:
        raise UserError(f"{path} is not a complete report ({exc}): delete it to run again") from None
    if not isinstance(report, dict) or "matrix" not in report:
        raise UserError(f"{path} is not a report of conure run (no 'matrix')")
    return report


def format_table(report: dict[str, Any]) -> str:
    """The forgetting matrix (rows: after task i; columns: task j), references and capacity."""
    names = [t["name"] for t in report["tasks"]]
    width = max(10, *(len(n) for n in names)) + 2
    lines = ["after task".ljust(14) + "".join(n.rjust(width) for n in names) + "   owned  free"]
    for i, row in enumerate(report["matrix"]):
        cells = "".join(("-" if v is None else f"{v:.4f}").rjust(width) for v in row)
        cap = report["capacity"][i] if i < len(report["capacity"]) else None
        tail = f"   {cap['owned_fraction']:.3f} {cap['free_fraction']:.3f}" if cap else ""
        lines.append(names[i].ljust(14) + cells + tail)
    ref = "".join((f"{report['reference'][n]:.4f}" if n in report["reference"] else "-").rjust(width) for n in names)
    lines.append("reference".ljust(14) + ref)
    metrics = "".join(t["primary_metric"].rjust(width) for t in report["tasks"])
    lines.append("metric".ljust(14) + metrics)
    for event in report.get("growth", []):
        lines.append(
            f"grown before {event['task']}: +{len(event['dilations'])} blocks (to {event['blocks']}), free "
            f"{event['free_before']:.3f} -> {event['free_after']:.3f}"
        )
    for task, search in report.get("prune_search", {}).items():
        tried = ", ".join(f"{p['ratio']:g}{'' if p['within_tolerance'] else ' (out)'}" for p in search["probes"])
        lines.append(f"prune ratio of {task}: {search['chosen']:g} (auto; tried {tried})")
    lines.append(f"wall {report['wall_seconds']:.1f}s, {describe_engine(report)}")
    return "\n".join(lines)


def describe_engine(report: dict[str, Any]) -> str:
    """What ran, in words: one process trains without DDP's wrapper, whatever ``dist.engine`` says."""
    world_size = report["world_size"]
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    if report["engine"] == "deepspeed":
        stage = report.get("config", {}).get("dist", {}).get("zero_stage")
        return f"{processes}, DeepSpeed" + ("" if stage is None else f" ZeRO-{stage}")
    if report["engine"] == "ddp":
        return f"{processes}, DDP" if world_size > 1 else f"{processes} (no DDP)"
    return f"{processes}, engine {report['engine']}"
