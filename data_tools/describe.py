"""Validate and describe existing shards: ``conure data describe ROOT [--json]`` (also
``python -m data_tools.describe ROOT``), for a local directory or a URL (``s3://bucket/prefix``).

Every shard is read whole and checked as training reads it (``stream.read_shard``): present,
size and sha256 as the manifest records them (where it records no sha256, the description says
so), readable, and holding the instances the manifest counts. Per task and split it prints the
instance count, the shard count and the bytes, and per task a sample instance (the first of its
train split). A shard at fault ends it with exit code 1 and one line naming the shard.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from conure_dist.data.manifest import SPLITS, Manifest, TaskInfo
from conure_dist.data.stream import read_shard


def describe_root(root: str) -> dict[str, Any]:
    """What ``root`` holds, every shard verified; raises ``ShardError`` naming a shard at fault,
    ``ValueError`` naming another file at fault, ``FileNotFoundError`` without a manifest."""
    manifest = Manifest.load(root)
    return {
        "root": root,
        "dataset": manifest.dataset,
        "seq_len": manifest.seq_len,
        "split": manifest.split,
        "skipped_rows": manifest.skipped_rows,
        "tasks": [_describe_task(manifest, task) for task in manifest.tasks],
    }


def _describe_task(manifest: Manifest, task: TaskInfo) -> dict[str, Any]:
    splits, sample = {}, None
    for split in SPLITS:
        info = task.splits[split]
        for url, shard in zip(manifest.shard_urls(task.name, split), info.shards, strict=True):
            arrays = read_shard(url, shard, manifest.seq_len, has_target=task.kind != "sequence")
            if sample is None and split == "train":
                sample = {name: values[0].tolist() for name, values in arrays.items()}
        with_sha = sum(s.sha256 is not None for s in info.shards)
        splits[split] = {
            "instances": info.num_instances,
            "shards": len(info.shards),
            "bytes": sum(s.num_bytes for s in info.shards),
            "sha256_verified": with_sha,
            "sha256_not_recorded": len(info.shards) - with_sha,
        }
    manifest.load_train_counts(task.name)  # present, and one count per output
    if sample is not None and task.class_names is not None:
        sample["class_name"] = task.class_names[sample["target"]]
    return {
        "name": task.name,
        "kind": task.kind,
        "num_outputs": task.num_outputs,
        "bytes": sum(s["bytes"] for s in splits.values()),
        "splits": splits,
        "sample": sample,
    }


def format_description(d: dict[str, Any]) -> str:
    split = d["split"]
    lines = [
        f"{d['root']}: {d['dataset']}, seq_len {d['seq_len']}, split "
        f"{split['train']}/{split['valid']}/{split['test']} (seed {split['seed']}), {len(d['tasks'])} tasks",
        f"{'task':12s} {'kind':8s} {'outputs':>7s}  {'split':5s} {'instances':>9s} {'shards':>6s} "
        f"{'bytes':>11s}  sha256",
    ]
    for task in d["tasks"]:
        for i, (name, s) in enumerate(task["splits"].items()):
            head = f"{task['name']:12s} {task['kind']:8s} {task['num_outputs']:7d}" if i == 0 else " " * 29
            sha = f"{s['sha256_verified']} verified" + (
                f", {s['sha256_not_recorded']} not recorded" if s["sha256_not_recorded"] else ""
            )
            lines.append(f"{head}  {name:5s} {s['instances']:9d} {s['shards']:6d} {s['bytes']:11d}  {sha}")
        lines.append(
            f"{'':29s}  {'all':5s} {sum(s['instances'] for s in task['splits'].values()):9d} "
            f"{sum(s['shards'] for s in task['splits'].values()):6d} {task['bytes']:11d}"
        )
    for task in d["tasks"]:
        lines.append(f"sample of {task['name']}: {_format_sample(task['sample'])}")
    shards = [s for t in d["tasks"] for s in t["splits"].values()]
    unrecorded = sum(s["sha256_not_recorded"] for s in shards)
    lines.append(
        f"all {sum(s['shards'] for s in shards)} shards verified ({sum(t['bytes'] for t in d['tasks'])} "
        "bytes): size, instance count and sha256"
        + (f" ({unrecorded} shards have no sha256 in the manifest: size and count checked only)" if unrecorded else "")
    )
    if d["skipped_rows"]:
        lines.append(f"rows skipped when converting: {d['skipped_rows']}")
    return "\n".join(lines)


def _format_sample(sample: dict[str, Any] | None) -> str:
    if sample is None:
        return "(no training instance)"
    items = [i for i in sample["seq"] if i != 0]
    text = f"user {sample['user']}, T1 items {items}"
    if "target" in sample:
        text += f" -> target {sample['target']}"
        if "class_name" in sample:
            text += f" ({sample['class_name']})"
    return text


def describe_command(root: str, as_json: bool = False) -> int:
    """Print the description of ``root``; exit code 1 and one line on stderr naming what is at fault."""
    try:
        description = describe_root(root)
    except (ValueError, FileNotFoundError) as exc:  # ShardError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(description, indent=1) if as_json else format_description(description))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.describe", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="data root (directory or URL such as s3://bucket/prefix) holding manifest.json")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    args = parser.parse_args(argv)
    return describe_command(args.root, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
