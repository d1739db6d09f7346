"""The table that ``benchmarks/gpu_suite.sh`` ends with: each target, the measured figure and the
step model's prediction for the card that ran it.

    python benchmarks/suite_table.py OUTDIR     # reads OUTDIR/{targets,phases,stall,probe}.json

Writes OUTDIR/table.json and prints one line per target. A figure whose step failed or did not
run reads ``-`` (its step's log says why); ``met`` is empty then.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_model  # noqa: E402

TARGETS = (
    ("T1 sequences/s", ">=", 15_000),
    ("later task sequences/s", ">=", 250_000),
    ("evaluation users/s", ">=", 300_000),
    ("evaluation users/s under bf16 (fused ranks)", ">=", 300_000),
    ("T1 peak memory GB", "<=", 24),
    ("end to end / benchmark (T1 loop)", ">=", 0.9),
    ("phase-end checkpoint stall s", "<", 2),
)


def _load(out: str, name: str) -> dict | list | None:
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _get(data: Any, *keys: str | int) -> Any:
    for key in keys:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def card_for(device_name: str | None, device: str) -> step_model.Card:
    """The step model's card for the device that ran the suite (the CPU calibrated here)."""
    name = (device_name or "").lower()
    for key, card in step_model.CARDS.items():
        if key in name:
            return card
    return step_model.calibrate_cpu() if device == "cpu" else step_model.CARDS["h100"]


def predictions(targets: dict) -> dict[str, float]:
    """The step model's figures at the sizes and settings ``targets.py`` measured."""
    sizes = targets.get("sizes", {})
    cuda = targets.get("device", "cpu") != "cpu"
    s = replace(
        step_model.Sizes(),
        batch=sizes.get("batch", 256),
        seq_len=sizes.get("seq_len", 100),
        channels=sizes.get("channels", 256),
        items=sizes.get("items", 646_000),
        later_items=sizes.get("later_items", 646_000),
        later_batch=sizes.get("later_batch", 4096),
        eval_users=sizes.get("eval_users", 4096),
        dilations=tuple(sizes.get("dilations", step_model.Sizes.dilations)),
        act_bytes=2 if targets.get("precision") == "bf16" else 4,
        softmax="fused" if cuda else "chunked",
        l2_folded=bool(_get(targets, "t1_step", "l2_folded")),
        deterministic=bool(targets.get("deterministic", False)),
    )
    card = card_for(targets.get("device_name"), targets.get("device", "cpu"))
    figures = step_model.predict(s, card)
    fused = bool(_get(targets, "eval", "fused_ranks"))
    return {
        "card": card.name,
        "T1 sequences/s": figures["t1_seq_per_s"],
        "later task sequences/s": figures["later_seq_per_s"],
        "evaluation users/s": figures["eval_users_per_s_fused" if fused else "eval_users_per_s"],
        "evaluation users/s under bf16 (fused ranks)": figures[
            "eval_users_per_s_fused" if _get(targets, "eval_bf16", "fused_ranks") else "eval_users_per_s"
        ],
    }


def measured(out: str) -> dict[str, float | None]:
    targets, phases, stall = _load(out, "targets") or {}, _load(out, "phases") or [], _load(out, "stall")
    t1 = _get(targets, "t1_step", "seq_per_s")
    loop = next((r.get("loop_sequences_per_s") for r in phases if r.get("phase") == "train"), None)
    return {
        "T1 sequences/s": t1,
        "later task sequences/s": _get(targets, "later_step", "seq_per_s"),
        "evaluation users/s": _get(targets, "eval", "users_per_s"),
        "evaluation users/s under bf16 (fused ranks)": _get(targets, "eval_bf16", "users_per_s"),
        "T1 peak memory GB": _get(targets, "t1_step", "peak_memory_gb"),
        "end to end / benchmark (T1 loop)": loop / t1 if loop and t1 else None,
        "phase-end checkpoint stall s": _get(stall, "results", 0, "async", "save_s"),
    }


def table(out: str) -> dict[str, Any]:
    targets = _load(out, "targets") or {}
    got = measured(out)
    try:
        predicted = predictions(targets)
    except Exception as exc:  # the table still shows what was measured
        predicted = {"card": f"no prediction ({type(exc).__name__}: {exc})"}
    rows = []
    for name, op, goal in TARGETS:
        value = got[name]
        met = None if value is None else {">=": value >= goal, "<=": value <= goal, "<": value < goal}[op]
        rows.append(
            {"target": name, "goal": f"{op} {goal:,}", "measured": value, "predicted": predicted.get(name), "met": met}
        )
    probe = _load(out, "probe") or {}
    return {"device": targets.get("device_name"), "card": predicted.get("card"), "probe": probe, "rows": rows}


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def render(report: dict[str, Any]) -> str:
    lines = [f"device: {report['device']}; step model: {report['card']}; kernel probe: {report['probe'] or '-'}"]
    lines.append(f"{'target':44} {'goal':>10} {'measured':>12} {'predicted':>12}  met")
    for r in report["rows"]:
        met = "" if r["met"] is None else "yes" if r["met"] else "NO"
        lines.append(f"{r['target']:44} {r['goal']:>10} {_fmt(r['measured']):>12} {_fmt(r['predicted']):>12}  {met}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    args = parser.parse_args()
    report = table(args.out)
    with open(os.path.join(args.out, "table.json"), "w") as f:
        f.write(json.dumps(report, indent=1) + "\n")
    print(render(report))


if __name__ == "__main__":
    main()
