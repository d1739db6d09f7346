"""What one training step exchanges between data-parallel ranks, in bytes and seconds.

Per step, a rank of ``TorchEngine`` (DDP) takes part in:

* ``dense``: DDP's all-reduce of the dense gradient buckets (every trainable tensor but the
  row-sparse item tables), fp32;
* ``loss``: the all-reduce of the step's example count and loss sum (two float64; with gradient
  accumulation two all-reduces of one float64 each);
* ``row_sparse`` (``train/sparse_sync.py``): an all-gather of the per-table row counts (int64
  each), an all-gather of the padded row ids (int64, as wide as the widest rank's), an all-reduce
  of the rows in the union over ranks (fp32 values).

A table exchanged ``dense`` instead joins DDP's buckets with all its rows. DeepSpeed ZeRO-1/2
reduce-scatters the gradients and all-gathers the updated parameters (predicted here, not
counted at the seam).

*Payload* bytes are what a rank hands to a collective (a tensor's size: what the counting seam in
``train/comm_count.py`` measures); *wire* bytes are what a ring algorithm sends per rank; the time
is the ring's: ``steps x (latency + chunk / bandwidth)``. Ring all-reduce of S bytes over W ranks:
2(W-1) steps of S/W; all-gather of s bytes per rank: W-1 steps of s; reduce-scatter: W-1 steps of
S/W. Across nodes a flat ring runs at the slowest link; the hierarchical all-reduce (reduce-scatter
inside the node, all-reduce of 1/G of the buffer between nodes, all-gather inside the node) sends
G times less over the inter-node link.

Touched rows are exact when the batch is given (``touched_rows``) and expected otherwise
(``expected_distinct``: the number of distinct items in n draws from a popularity law).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from conure_dist.train.samplers import num_negatives  # noqa: F401  (T1's negatives, as training draws them)

F32, I64, F64 = 4, 8, 8


@dataclass(frozen=True)
class Link:
    """A kind of link between two ranks: the bandwidth one rank attains in a ring (bytes/s, one
    direction) and the latency of one ring step (s)."""

    name: str
    bandwidth: float
    latency: float
    note: str = ""


LINKS: dict[str, Link] = {
    "nvlink": Link("nvlink", 300e9, 5e-6, "H100 SXM NVLink 4 (450 GB/s nominal per direction; ~2/3 reached by rings)"),
    "infiniband": Link("infiniband", 45e9, 10e-6, "NDR 400 Gb/s, one NIC per GPU"),
    "ethernet": Link("ethernet", 10e9, 30e-6, "100 GbE shared by the node's ranks through one NIC per GPU"),
    "gloo": Link("gloo", 1.0e9, 100e-6, "gloo over loopback TCP on one host (CPU processes)"),
}
"""Stated link figures: what the time predictions assume. Override with ``Topology(intra=...)``."""


@dataclass(frozen=True)
class Topology:
    """``world_size`` ranks, ``ranks_per_node`` to a node; ``intra`` links inside a node, ``inter`` between."""

    world_size: int
    ranks_per_node: int
    intra: Link
    inter: Link

    @property
    def num_nodes(self) -> int:
        return math.ceil(self.world_size / self.ranks_per_node)

    @property
    def slowest(self) -> Link:
        return self.intra if self.num_nodes == 1 else self.inter


def topology(world_size: int, ranks_per_node: int = 8, intra: str = "nvlink", inter: str = "infiniband") -> Topology:
    return Topology(world_size, min(ranks_per_node, world_size), LINKS[intra], LINKS[inter])


# -- ring collectives ------------------------------------------------------------------------


def ring_all_reduce(size: float, world: int, link: Link) -> tuple[float, float]:
    """(wire bytes per rank, seconds) of a ring all-reduce of ``size`` bytes."""
    if world <= 1:
        return 0.0, 0.0
    steps = 2 * (world - 1)
    return steps * size / world, steps * (link.latency + size / world / link.bandwidth)


def ring_all_gather(size: float, world: int, link: Link) -> tuple[float, float]:
    """(wire bytes per rank, seconds) of a ring all-gather of ``size`` bytes from every rank."""
    if world <= 1:
        return 0.0, 0.0
    steps = world - 1
    return steps * size, steps * (link.latency + size / link.bandwidth)


def ring_reduce_scatter(size: float, world: int, link: Link) -> tuple[float, float]:
    if world <= 1:
        return 0.0, 0.0
    steps = world - 1
    return steps * size / world, steps * (link.latency + size / world / link.bandwidth)


def all_reduce_time(size: float, topo: Topology, hierarchical: bool = False) -> tuple[float, float]:
    """(wire bytes per rank, seconds) of an all-reduce on ``topo``: a flat ring at the slowest
    link, or (``hierarchical``, several nodes) reduce-scatter / all-reduce / all-gather."""
    if not hierarchical or topo.num_nodes == 1:
        return ring_all_reduce(size, topo.world_size, topo.slowest)
    g, n = topo.ranks_per_node, topo.num_nodes
    rs_bytes, rs_time = ring_reduce_scatter(size, g, topo.intra)
    ar_bytes, ar_time = ring_all_reduce(size / g, n, topo.inter)
    ag_bytes, ag_time = ring_all_gather(size / g, g, topo.intra)
    return rs_bytes + ar_bytes + ag_bytes, rs_time + ar_time + ag_time


def all_gather_time(size: float, topo: Topology) -> tuple[float, float]:
    return ring_all_gather(size, topo.world_size, topo.slowest)


# -- tables and touched rows -----------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A vocabulary-sized gradient: ``rows`` rows of ``width`` fp32 values."""

    name: str
    rows: int
    width: int

    @property
    def bytes(self) -> int:
        return self.rows * self.width * F32


def zipf_popularity(num_items: int, exponent: float) -> np.ndarray:
    """Probabilities of items 1..num_items-1 (id 0 is padding) under a Zipf law of ``exponent``."""
    ranks = np.arange(1, num_items, dtype=np.float64)
    p = ranks**-exponent
    return np.concatenate([[0.0], p / p.sum()])


def popularity_from_counts(counts: np.ndarray) -> np.ndarray:
    """An item popularity law from a task's train counts (``Manifest.load_train_counts``)."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts / max(counts.sum(), 1.0)


def expected_distinct(popularity: np.ndarray, draws: float) -> float:
    """Expected number of distinct items in ``draws`` independent draws from ``popularity``:
    sum over items of 1 - (1 - p)^draws."""
    p = np.clip(popularity[popularity > 0], 0.0, 1.0 - 1e-15)
    return float(np.sum(-np.expm1(draws * np.log1p(-p))))


@dataclass(frozen=True)
class SequenceBatch:
    """What decides T1's touched rows: per-rank sequences, mean predicted positions per sequence
    (real items after a real item), the item popularity and the number of shared negatives."""

    per_rank: int
    tokens_per_sequence: float
    popularity: np.ndarray
    num_negatives: int

    @property
    def num_items(self) -> int:
        return len(self.popularity)


def expected_rows(batch: SequenceBatch, world: int) -> dict[str, tuple[float, float]]:
    """Per T1 table kind (``embedding``, ``softmax``: weight and bias alike): the expected
    (rows one rank touches, rows in the union over ``world`` ranks). Items are drawn
    independently with the given popularity (real sequences repeat items less: fewer distinct
    rows than drawn; the error is stated in docs/scaling.md); negatives are a uniform subset of
    items 1..V-1, shared by every rank."""
    tokens = batch.per_rank * batch.tokens_per_sequence
    local, union = expected_distinct(batch.popularity, tokens), expected_distinct(batch.popularity, world * tokens)
    outside = 1.0 - batch.num_negatives / max(batch.num_items - 1, 1)
    return {
        "embedding": (local, union),
        "softmax": (batch.num_negatives + local * outside, batch.num_negatives + union * outside),
    }


def touched_rows(seq_BL: torch.Tensor, negatives: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The rows of T1's tables whose gradient a batch makes non-zero, from the batch alone: the
    embedding's are the real input items (the residual path carries every one to a predicted
    position; row 0 is padding), the softmax's (weight and bias) the predicted targets and the
    shared negatives."""
    inputs, targets = seq_BL[:, :-1], seq_BL[:, 1:]
    keep = (targets != 0) & (inputs != 0)
    embedding = torch.unique(inputs[inputs != 0])
    softmax = torch.unique(torch.cat([targets[keep], negatives if negatives is not None else targets[:0]]))
    return {"embedding": embedding, "softmax": softmax}


# -- one step's exchanges --------------------------------------------------------------------


@dataclass
class Exchange:
    """One collective of a step: ``payload`` bytes handed in by a rank, ``wire`` bytes it sends in
    the ring, ``seconds`` of the ring."""

    name: str
    op: str
    payload: float
    wire: float = 0.0
    seconds: float = 0.0


@dataclass
class StepExchanges:
    world_size: int
    exchanges: list[Exchange] = field(default_factory=list)

    def add(self, name: str, op: str, payload: float, topo: Topology | None, hierarchical: bool = False) -> None:
        if self.world_size <= 1:
            return
        wire, seconds = 0.0, 0.0
        if topo is not None:
            if op == "all_reduce":
                wire, seconds = all_reduce_time(payload, topo, hierarchical)
            elif op == "all_gather":
                wire, seconds = all_gather_time(payload, topo)
            elif op == "reduce_scatter":
                wire, seconds = ring_reduce_scatter(payload, topo.world_size, topo.slowest)
        self.exchanges.append(Exchange(name, op, payload, wire, seconds))

    def payload(self, name: str | None = None, op: str | None = None) -> float:
        return sum(e.payload for e in self.exchanges if name in (None, e.name) and op in (None, e.op))

    def wire(self, name: str | None = None) -> float:
        return sum(e.wire for e in self.exchanges if name in (None, e.name))

    def seconds(self, name: str | None = None) -> float:
        return sum(e.seconds for e in self.exchanges if name in (None, e.name))

    def by_collective(self) -> dict[str, float]:
        """``{"NAME.OP": payload bytes}``, the form ``CommCounter.per_step`` measures."""
        out: dict[str, float] = {}
        for e in self.exchanges:
            out[f"{e.name}.{e.op}"] = out.get(f"{e.name}.{e.op}", 0.0) + e.payload
        return out


def ddp_step(
    world: int,
    dense_bytes: int,
    sparse_tables: list[Table],
    local_rows: list[list[float]] | None = None,
    union_rows: list[float] | None = None,
    grad_accum: int = 1,
    topo: Topology | None = None,
    hierarchical: bool = False,
) -> StepExchanges:
    """A ``TorchEngine`` step on ``world`` ranks: ``dense_bytes`` in DDP's buckets (tables
    exchanged densely included), ``sparse_tables`` exchanged row-sparsely with ``local_rows[r][t]``
    rows touched by rank r in table t and ``union_rows[t]`` in their union (exact counts or
    expectations)."""
    step = StepExchanges(world)
    if grad_accum == 1:
        step.add("loss", "all_reduce", 2 * F64, topo)
    else:
        step.add("loss", "all_reduce", F64, topo)
        step.add("loss", "all_reduce", F64, topo)
    if dense_bytes:
        step.add("dense", "all_reduce", dense_bytes, topo, hierarchical)
    if sparse_tables:
        assert local_rows is not None and union_rows is not None
        width = max(sum(rank) for rank in local_rows)
        step.add("row_sparse", "all_gather", len(sparse_tables) * I64, topo)
        step.add("row_sparse", "all_gather", width * I64, topo)
        values = sum(u * t.width * F32 for u, t in zip(union_rows, sparse_tables, strict=True))
        step.add("row_sparse", "all_reduce", values, topo, hierarchical)
    return step


def zero_step(world: int, trainable_bytes: int, topo: Topology | None = None) -> StepExchanges:
    """A DeepSpeed ZeRO-1/2 step (predicted only): reduce-scatter of the fp32 gradients, then an
    all-gather of every rank's updated 1/W of the parameters, plus the loss all-reduce."""
    step = StepExchanges(world)
    step.add("loss", "all_reduce", 2 * F64, topo)
    step.add("zero", "reduce_scatter", trainable_bytes, topo)
    step.add("zero", "all_gather", trainable_bytes / max(world, 1), topo)
    return step


# -- the cheaper exchange per table -----------------------------------------------------------


@dataclass(frozen=True)
class ExchangeChoice:
    """Predicted per-step seconds and wire bytes of one table's two exchanges, and the cheaper."""

    table: str
    rows_local: float
    rows_union: float
    row_sparse_seconds: float
    dense_seconds: float
    row_sparse_wire: float
    dense_wire: float

    @property
    def choice(self) -> str:
        return "row_sparse" if self.row_sparse_seconds < self.dense_seconds else "dense"


def compare_exchanges(table: Table, rows_local: float, rows_union: float, topo: Topology) -> ExchangeChoice:
    """One table's share of the row-sparse exchange (its row ids in the all-gather, its union's
    values in the all-reduce, each collective's latency) against an all-reduce of all its rows."""
    ids_wire, ids_s = all_gather_time(rows_local * I64, topo)
    val_wire, val_s = all_reduce_time(rows_union * table.width * F32, topo)
    dense_wire, dense_s = all_reduce_time(table.bytes, topo)
    return ExchangeChoice(table.name, rows_local, rows_union, ids_s + val_s, dense_s, ids_wire + val_wire, dense_wire)
