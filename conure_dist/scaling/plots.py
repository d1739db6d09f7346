"""``conure scale``'s plots, one point per world size that finished:

* ``throughput.png``: sequences/s per phase against world size, with linear scaling from the
  smallest size dashed;
* ``step_split.png``: per phase, the step time split into data wait, forward+backward,
  communication and optimizer;
* ``bytes.png``: bytes each rank hands to collectives per step, measured (dots) and predicted by
  the communication model (lines).
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from conure_dist.experiment.plots import save_figure  # noqa: E402
from conure_dist.train.profile import TIMED_PARTS as PARTS  # noqa: E402


def _sizes(rows: dict[str, Any]) -> list[int]:
    return [int(w) for w in rows]


def throughput(summary: dict[str, Any], out: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
    for k, (name, rows) in enumerate(summary["phases"].items()):
        sizes = _sizes(rows)
        rates = [rows[str(w)]["sequences_per_s"] for w in sizes]
        ax.plot(sizes, rates, "o-", color=f"C{k}", label=name)
        ax.plot(sizes, [rates[0] * w / sizes[0] for w in sizes], "--", color=f"C{k}", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("world size")
    ax.set_ylabel("sequences / s")
    ax.set_title(f"throughput ({summary['mode']} scaling; dashed: linear)", fontsize=9)
    ax.legend(fontsize=6)
    return save_figure(fig, out, "throughput")


def step_split(summary: dict[str, Any], out: str) -> str:
    names = list(summary["phases"])
    fig, axes = plt.subplots(1, len(names), figsize=(2.4 * len(names), 3.2), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names, strict=True):
        rows = summary["phases"][name]
        sizes = _sizes(rows)
        bottom = [0.0] * len(sizes)
        for k, part in enumerate(PARTS):
            ms = [rows[str(w)]["seconds"][part] * 1e3 for w in sizes]
            ax.bar(range(len(sizes)), ms, bottom=bottom, color=f"C{k}", label=part)
            bottom = [b + m for b, m in zip(bottom, ms, strict=True)]
        ax.set_xticks(range(len(sizes)), [str(w) for w in sizes])
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("world size", fontsize=7)
    axes[0][0].set_ylabel("ms per step")
    axes[0][-1].legend(fontsize=6)
    return save_figure(fig, out, "step_split")


def exchanged_bytes(summary: dict[str, Any], out: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
    for k, (name, rows) in enumerate(summary["phases"].items()):
        sizes = [w for w in _sizes(rows) if w > 1]
        if not sizes:
            continue
        ax.plot(sizes, [rows[str(w)]["bytes_total"] for w in sizes], "o", color=f"C{k}", label=f"{name} measured")
        predicted = [rows[str(w)]["predicted_bytes_total"] for w in sizes]
        ax.plot(sizes, predicted, "-", color=f"C{k}", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("world size")
    ax.set_ylabel("bytes per rank per step")
    ax.set_title("exchanged bytes (dots: counted; lines: model)", fontsize=9)
    ax.legend(fontsize=6)
    return save_figure(fig, out, "bytes")


def write_plots(summary: dict[str, Any], out: str) -> list[str]:
    if not summary["phases"]:
        return []
    return [throughput(summary, out), step_split(summary, out), exchanged_bytes(summary, out)]
