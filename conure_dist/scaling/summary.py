"""``conure scale``'s results: per phase and world size, averaged over seeds; the final metrics
against the smallest size; ``results.json``, ``table.md`` and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conure_dist.config import RunConfig
from conure_dist.experiment.stats import format_interval, interval, paired
from conure_dist.train.profile import TIMED_PARTS

PARTS = TIMED_PARTS
LR_RULES = {
    "strong": "strong scaling: the config's global batches and learning rates at every size",
    "weak": "weak scaling: per-rank batch of the smallest size W0 kept, global batch x W/W0, "
    "learning rate x sqrt(W/W0) (square-root rule for Adam)",
}


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _bytes(table: dict[str, float] | None, prefix: str) -> float | None:
    if table is None:
        return None
    return sum(v for k, v in table.items() if k.startswith(prefix))


def phase_row(timings: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase at one size: the seeds' means (peak memory: the largest)."""
    first = timings[0]
    prov = first.get("provenance", {})
    return {
        "global_batch": first["global_batch"],
        "nodes": prov.get("nodes", 1),
        "ranks_per_node": prov.get("ranks_per_node", first["world_size"]),
        "sequences_per_s": _mean([t["sequences_per_s"] for t in timings]),
        "sequences_per_s_per_rank": _mean([t["sequences_per_s_per_rank"] for t in timings]),
        "step_seconds": _mean([t["step_seconds"] for t in timings]),
        "seconds": {p: _mean([t["seconds"][p] for t in timings]) for p in PARTS},
        "bytes_dense": _mean([_bytes(t["bytes_per_step"], "dense.") for t in timings]),
        "bytes_row_sparse": _mean([_bytes(t["bytes_per_step"], "row_sparse.") for t in timings]),
        "bytes_total": _mean([_bytes(t["bytes_per_step"], "") for t in timings]),
        "predicted_bytes_dense": _mean([_bytes(t["predicted_bytes_per_step"], "dense.") for t in timings]),
        "predicted_bytes_row_sparse": _mean([_bytes(t["predicted_bytes_per_step"], "row_sparse.") for t in timings]),
        "predicted_bytes_total": _mean([_bytes(t["predicted_bytes_per_step"], "") for t in timings]),
        "predicted_comm_seconds": _mean([t.get("predicted_comm_seconds") for t in timings]),
        "peak_memory_bytes": max((t["peak_memory_bytes"] or 0) for t in timings),
        "peak_memory_kind": first["peak_memory_kind"],
        "mfu": _mean([t.get("mfu") for t in timings]),
        "timed_steps": sum(t["timed_steps"] for t in timings),
        "row_sparse_tables": first["exchange"]["row_sparse"],
        "seeds": len(timings),
    }


def summarize(spec: Any, cfg: RunConfig, runs: list[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    phases: dict[str, dict[str, Any]] = {}
    for run in ok:
        for name, timing in run["phases"].items():
            phases.setdefault(name, {}).setdefault(run["world_size"], []).append(timing)
    table: dict[str, dict[str, Any]] = {}
    for name, sizes in phases.items():
        rows = {w: phase_row(t) for w, t in sorted(sizes.items())}
        base = min(rows)
        for w, row in rows.items():
            per_rank_base = rows[base]["sequences_per_s"] / base
            row["efficiency"] = row["sequences_per_s"] / w / per_rank_base if per_rank_base else None
        table[name] = {str(w): row for w, row in rows.items()}
    return {
        "config": spec.config,
        "mode": spec.mode,
        "rule": LR_RULES[spec.mode],
        "world_sizes": spec.world_sizes,
        "seeds": spec.seeds,
        "launcher": spec.launcher,
        "overrides": spec.overrides,
        "evaluate": spec.evaluate,
        "warmup_steps": spec.warmup_steps,
        "provenance": env,
        "run_provenance": next((next(iter(r["phases"].values()))["provenance"] for r in ok if r["phases"]), None),
        "phases": table,
        "metrics": final_metrics(ok),
        "failed": [{k: r[k] for k in ("world_size", "seed", "error")} for r in runs if "error" in r],
        "runs": runs,
    }


def final_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and size: the final test metric's interval over seeds and, against the smallest
    size, the paired difference over the seeds both finished."""
    if not runs:
        return {}
    by_size: dict[int, dict[int, dict[str, float]]] = {}
    for run in runs:
        by_size.setdefault(run["world_size"], {})[run["seed"]] = run["final_metrics"]
    base = min(by_size)
    names = runs[0]["metric_names"]
    out: dict[str, Any] = {}
    for task, metric in names.items():
        rows = {}
        for w, seeds in sorted(by_size.items()):
            values = [m[task] for m in seeds.values() if m.get(task) is not None]
            if not values:
                continue
            row = {"metric": metric, **interval(values)}
            common = [s for s in seeds if s in by_size[base] and seeds[s].get(task) is not None]
            if w != base and common:
                row["vs_smallest"] = paired([seeds[s][task] for s in common], [by_size[base][s][task] for s in common])
            rows[str(w)] = row
        out[task] = rows
    return out


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def _phase_line(w: str, r: dict[str, Any]) -> str:
    cells = [
        w,
        f"{r['nodes']} x {r['ranks_per_node']}",
        str(r["global_batch"]),
        _fmt(r["sequences_per_s"], ".0f"),
        _fmt(r["sequences_per_s_per_rank"], ".0f"),
        _fmt(r["efficiency"], ".2f"),
        _fmt(r["step_seconds"] * 1e3, ".2f"),
        *(_fmt(r["seconds"][p] * 1e3, ".2f") for p in PARTS),
        _fmt(r["bytes_dense"], ".0f"),
        _fmt(r["bytes_row_sparse"], ".0f"),
        f"{_fmt(r['predicted_bytes_dense'], '.0f')} / {_fmt(r['predicted_bytes_row_sparse'], '.0f')}",
        _fmt(r["peak_memory_bytes"] / 1e6, ".0f"),
        _fmt(r["mfu"], ".1%"),
    ]
    return "| " + " | ".join(cells) + " |"


def format_markdown(summary: dict[str, Any]) -> str:
    prov = summary.get("run_provenance") or summary["provenance"]
    lines = [
        f"# Scaling: {summary['config']} ({summary['mode']})",
        "",
        f"{summary['rule']}. Sizes {summary['world_sizes']}, seeds {summary['seeds']}, launcher "
        f"{summary['launcher']}; timed steps leave out each phase's first {summary['warmup_steps']}; "
        f"validation after epochs {'on' if summary['evaluate'] else 'off'}.",
        "",
        f"Provenance: {prov.get('device_name')} ({prov.get('device')}), torch {prov.get('torch')}, "
        f"CUDA {prov.get('cuda')}, NCCL {prov.get('nccl')}, DeepSpeed {prov.get('deepspeed')}, "
        f"{prov.get('threads')} threads of {prov.get('cpu_count')} cores, commit {prov.get('commit')}.",
        "",
        "Per rank and step: seconds split into data wait / forward+backward / communication / optimizer "
        "(DDP's bucket all-reduce, launch to completion, counted as communication); bytes each rank "
        "hands to its collectives (measured | the communication model's prediction).",
        "",
    ]
    for name, sizes in summary["phases"].items():
        lines += [
            f"## {name}",
            "",
            "| W | nodes x ranks | global batch | seq/s | seq/s/rank | efficiency | step ms | data | fwd+bwd "
            "| comm | optim | dense B | row-sparse B | predicted dense / row-sparse B | peak mem MB | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [_phase_line(w, r) for w, r in sizes.items()]
        lines.append("")
    if summary["metrics"]:
        lines += [
            "## Final test metrics",
            "",
            "Mean ± 95% interval over seeds; against the smallest size: the paired difference and its interval.",
            "",
            "| task | metric | W | score | vs smallest |",
            "|---|---|---|---|---|",
        ]
        for task, sizes in summary["metrics"].items():
            for w, row in sizes.items():
                diff = row.get("vs_smallest")
                shown = "–" if diff is None else f"{diff['mean']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]"
                lines.append(f"| {task} | {row['metric']} | {w} | {format_interval(row)} | {shown} |")
        lines.append("")
    if summary["failed"]:
        lines += ["## Failed sizes", "", "| W | seed | error |", "|---|---|---|"]
        lines += [f"| {f['world_size']} | {f['seed']} | {f['error']} |" for f in summary["failed"]]
        lines.append("")
    return "\n".join(lines)


def write_outputs(summary: dict[str, Any], out: str) -> list[str]:
    """``results.json``, ``table.md`` and (with matplotlib) ``plots/*.png``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (folder / "table.md").write_text(format_markdown(summary))
    try:
        from conure_dist.scaling.plots import write_plots
    except ImportError:  # matplotlib is optional
        return []
    return write_plots(summary, out)
