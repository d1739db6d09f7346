"""The communication model's picture from 8 to 256 GPUs at the paper's TTL sizes.

    python benchmarks/scaling_model.py --json benchmarks/results/scaling_model.json --plots docs/results/scale_ttl_cpu

Assumptions (printed with the figures): H100 SXM GPUs, 8 to a node, NVLink inside and one NDR
InfiniBand NIC per GPU between nodes (``comm_model.LINKS``); TTL's sizes (646K T1 items, 256
channels, 16 conv layers, 100-item sequences with 99 predicted positions, 20% shared negatives);
T1 items drawn from a Zipf law of exponent 1 (the synthetic TTL generator's); compute per step
from the measured single-H100 throughput (``benchmarks/results/h100.json``: bf16, compiled) as a
fixed optimizer part (Adam reads and writes 28 bytes per trainable parameter at 3.35 TB/s) plus
a per-sequence part. Communication is not overlapped with compute unless said.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from conure_dist.config import load_config
from conure_dist.model import TaskSpec
from conure_dist.scaling import comm_model as cm
from conure_dist.scaling.shapes import phase_shapes

ROOT = Path(__file__).resolve().parents[1]
SIZES = [8, 16, 32, 64, 128, 256]
TTL_TASKS = [
    TaskSpec("t1", "sequence", 646_000),
    TaskSpec("click", "item", 18_000),
    TaskSpec("thumbsup", "item", 8_000),
    TaskSpec("age", "class", 8),
    TaskSpec("gender", "class", 2),
    TaskSpec("life_status", "class", 6),
]
HBM_BYTES_PER_S = 3.35e12
ADAM_BYTES_PER_PARAM = 28


def compute_model(h100: dict[str, Any], t1_params: int, later_params: int) -> dict[str, dict[str, float]]:
    """Per step: a fixed optimizer time and a time per sequence, from the measured throughput."""
    out = {}
    for name, params, rate, batch in (
        ("t1", t1_params, h100["t1_seq_per_s"], h100["sizes"]["t1_batch"]),
        ("later", later_params, h100["later_seq_per_s"], h100["sizes"]["later_batch"]),
    ):
        optimizer = params * ADAM_BYTES_PER_PARAM / HBM_BYTES_PER_S
        out[name] = {"optimizer_s": optimizer, "per_sequence_s": (batch / rate - optimizer) / batch}
    return out


def _sizes(topo: cm.Topology, per_gpu: int, world: int, compute_s: float) -> dict[str, Any]:
    """What every predicted row starts with: the job's size and its compute time per step."""
    return {
        "world_size": world,
        "nodes": topo.num_nodes,
        "per_gpu_batch": per_gpu,
        "global_batch": per_gpu * world,
        "compute_ms": compute_s * 1e3,
    }


def t1_row(shape, per_gpu: int, world: int, compute: dict[str, float]) -> dict[str, Any]:
    topo = cm.topology(world)
    popularity = cm.zipf_popularity(shape.tables[0].rows, 1.0)
    batch = cm.SequenceBatch(per_gpu, 99.0, popularity, cm.num_negatives(shape.tables[0].rows, 0.2))
    rows = cm.expected_rows(batch, world)
    kinds = ["embedding" if "embedding" in t.name else "softmax" for t in shape.tables]
    local, union = [rows[k][0] for k in kinds], [rows[k][1] for k in kinds]
    choices = [cm.compare_exchanges(t, *rows[k], topo) for t, k in zip(shape.tables, kinds, strict=True)]
    sparse = [t for t, c in zip(shape.tables, choices, strict=True) if c.choice == "row_sparse"]
    dense_extra = sum(t.bytes for t in shape.tables if t not in sparse)

    def step(tables, extra, hierarchical=False):
        idx = [shape.tables.index(t) for t in tables]
        return cm.ddp_step(
            world,
            shape.dense_bytes + extra,
            tables,
            [[local[i] for i in idx]] * world,
            [union[i] for i in idx],
            topo=topo,
            hierarchical=hierarchical,
        )

    auto, auto_h = step(sparse, dense_extra), step(sparse, dense_extra, True)
    all_sparse, all_dense = step(list(shape.tables), 0), step([], shape.table_bytes)
    compute_s = compute["optimizer_s"] + per_gpu * compute["per_sequence_s"]
    return {
        **_sizes(topo, per_gpu, world, compute_s),
        "rows_local": dict(zip(kinds, local, strict=True)),
        "rows_union": dict(zip(kinds, union, strict=True)),
        "row_sparse_payload_mb": all_sparse.payload("row_sparse") / 1e6,
        "row_sparse_comm_ms": all_sparse.seconds() * 1e3,
        "dense_comm_ms": all_dense.seconds() * 1e3,
        "auto": {c.table.removeprefix("model."): c.choice for c in choices},
        "auto_comm_ms": auto.seconds() * 1e3,
        "auto_comm_hierarchical_ms": auto_h.seconds() * 1e3,
        "step_ms": (compute_s + auto.seconds()) * 1e3,
        "step_overlapped_ms": max(compute_s, auto.seconds()) * 1e3,
        "comm_share": auto.seconds() / (compute_s + auto.seconds()),
    }


def later_row(shape, per_gpu: int, world: int, compute: dict[str, float]) -> dict[str, Any]:
    topo = cm.topology(world)
    flat = cm.ddp_step(world, shape.dense_bytes, [], topo=topo)
    hier = cm.ddp_step(world, shape.dense_bytes, [], topo=topo, hierarchical=True)
    compute_s = compute["optimizer_s"] + per_gpu * compute["per_sequence_s"]
    return {
        **_sizes(topo, per_gpu, world, compute_s),
        "dense_payload_mb": shape.dense_bytes / 1e6,
        "comm_ms": flat.seconds() * 1e3,
        "comm_hierarchical_ms": hier.seconds() * 1e3,
        "step_ms": (compute_s + flat.seconds()) * 1e3,
        "step_overlapped_ms": max(compute_s, flat.seconds()) * 1e3,
        "comm_share": flat.seconds() / (compute_s + flat.seconds()),
    }


def predictions() -> dict[str, Any]:
    cfg = load_config(ROOT / "configs/ttl.yaml")
    shapes = {(s.task, s.mode): s for s in phase_shapes(cfg, 646_000, TTL_TASKS)}
    t1, click = shapes[("t1", "train")], shapes[("click", "train")]
    h100 = json.loads((ROOT / "benchmarks/results/h100.json").read_text())
    compute = compute_model(h100, t1.trainable_parameters, click.trainable_parameters)
    return {
        "assumptions": __doc__.split("Assumptions")[1].strip(),
        "links": {k: vars(v) for k, v in cm.LINKS.items()},
        "compute": compute,
        "t1_strong_global_32": [t1_row(t1, 32 // w, w, compute["t1"]) for w in SIZES if w <= 32],
        "t1_weak_4_per_gpu": [t1_row(t1, 4, w, compute["t1"]) for w in SIZES],
        "t1_weak_32_per_gpu": [t1_row(t1, 32, w, compute["t1"]) for w in SIZES],
        "later_strong_global_512": [later_row(click, 512 // w, w, compute["later"]) for w in SIZES],
        "later_weak_64_per_gpu": [later_row(click, 64, w, compute["later"]) for w in SIZES],
    }


def markdown(pred: dict[str, Any]) -> str:
    lines = []
    for key, rows in pred.items():
        if not key.startswith(("t1_", "later_")):
            continue
        lines += [f"### {key}", ""]
        if key.startswith("t1_"):
            lines += [
                "| GPUs | nodes | batch/GPU | global | compute ms | row-sparse MB | row-sparse ms | dense ms "
                "| auto (emb, W, b) | auto ms | auto hier. ms | step ms | overlapped ms | comm share |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                auto = ", ".join("rs" if c == "row_sparse" else "dense" for c in r["auto"].values())
                lines.append(
                    f"| {r['world_size']} | {r['nodes']} | {r['per_gpu_batch']} | {r['global_batch']} "
                    f"| {r['compute_ms']:.2f} | {r['row_sparse_payload_mb']:.0f} | {r['row_sparse_comm_ms']:.2f} "
                    f"| {r['dense_comm_ms']:.2f} | {auto} | {r['auto_comm_ms']:.2f} "
                    f"| {r['auto_comm_hierarchical_ms']:.2f} | {r['step_ms']:.2f} | {r['step_overlapped_ms']:.2f} "
                    f"| {r['comm_share']:.0%} |"
                )
        else:
            lines += [
                "| GPUs | nodes | batch/GPU | global | compute ms | dense MB | comm ms | hier. ms | step ms "
                "| overlapped ms | comm share |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                lines.append(
                    f"| {r['world_size']} | {r['nodes']} | {r['per_gpu_batch']} | {r['global_batch']} "
                    f"| {r['compute_ms']:.2f} | {r['dense_payload_mb']:.1f} | {r['comm_ms']:.2f} "
                    f"| {r['comm_hierarchical_ms']:.2f} | {r['step_ms']:.2f} | {r['step_overlapped_ms']:.2f} "
                    f"| {r['comm_share']:.0%} |"
                )
        lines.append("")
    return "\n".join(lines)


def predicted_plot(pred: dict[str, Any], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conure_dist.experiment.plots import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    for ax, key, title in (
        (axes[0], "t1_weak_4_per_gpu", "T1, 4 sequences per GPU"),
        (axes[1], "later_weak_64_per_gpu", "later task (click), 64 per GPU"),
    ):
        rows = pred[key]
        sizes = [r["world_size"] for r in rows]
        comm = [r.get("auto_comm_ms", r.get("comm_ms")) for r in rows]
        hier = [r.get("auto_comm_hierarchical_ms", r.get("comm_hierarchical_ms")) for r in rows]
        ax.plot(sizes, [r["compute_ms"] for r in rows], "k-", label="compute")
        ax.plot(sizes, comm, "C0o-", label="communication (flat ring)")
        ax.plot(sizes, hier, "C1s--", label="communication (hierarchical)")
        if key.startswith("t1"):
            ax.plot(sizes, [r["dense_comm_ms"] for r in rows], "C3^:", label="all tables dense")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs (8 per node)")
        ax.set_ylabel("ms per step")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    return save_figure(fig, out, "predicted_h100")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the predictions here")
    parser.add_argument("--plots", help="folder for plots/*.png")
    args = parser.parse_args()
    pred = predictions()
    print(markdown(pred))
    if args.json:
        Path(args.json).write_text(json.dumps(pred, indent=1) + "\n")
    if args.plots:
        print(predicted_plot(pred, args.plots))


if __name__ == "__main__":
    main()
