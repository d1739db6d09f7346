"""A long synthetic task sequence, for runs with more tasks than a fixed backbone holds.

The embedded synthetic dataset (``synthetic.generate``: T1, click, like, gender, age) followed by
``num_tasks - 5`` profile tasks ``p01``, ``p02``, ...: task ``j`` scores each user by the mean of
a random item weighting over the items of their T1 history, plus noise, and cuts the scores into
``classes`` equal-frequency classes. Each label is therefore a (noisy) function of the history
that the backbone can learn, and different tasks weigh the items differently: a later task needs
weights of its own. The same arguments give the same shards.

    python -m data_tools.synthetic_tasks --out runs/data/tasks12 --num-tasks 12
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

import numpy as np

from conure_dist.data.manifest import Manifest
from conure_dist.errors import UserError
from data_tools.shards import TaskData, write_dataset
from data_tools.synthetic import SyntheticSpec, generate

BASE_TASKS = 5
"""T1 and the four later tasks of the embedded synthetic dataset."""


def profile_task(
    name: str, t1_seqs: np.ndarray, num_items: int, classes: int, noise: float, rng: np.random.Generator
) -> TaskData:
    """One profile task: equal-frequency classes of a noisy random item weighting of the history."""
    weights = rng.standard_normal(num_items + 1)
    weights[0] = 0.0  # padding carries nothing
    lengths = np.maximum((t1_seqs != 0).sum(1), 1)
    score = weights[t1_seqs].sum(1) / lengths
    score = (score - score.mean()) / (score.std() + 1e-12) + noise * rng.standard_normal(len(score))
    edges = np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1])
    labels = np.searchsorted(edges, score, side="right").astype(np.int64)
    return TaskData(
        name=name,
        kind="class",
        seqs=None,
        users=np.arange(len(t1_seqs), dtype=np.int64),
        targets=labels,
        num_classes=classes,
        class_names=[f"c{i}" for i in range(classes)],
    )


def generate_tasks(
    num_tasks: int, spec: SyntheticSpec, classes: int = 3, noise: float = 0.5
) -> tuple[np.ndarray, list[TaskData], dict[str, Any]]:
    """T1 sequences, the ``num_tasks`` tasks (T1 first), and the source record of the manifest."""
    if num_tasks < BASE_TASKS:
        raise UserError(f"num_tasks must be >= {BASE_TASKS} (the embedded dataset's tasks), got {num_tasks}")
    if classes < 2:
        raise UserError(f"classes must be >= 2, got {classes}")
    t1_seqs, tasks, source = generate(spec)
    rng = np.random.default_rng([spec.seed, num_tasks, 7])
    for j in range(1, num_tasks - BASE_TASKS + 1):
        tasks.append(profile_task(f"p{j:02d}", t1_seqs, spec.num_items, classes, noise, rng))
    return (
        t1_seqs,
        tasks,
        {
            **source,
            "generator": "synthetic_tasks",
            "num_tasks": num_tasks,
            "classes": classes,
            "noise": noise,
            "spec": asdict(spec),
        },
    )


def write_synthetic_tasks(
    out: str,
    num_tasks: int,
    spec: SyntheticSpec | None = None,
    *,
    classes: int = 3,
    noise: float = 0.5,
    split_seed: int = 0,
    instances_per_shard: int = 50_000,
    protocol: str = "random",
) -> Manifest:
    """Generate ``num_tasks`` tasks and write them as shards + manifest under ``out``
    (``protocol``: ``shards.split_task``)."""
    t1_seqs, tasks, source = generate_tasks(num_tasks, spec or SyntheticSpec(), classes, noise)
    return write_dataset(
        out,
        dataset="synthetic_tasks",
        t1_seqs=t1_seqs,
        tasks=tasks,
        seed=split_seed,
        source=source,
        skipped_rows={},
        instances_per_shard=instances_per_shard,
        protocol=protocol,
    )


def main(argv: list[str] | None = None) -> Manifest:
    parser = argparse.ArgumentParser(prog="python -m data_tools.synthetic_tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output root (local path or fsspec URL)")
    parser.add_argument("--num-tasks", type=int, default=12, help="tasks in all, T1 included (>= 5)")
    parser.add_argument("--num-users", type=int, default=3000)
    parser.add_argument("--num-items", type=int, default=500)
    parser.add_argument("--seq-len", type=int, default=20)
    parser.add_argument("--classes", type=int, default=3, help="classes of every added profile task")
    parser.add_argument("--noise", type=float, default=0.5, help="label noise (std, in units of the score's std)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instances-per-shard", type=int, default=2000)
    args = parser.parse_args(argv)
    spec = SyntheticSpec(num_users=args.num_users, num_items=args.num_items, seq_len=args.seq_len, seed=args.seed)
    manifest = write_synthetic_tasks(
        args.out,
        args.num_tasks,
        spec,
        classes=args.classes,
        noise=args.noise,
        instances_per_shard=args.instances_per_shard,
    )
    print(f"wrote {len(manifest.tasks)} tasks under {args.out}: {', '.join(t.name for t in manifest.tasks)}")
    return manifest


if __name__ == "__main__":
    main()
