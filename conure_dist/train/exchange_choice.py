"""``dist.sparse_exchange``: which item tables of a phase DDP averages row-sparsely.

``auto`` asks the communication model (``conure_dist.scaling.comm_model``) for each trainable item
table: the expected rows one rank touches and the union over ranks (T1's popularity from its
train counts, the phase's per-rank batch, T1's shared negatives), then the predicted time of the
row-sparse exchange against a dense all-reduce on this job's links (gloo on one host; NVLink
inside a node and InfiniBand between nodes for NCCL). Both exchanges average the same gradients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from conure_dist.config import RunConfig
from conure_dist.data.manifest import Manifest, TaskInfo
from conure_dist.dist import DistInfo
from conure_dist.scaling import comm_model as cm


@dataclass
class ExchangePlan:
    """The tables exchanged row-sparsely, and what the model predicted for every item table."""

    row_sparse: list[str]
    predictions: list[cm.ExchangeChoice]
    link: str
    tables: list[cm.Table]

    def summary(self) -> str:
        return ", ".join(
            f"{p.table.removeprefix('model.')} {'row_sparse' if p.table in self.row_sparse else 'dense'} "
            f"(predicted row-sparse {p.row_sparse_seconds * 1e3:.3g} ms, dense {p.dense_seconds * 1e3:.3g} ms)"
            for p in self.predictions
        )

    def record(self) -> dict[str, Any]:
        return {
            "link": self.link,
            "row_sparse": self.row_sparse,
            "tables": [{**asdict(p), "choice": p.choice} for p in self.predictions],
        }


def job_topology(dist: DistInfo) -> cm.Topology:
    """This job's links as the model knows them."""
    if dist.backend == "gloo" or dist.device.type != "cuda":
        return cm.topology(dist.world_size, dist.world_size, "gloo", "ethernet")
    return cm.topology(dist.world_size, dist.ranks_per_node or dist.world_size, "nvlink", "infiniband")


def table_kind(name: str) -> str:
    return "embedding" if "embedding" in name else "softmax"


def sequence_batch(cfg: RunConfig, manifest: Manifest, infos: list[TaskInfo], info: TaskInfo, per_rank: int):
    """The model's view of one rank's batch: T1's item popularity and tokens per sequence (its
    train counts over its train instances), and the shared negatives (T1's train phase only)."""
    first = infos[0]
    counts = manifest.load_train_counts(first.name)
    tokens = counts.sum() / max(first.splits["train"].num_instances, 1)
    negatives = cm.num_negatives(first.num_outputs, cfg.train.negative_fraction) if info.kind == "sequence" else 0
    return cm.SequenceBatch(per_rank, float(tokens), cm.popularity_from_counts(counts), negatives)


def plan_exchange(
    cfg: RunConfig,
    manifest: Manifest,
    infos: list[TaskInfo],
    info: TaskInfo,
    dist: DistInfo,
    trainable: dict[str, nn.Parameter],
    table_names: list[str],
    global_batch: int,
) -> ExchangePlan:
    """Which of ``table_names`` (trainable in this phase) to exchange row-sparsely under DDP."""
    names = [n for n in table_names if n in trainable]
    topo = job_topology(dist)
    tables = [cm.Table(n, trainable[n].shape[0], trainable[n][0].numel()) for n in names]
    predictions = []
    if names and dist.is_distributed:
        batch = sequence_batch(cfg, manifest, infos, info, global_batch // dist.world_size)
        rows = cm.expected_rows(batch, dist.world_size)
        predictions = [cm.compare_exchanges(t, *rows[table_kind(t.name)], topo) for t in tables]
    mode = cfg.dist.sparse_exchange
    if not dist.is_distributed:  # nothing is exchanged
        chosen = []
    elif mode == "auto":
        chosen = [p.table for p in predictions if p.choice == "row_sparse"]
    else:
        chosen = names if mode == "row_sparse" else []
    return ExchangePlan(chosen, predictions, topo.intra.name if topo.num_nodes == 1 else topo.inter.name, tables)
