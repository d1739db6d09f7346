"""A run's dataset: the manifest under ``data.root``, checked against the run config.

The library only reads shards. Where ``data.root`` holds none, ``open_dataset`` raises an error
that names the ``conure data ...`` command building them (``config.data_flags``); ``conure run``
and ``conure experiment`` build missing shards before the run starts (``data_tools.prepare``).
"""

from __future__ import annotations

import os
from typing import Any

from conure_dist.config import RunConfig
from conure_dist.config.data_flags import data_command
from conure_dist.data.manifest import Manifest, TaskInfo, manifest_exists
from conure_dist.errors import UserError
from conure_dist.fs import is_relative_local


class MissingShardsError(FileNotFoundError):
    """``data.root`` holds no ``manifest.json``; the message says how to build the shards."""


def open_dataset(cfg: RunConfig) -> tuple[Manifest, list[TaskInfo]]:
    """The manifest under ``data.root`` and its record of each configured task, in task order.

    Refuses shards built otherwise than the config's ``data`` keys ask (for ``data.source``
    synthetic or movielens) and tasks the shards lack or hold no instances of."""
    root = cfg.data.root
    if not manifest_exists(root):
        raise MissingShardsError(missing_shards_message(cfg))
    manifest = Manifest.load(root)
    if cfg.data.source != "none":
        differ = {key: (have, want) for key, (have, want) in _built_with(cfg, manifest).items() if have != want}
        if differ:
            listed = ", ".join(f"{key}={want} (the shards have {have})" for key, (have, want) in differ.items())
            raise UserError(
                f"data.root={root} holds shards built otherwise than this config asks: {listed}; "
                "point data.root to another directory, or delete it to rebuild"
            )
    return manifest, check_tasks(cfg, manifest)


def missing_shards_message(cfg: RunConfig) -> str:
    root = cfg.data.root
    shown = f"{root} ({os.path.abspath(root)})" if is_relative_local(root) else root
    command = data_command(cfg.data)
    if command is None:
        return (
            f"no manifest.json under data.root={shown}: build shards there with `conure data "
            f"synthetic|movielens|ttl ... --out {root}` (`conure data SOURCE --help` lists the flags), or set "
            "data.source to 'synthetic' or 'movielens' so that `conure run` builds them on first use"
        )
    return (
        f"no manifest.json under data.root={shown}: build the shards with `{command}` "
        "(`conure run` and `conure experiment` build them on first use)"
    )


def _built_with(cfg: RunConfig, manifest: Manifest) -> dict[str, tuple[Any, Any]]:
    """Config key -> (what the shards were built with, what the config asks for)."""
    d = cfg.data
    pairs = {
        "data.split": ([manifest.split.get(k) for k in ("train", "valid", "test")], list(d.split)),
        "data.split_seed": (manifest.split.get("seed"), d.split_seed),
        "data.split_protocol": (manifest.split.get("protocol", "random"), d.split_protocol),
    }
    if d.source == "synthetic":
        spec = manifest.source.get("spec", {})
        # Shards written before a key existed were built with its default.
        defaults = {"relation": "shared_taste", "relation_strength": 1.0}
        for key in ("num_users", "num_items", "seq_len", "seed", *defaults):
            pairs[f"data.synthetic.{key}"] = (spec.get(key, defaults.get(key)), getattr(d.synthetic, key))
    else:
        pairs["data.seq_len"] = (manifest.seq_len, d.seq_len)
        recipe = manifest.source.get("recipe", {})
        pairs["data.min_t1_interactions"] = (recipe.get("min_t1_interactions", 0), d.min_t1_interactions)
        if d.source == "movielens":
            t1_all = recipe.get("t1") == "most recent ratings, all of them"
            pairs["data.t1_ratings"] = ("all" if t1_all else "below_4", d.t1_ratings)
    return pairs


def check_tasks(cfg: RunConfig, manifest: Manifest) -> list[TaskInfo]:
    """The manifest's record of each configured task; the first task, and only it, is T1."""
    infos = []
    for i, task in enumerate(cfg.tasks):
        try:
            info = manifest.task(task.name)
        except ValueError as exc:
            raise UserError(f"tasks.{i}.name: {exc}") from None
        if (i == 0) != (info.kind == "sequence"):
            raise UserError(
                f"tasks.{i}: the first task, and only it, must be the sequence (T1) task; "
                f"'{task.name}' is of kind '{info.kind}'"
            )
        empty = [split for split in ("train", "valid", "test") if info.splits[split].num_instances == 0]
        if empty:
            raise UserError(
                f"tasks.{i}: task '{task.name}' has no {' and no '.join(empty)} instances under "
                f"data.root={cfg.data.root}; it needs more data or larger data.split fractions"
            )
        infos.append(info)
    return infos
