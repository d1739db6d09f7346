"""A run's data: the manifest under ``data.root``, built from the configured source when missing,
and checked against what the configured tasks need."""

from __future__ import annotations

import logging
from typing import Any

from conure_dist.config import RunConfig
from conure_dist.data.manifest import Manifest, TaskInfo, manifest_exists
from conure_dist.dist import DistInfo, barrier
from conure_dist.errors import UserError

log = logging.getLogger(__name__)


def prepare_data(cfg: RunConfig, dist: DistInfo) -> Manifest:
    """Load the manifest under ``data.root``, generating the shards first when there are none.

    Only rank 0 looks and generates; every rank then meets at the same barrier (a rank must not
    skip it because the manifest appeared in the meantime)."""
    root = cfg.data.root
    if dist.is_main and cfg.data.source != "none" and not manifest_exists(root):
        generate_shards(cfg)
    barrier(dist)
    if not manifest_exists(root):
        raise FileNotFoundError(
            f"no manifest.json under data.root={root}; build shards with `conure data ...` "
            "or set data.source to 'synthetic' or 'movielens'"
        )
    manifest = Manifest.load(root)
    if cfg.data.source != "none":
        differ = {key: (have, want) for key, (have, want) in _built_with(cfg, manifest).items() if have != want}
        if differ:
            listed = ", ".join(f"{key}={want} (the shards have {have})" for key, (have, want) in differ.items())
            raise UserError(f"data.root={root} holds shards built otherwise than this config asks: {listed}; "
                             "point data.root to another directory, or delete it to rebuild")
    return manifest


def _built_with(cfg: RunConfig, manifest: Manifest) -> dict[str, tuple[Any, Any]]:
    """Config key -> (what the shards were built with, what the config asks for)."""
    d = cfg.data
    pairs = {"data.split": ([manifest.split.get(k) for k in ("train", "valid", "test")], list(d.split)),
             "data.split_seed": (manifest.split.get("seed"), d.split_seed)}
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
    return pairs


def generate_shards(cfg: RunConfig) -> Manifest:
    """Write the shards of ``data.source`` (synthetic or MovieLens) under ``data.root``."""
    shard_args = {"instances_per_shard": cfg.data.instances_per_shard, "split": tuple(cfg.data.split)}
    if cfg.data.source == "synthetic":
        from data_tools.synthetic import SyntheticSpec, write_synthetic

        s = cfg.data.synthetic
        spec = SyntheticSpec(num_users=s.num_users, num_items=s.num_items, seq_len=s.seq_len, seed=s.seed,
                             relation=s.relation, relation_strength=s.relation_strength)
        log.info("generating synthetic shards under %s", cfg.data.root)
        return write_synthetic(cfg.data.root, spec, split_seed=cfg.data.split_seed, **shard_args)
    from data_tools.movielens import write_movielens

    log.info("converting MovieLens from %s to shards under %s", cfg.data.source_dir, cfg.data.root)
    return write_movielens(cfg.data.source_dir, cfg.data.root, seq_len=cfg.data.seq_len, seed=cfg.data.split_seed,
                           skip_bad_rows=cfg.data.skip_bad_rows, min_t1_interactions=cfg.data.min_t1_interactions,
                           **shard_args)


def check_tasks(cfg: RunConfig, manifest: Manifest) -> list[TaskInfo]:
    """The manifest's record of each configured task; the first task, and only it, is T1."""
    infos = []
    for i, task in enumerate(cfg.tasks):
        try:
            info = manifest.task(task.name)
        except ValueError as exc:
            raise UserError(f"tasks.{i}.name: {exc}") from None
        if (i == 0) != (info.kind == "sequence"):
            raise UserError(f"tasks.{i}: the first task, and only it, must be the sequence (T1) task; "
                             f"'{task.name}' is of kind '{info.kind}'")
        empty = [split for split in ("train", "valid", "test") if info.splits[split].num_instances == 0]
        if empty:
            raise UserError(f"tasks.{i}: task '{task.name}' has no {' and no '.join(empty)} instances under "
                             f"data.root={cfg.data.root}; it needs more data or larger data.split fractions")
        infos.append(info)
    return infos
