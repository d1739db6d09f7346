"""PNG plots of an experiment summary (see ``experiment_report.py``), one set per variant:

* ``VARIANT_forgetting.png``: per method, the forgetting matrix (row: after task i; column:
  task j) as a heat map of each score over the score when that task was learned (1 = nothing
  forgotten), annotated with the score itself;
* ``VARIANT_tasks.png``: per task, each method's score when learned (mean, its 95% interval over
  the seeds as error bar, cut at the metric's bounds 0 and 1);
* ``VARIANT_storage.png``: parameters stored to serve every task against the mean relative score
  over the tasks after T1 (1 = the best method on every task); only for variants that compare
  several methods.
"""

from __future__ import annotations

from typing import Any

import fsspec
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from conure_dist.fs import join  # noqa: E402


def save_figure(fig: plt.Figure, out: str, name: str) -> str:
    path = join(out, f"plots/{name}.png")
    fs, local = fsspec.core.url_to_fs(path)
    fs.makedirs(local.rsplit("/", 1)[0], exist_ok=True)
    with fsspec.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def forgetting(rows: dict[str, Any], variant: str, out: str) -> str:
    methods = list(rows)
    cols = min(4, len(methods))
    grid_rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(
        grid_rows, cols, figsize=(3.6 * cols, 3.6 * grid_rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, method in zip(axes.flat[: len(methods)], methods, strict=True):
        row = rows[method]
        tasks, matrix = row["tasks"], row["matrix_mean"]
        n = len(tasks)
        ratio = [
            [
                float("nan") if matrix[i][j] is None or not matrix[j][j] else matrix[i][j] / matrix[j][j]
                for j in range(n)
            ]
            for i in range(n)
        ]
        image = ax.imshow(ratio, vmin=0.0, vmax=1.2, cmap="RdYlGn")
        for i in range(n):
            for j in range(i + 1):
                ax.text(j, i, f"{matrix[i][j]:.3f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(n), tasks, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(n), tasks, fontsize=7)
        ax.set_title(method, fontsize=9)
    for row in axes:
        row[0].set_ylabel("after learning task")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="score / score when learned")
    fig.suptitle(f"{variant}: forgetting matrices (mean over seeds)", fontsize=10)
    return save_figure(fig, out, f"{variant}_forgetting")


def clipped_error_bars(
    means: list[float], half_widths: list[float], low: float = 0.0, high: float = 1.0
) -> tuple[list[float], list[float]]:
    """The error bars below and above each mean for an interval mean ± half-width cut at the
    metric's bounds (every metric here lies in [0, 1]): a score cannot fall below 0."""
    below = [max(0.0, min(h, m - low)) for m, h in zip(means, half_widths, strict=True)]
    above = [max(0.0, min(h, high - m)) for m, h in zip(means, half_widths, strict=True)]
    return below, above


def per_task(rows: dict[str, Any], variant: str, out: str) -> str:
    methods = list(rows)
    first = next(iter(rows.values()))
    tasks, metrics = first["tasks"], first["metrics"]
    # Constrained layout leaves the figure's title its own row above the panels' titles.
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.6 * len(tasks), 3.4), squeeze=False, layout="constrained")
    for ax, task, metric in zip(axes[0], tasks, metrics, strict=True):
        present = [m for m in methods if task in rows[m]["learned"]]
        means = [rows[m]["learned"][task]["mean"] for m in present]
        # The interval's half-width (results from before intervals existed carry only the std).
        bars = [rows[m]["learned"][task].get("ci95", rows[m]["learned"][task]["std"]) for m in present]
        ax.bar(
            range(len(present)),
            means,
            yerr=clipped_error_bars(means, bars),
            color=[f"C{methods.index(m)}" for m in present],
            capsize=2,
        )
        ax.axhline(first["reference"][task], color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(present)), present, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{task} ({metric})", fontsize=9)
    fig.suptitle(f"{variant}: score when learned (dashed: trivial reference)", fontsize=10)
    return save_figure(fig, out, f"{variant}_tasks")


def storage(rows: dict[str, Any], variant: str, out: str) -> str:
    methods = list(rows)
    tasks = next(iter(rows.values()))["tasks"][1:]
    best = {t: max(rows[m]["learned"][t]["mean"] for m in methods) for t in tasks}
    fig, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
    for k, method in enumerate(methods):
        rel = [rows[method]["learned"][t]["mean"] / best[t] for t in tasks if best[t] > 0]
        x, y = rows[method]["stored_parameters"], sum(rel) / max(len(rel), 1)
        ax.scatter([x], [y], color=f"C{k}")
        ax.annotate(method, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("parameters stored for all tasks")
    ax.set_ylabel(
        "score as a fraction of the best method's\n(mean over the tasks after T1; 1 = best on all)", fontsize=8
    )
    ax.set_title(f"{variant}: storage against accuracy", fontsize=10)
    return save_figure(fig, out, f"{variant}_storage")


def write_plots(summary: dict[str, Any], out: str) -> list[str]:
    paths = []
    for variant, rows in summary["variants"].items():
        paths += [forgetting(rows, variant, out), per_task(rows, variant, out)]
        if len(rows) > 1:
            paths.append(storage(rows, variant, out))
    return paths
