"""Statistics of ``conure experiment``: 95% confidence intervals over seeds (Student t) and paired
differences between two sets of runs made with the same seeds.

A score's interval is ``mean ± t(0.975, n-1) * std / sqrt(n)`` over the n seeds. A paired
difference takes, seed by seed, run A's score minus run B's (same seed: same initialisation,
shuffling and negatives where the two share them), and gives the interval of those n differences;
it *excludes zero* when both ends have the same sign. Pairing removes what the seeds share,
which makes the interval of a difference narrower than the two scores' intervals suggest.
"""

from __future__ import annotations

import math
from typing import Any

# Two-sided 95% quantiles t(0.975, df) of Student's t distribution for df = 1..30.
T_975: tuple[float, ...] = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)
Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the table up to 30 degrees of freedom, then the Cornish-Fisher expansion
    around the normal quantile (error below 1e-4 from df = 31 on)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def interval(values: list[float]) -> dict[str, Any]:
    """Mean, sample std, n and the 95% interval of the mean (``ci95`` is its half-width; 0 and
    the interval the mean itself for a single value, which has no spread to estimate)."""
    n = len(values)
    if n == 0:
        raise ValueError("an interval needs at least one value")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "ci95": half, "low": mean - half, "high": mean + half}


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """The interval of the per-seed differences a - b, and whether it excludes zero."""
    if len(a) != len(b):
        raise ValueError(f"paired differences need as many runs on each side, got {len(a)} and {len(b)}")
    stat = interval([x - y for x, y in zip(a, b, strict=True)])
    stat["excludes_zero"] = stat["n"] > 1 and (stat["low"] > 0 or stat["high"] < 0)
    return stat


def relative_mean(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, Any]:
    """Per seed, the mean over tasks of (a - b) / b's mean score on that task: one unit-free
    number for tasks measured in different units (MRR, accuracy); its paired interval."""
    tasks = list(a)
    n = len(a[tasks[0]])
    scale = {t: abs(sum(b[t]) / len(b[t])) or 1.0 for t in tasks}
    per_seed = [sum((a[t][s] - b[t][s]) / scale[t] for t in tasks) / len(tasks) for s in range(n)]
    return paired(per_seed, [0.0] * n)


def contrast(a_runs: list[dict], b_runs: list[dict], tasks: list[str]) -> dict[str, Any]:
    """Paired differences A - B of each task's score when learned, and their relative mean.

    ``a_runs`` and ``b_runs`` are run reports in the same seed order; every task must be in both."""
    seeds_a, seeds_b = [r["seed"] for r in a_runs], [r["seed"] for r in b_runs]
    if seeds_a != seeds_b:
        raise ValueError(f"paired differences need the same seeds on both sides, got {seeds_a} and {seeds_b}")
    a = {t: [_learned(r, t) for r in a_runs] for t in tasks}
    b = {t: [_learned(r, t) for r in b_runs] for t in tasks}
    out: dict[str, Any] = {"seeds": seeds_a, "tasks": {t: paired(a[t], b[t]) for t in tasks}}
    if len(tasks) > 1:
        out["relative_mean"] = relative_mean(a, b)
    return out


def forgetting(runs: list[dict]) -> dict[str, Any]:
    """Per task but the last: its score after the last task minus its score when learned, paired
    by seed (negative: forgotten)."""
    names = [t["name"] for t in runs[0]["tasks"]]
    last = len(names) - 1
    tasks = {
        t: paired([r["matrix"][last][j] for r in runs], [r["matrix"][j][j] for r in runs])
        for j, t in enumerate(names[:-1])
    }
    return {"seeds": [r["seed"] for r in runs], "tasks": tasks}


def _learned(report: dict, task: str) -> float:
    """A task's test score right after it was learned (the matrix diagonal)."""
    names = [t["name"] for t in report["tasks"]]
    j = names.index(task)
    return report["matrix"][j][j]


def format_interval(stat: dict[str, Any]) -> str:
    """``mean ± half-width`` with 4 decimals."""
    return f"{stat['mean']:.4f} ± {stat['ci95']:.4f}"


def format_difference(stat: dict[str, Any]) -> str:
    """A paired difference with its interval and whether the interval excludes zero."""
    verdict = "yes" if stat["excludes_zero"] else "no"
    return f"{stat['mean']:+.4f} | [{stat['low']:+.4f}, {stat['high']:+.4f}] | {verdict}"


def difference_lines(differences: dict[str, Any]) -> list[str]:
    """The paired differences as one markdown table."""
    if not differences:
        return []
    lines = [
        "## Paired differences (A - B, seed by seed)",
        "",
        "Mean of the per-seed differences, its 95% interval and whether that excludes zero. "
        "`relative mean`: per seed, the mean over the tasks of (A - B) / B's mean score.",
        "",
        "| difference | A | B | task | mean | 95% interval | excludes 0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, diff in differences.items():
        rows = [
            *diff["tasks"].items(),
            *([("relative mean", diff["relative_mean"])] if "relative_mean" in diff else []),
        ]
        for task, stat in rows:
            lines.append(f"| {name} | {diff['a']} | {diff['b']} | {task} | {format_difference(stat)} |")
    return [*lines, ""]
