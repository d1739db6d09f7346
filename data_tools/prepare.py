"""Building a dataset's shards from ``data`` keys: those of ``conure data``'s flags
(``config.data_flags``), or a run config's, when ``conure run`` or ``conure experiment`` finds
no shards under ``data.root`` (``build_missing_shards``). The library itself only reads shards
(``conure_dist.data.dataset``)."""

from __future__ import annotations

import logging
import os

from conure_dist.config import DataConfig
from conure_dist.data.manifest import Manifest, manifest_exists
from conure_dist.dist import DistInfo, barrier
from conure_dist.fs import is_relative_local

log = logging.getLogger(__name__)


def build_missing_shards(data: DataConfig, dist: DistInfo) -> None:
    """Build the shards of ``data.source`` under ``data.root`` when it holds no manifest yet.

    Only rank 0 looks and builds; every rank then meets at the same barrier (a rank must not
    skip it because the manifest appeared in the meantime)."""
    if dist.is_main and data.source != "none" and not manifest_exists(data.root):
        log.info("building the %s shards under %s", data.source, where(data.root))
        write_shards(data.source, data)
    barrier(dist)


def where(root: str) -> str:
    """``root`` as a reader should find it: a relative local path made absolute, saying so."""
    if not is_relative_local(root):
        return root
    return (
        f"{os.path.abspath(root)} (data.root={root} is relative to the current directory; "
        "set data.root to build them elsewhere)"
    )


def write_shards(
    source: str, data: DataConfig, *, layout: str | None = None, pretrain: str | None = None, task_files: list[str] = ()
) -> Manifest:
    """Write the shards of ``source`` that ``data`` describes under ``data.root``. ``layout``
    (MovieLens, detected when None), ``pretrain`` and ``task_files`` (TTL, ``NAME=KIND:PATH``) are
    the ``conure data`` flags without a config key."""
    shard_args = {
        "instances_per_shard": data.instances_per_shard,
        "split": tuple(data.split),
        "protocol": data.split_protocol,
    }
    if source == "synthetic":
        from data_tools.synthetic import SyntheticSpec, write_synthetic

        s = data.synthetic
        spec = SyntheticSpec(
            num_users=s.num_users,
            num_items=s.num_items,
            seq_len=s.seq_len,
            seed=s.seed,
            relation=s.relation,
            relation_strength=s.relation_strength,
        )
        return write_synthetic(data.root, spec, split_seed=data.split_seed, **shard_args)
    if source == "movielens":
        from data_tools.movielens import write_movielens

        log.info("converting MovieLens from %s", data.source_dir)
        return write_movielens(
            data.source_dir,
            data.root,
            seq_len=data.seq_len,
            seed=data.split_seed,
            layout=layout,
            skip_bad_rows=data.skip_bad_rows,
            min_t1_interactions=data.min_t1_interactions,
            t1_ratings=data.t1_ratings,
            **shard_args,
        )
    assert source == "ttl" and pretrain is not None, f"no shard writer for source '{source}'"
    from data_tools.ttl import TaskFile, write_ttl

    return write_ttl(
        pretrain,
        [TaskFile.parse(t) for t in task_files],
        data.root,
        seq_len=data.seq_len,
        seed=data.split_seed,
        skip_bad_rows=data.skip_bad_rows,
        **shard_args,
    )


def log_summary(manifest: Manifest) -> None:
    """One line per task: kind, outputs, instances per split; and the rows skipped."""
    for task in manifest.tasks:
        sizes = ", ".join(f"{s} {task.splits[s].num_instances}" for s in ("train", "valid", "test"))
        log.info("%-12s %-8s outputs %-6d %s", task.name, task.kind, task.num_outputs, sizes)
    if manifest.skipped_rows:
        log.warning("skipped rows: %s", manifest.skipped_rows)
