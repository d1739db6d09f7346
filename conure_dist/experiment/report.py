"""What ``conure experiment`` writes once its runs are done: the summary over seeds
(``results.json``), the markdown table (``table.md``) and the plots.

Per variant and method: each task's score when it was learned and T1's after the last task (mean,
95% interval, std), the mean matrix, backbones and stored parameters. Paired differences
(``experiment_stats``): Conure minus FineSmax and STL wherever they ran together, each listed
contrast, and what sequential fine-tuning forgets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conure_dist.experiment.stats import (
    contrast,
    difference_lines,
    forgetting,
    format_interval,
    interval,
)
from conure_dist.fs import join, write_atomic
from conure_dist.methods import METHODS

if TYPE_CHECKING:
    from conure_dist.experiment.spec import Experiment


def summarize(
    experiment: Experiment, reports: dict, wall_seconds: float, reused_seconds: float = 0.0
) -> dict[str, Any]:
    """``wall_seconds``: the experiment's time, counting the runs reused from earlier calls with
    the time they took then (``reused_seconds`` of it)."""
    variants = {}
    for variant, by_method in reports.items():
        rows = {}
        for method, runs in by_method.items():
            tasks = [t["name"] for t in runs[0]["tasks"]]
            n = len(tasks)
            learned = {t: interval([r["matrix"][j][j] for r in runs]) for j, t in enumerate(tasks)}
            final = {t: interval([r["matrix"][n - 1][j] for r in runs]) for j, t in enumerate(tasks)}
            matrix = [
                [
                    None if runs[0]["matrix"][i][j] is None else sum(r["matrix"][i][j] for r in runs) / len(runs)
                    for j in range(n)
                ]
                for i in range(n)
            ]
            rows[method] = {
                "tasks": tasks,
                "metrics": [t["primary_metric"] for t in runs[0]["tasks"]],
                "learned": learned,
                "after_last_task": final,
                "matrix_mean": matrix,
                "num_backbones": runs[0].get("num_backbones"),
                "stored_parameters": runs[0].get("stored_parameters"),
                "reference": runs[0]["reference"],
                "seeds": [r["seed"] for r in runs],
                "wall_seconds": interval([r["wall_seconds"] for r in runs]),
            }
        variants[variant] = rows
    return {
        "experiment": _shown(experiment.path),
        "base": _shown(experiment.base),
        "overrides": experiment.overrides,
        "command_overrides": experiment.command_overrides,
        "seeds": experiment.seeds,
        "variants": variants,
        "differences": _differences(experiment, reports),
        "wall_seconds": round(wall_seconds, 1),
        "reused_seconds": round(reused_seconds, 1),
    }


def _differences(experiment: Experiment, reports: dict) -> dict[str, Any]:
    """The pairs the method records name (``Method.compared_with``: Conure - FineSmax and Conure -
    STL) per variant on every later task, the listed contrasts (name -> ``experiment_stats.contrast``
    plus which runs were compared), and what a method that forgets (sequential fine-tuning)
    forgets (``experiment_stats.forgetting``) where it ran."""
    pairs = [
        (f"{v}: {ref} - {m}", f"{v}/{ref}", f"{v}/{m}", None)
        for v, by in reports.items()
        for ref in by
        for m in METHODS[ref].compared_with
        if m in by
    ]
    pairs += [(c.name, c.a, c.b, c.tasks) for c in experiment.contrasts]
    out = {}
    for name, a, b, tasks in pairs:
        runs_a, runs_b = (reports[side.split("/")[0]][side.split("/")[1]] for side in (a, b))
        chosen = tasks or [t["name"] for t in runs_a[0]["tasks"][1:]]
        out[name] = {"a": a, "b": b, **contrast(runs_a, runs_b, chosen)}
    for variant, by_method in reports.items():
        for m, runs in by_method.items():
            if METHODS[m].forgets and len(runs[0]["tasks"]) > 1:
                out[f"{variant}: {m} forgetting"] = {
                    "a": f"{variant}/{m} after the last task",
                    "b": "when learned",
                    **forgetting(runs),
                }
    return out


def _shown(path: Path) -> str:
    """A path as the results show it: relative to the working directory when inside it, so that
    tables written from a checkout name its files, not the machine's."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _reused_part(summary: dict[str, Any]) -> str:
    reused = summary.get("reused_seconds", 0.0)
    return (
        f" (of which {reused:.0f} s are runs reused from earlier calls, at the time they took then)" if reused else ""
    )


def _command_part(summary: dict[str, Any]) -> str:
    given = summary.get("command_overrides")
    return f", then from the command line {given}" if given else ""


def format_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Experiment `{summary['experiment']}`",
        "",
        f"Base config `{summary['base']}`, seeds {summary['seeds']}, overrides {summary['overrides']}"
        f"{_command_part(summary)}; "
        f"wall time {summary['wall_seconds']:.0f} s{_reused_part(summary)}.",
        "",
        "Each cell: the task's test score when it was learned, mean ± half-width of its 95% confidence "
        "interval over the seeds (Student t). `T1 after last` is T1's score once every task is learned.",
        "",
    ]
    for variant, rows in summary["variants"].items():
        first = next(iter(rows.values()))
        tasks, metrics = first["tasks"], first["metrics"]
        lines += [
            f"## Variant `{variant}`",
            "",
            "| method | "
            + " | ".join(f"{t} ({m})" for t, m in zip(tasks, metrics, strict=True))
            + " | T1 after last | backbones | stored parameters |",
            "|---" * (len(tasks) + 4) + "|",
        ]
        for method, row in rows.items():
            cells = [format_interval(row["learned"][t]) for t in tasks]
            lines.append(
                f"| {method} | " + " | ".join(cells) + f" | {format_interval(row['after_last_task'][tasks[0]])} | "
                f"{row['num_backbones']} | {row['stored_parameters']:,} |"
            )
        ref = first["reference"]
        lines.append("| trivial reference | " + " | ".join(f"{ref[t]:.4f}" for t in tasks) + " | | | |")
        lines.append("")
    return "\n".join(lines + difference_lines(summary.get("differences", {})))


def write_results(summary: dict[str, Any], out: str) -> None:
    write_atomic(join(out, "results.json"), json.dumps(summary, indent=1))
    write_atomic(join(out, "table.md"), format_markdown(summary) + "\n")
    try:
        from conure_dist.experiment.plots import write_plots
    except ImportError as exc:  # matplotlib is a dependency; say so if it is missing
        raise RuntimeError(f"plots need matplotlib: {exc}") from exc
    write_plots(summary, out)
