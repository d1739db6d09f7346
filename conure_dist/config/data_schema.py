"""The ``data`` section of the run configuration: where the shards are, how a missing dataset
is built (the embedded synthetic generator, MovieLens) and how the stream reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from conure_dist.config.checks import check as _check


@dataclass
class SyntheticDataConfig:
    """Parameters of the embedded synthetic generator (used when ``data.source: synthetic``)."""

    num_users: int = 3000
    """Number of users (each has one T1 sequence)."""
    num_items: int = 500
    """T1 item vocabulary size, excluding the padding id 0."""
    seq_len: int = 20
    """Length of every T1 sequence (left-padded)."""
    seed: int = 0
    """Seed of the generator; the same seed gives the same data."""
    relation: Literal["shared_taste", "related", "independent"] = "shared_taste"
    """How like relates to click: ``shared_taste`` (the quick start's data; separate catalogues),
    ``related`` (like items a subset of the user's clicks, as thumbs-up in TTL) or ``independent``
    (the control: same users and counts, likes from genres click never draws); see the generator."""
    relation_strength: float = 1.0
    """``related`` only: probability that a like is one of the user's clicks rather than an
    ``independent`` draw (1: an exact subset)."""

    def validate(self, prefix: str) -> None:
        _check(self.num_users >= 10, f"{prefix}.num_users", f"must be >= 10, got {self.num_users}")
        _check(
            self.num_items >= 20, f"{prefix}.num_items", f"must be >= 20 (two per planted genre), got {self.num_items}"
        )
        _check(self.seq_len >= 3, f"{prefix}.seq_len", f"must be >= 3, got {self.seq_len}")
        _check(self.seed >= 0, f"{prefix}.seed", f"must be >= 0, got {self.seed}")
        _check(
            0 <= self.relation_strength <= 1,
            f"{prefix}.relation_strength",
            f"must be in [0, 1], got {self.relation_strength}",
        )
        _check(
            self.relation == "related" or self.relation_strength == 1,
            f"{prefix}.relation_strength",
            f"applies to relation 'related' only, got {self.relation_strength} with '{self.relation}'",
        )


@dataclass
class DataConfig:
    """Where the shards live and how to build them when they are missing. The keys that build
    shards are also ``conure data``'s flags (``data_flags``): one definition serves both."""

    root: str = "runs/data/quickstart"
    """Directory or fsspec URL (``s3://bucket/prefix``) holding ``manifest.json`` and the shards."""
    source: Literal["none", "synthetic", "movielens"] = "none"
    """How ``conure run`` builds shards when ``root`` has no manifest; ``none`` means it errors."""
    source_dir: str | None = None
    """Raw files for ``source: movielens``: a MovieLens release in any public layout (ML-100K,
    ML-1M, ``ratings.csv``) or RecBole atomic files."""
    seq_len: int = 30
    """T1 sequence length when converting raw files (MovieLens; ``conure data ttl`` defaults to 100)."""
    skip_bad_rows: bool = False
    """When converting raw files: skip malformed rows (counted in the manifest) instead of failing."""
    min_t1_interactions: int = 0
    """MovieLens: keep only users with at least this many T1 ratings, dropping the others'
    instances of every task (the paper: more than 5, i.e. 6; 0 keeps all)."""
    t1_ratings: Literal["below_4", "all"] = "below_4"
    """MovieLens: which ratings form T1, the sequence task: ``below_4`` (the paper's: ratings
    below 4 stars, so that like4 and like5 predict items T1 never shows) or ``all`` (every rating,
    the usual sequential-recommendation setting; like4 and like5 are then left out, their targets
    being in the input)."""
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    """Generator settings for ``source: synthetic``."""
    instances_per_shard: int = 50_000
    """Target number of instances per shard when shards are generated."""
    shuffle_buffer: int = 10_000
    """Instances held in the streaming shuffle buffer."""
    split_seed: int = 0
    """Seed of the train/valid/test split when shards are generated."""
    split: list[float] = field(default_factory=lambda: [0.8, 0.05, 0.15])
    """Train, valid and test fractions of every task's instances when shards are generated (with
    ``split_protocol: leave_one_out``, of the profile tasks' users, within each class)."""
    split_protocol: Literal["random", "leave_one_out"] = "random"
    """How shards are split: ``random`` (the paper's: every task's instances at random by
    ``split``) or ``leave_one_out`` (per user, a task's last interaction is test and the one
    before valid, the rest train, as RecBole and SASRec; profile tasks split by ``split`` within
    each class). See docs/data.md."""
    prefetch: int | None = None
    """Training batches read ahead on a background thread, so reading and decoding shards
    overlaps the device's work (None: 4 on a GPU, 0 on CPU, where the thread would compete with
    the compute threads for cores). The data order is the same either way."""
    partition: Literal["auto", "range", "stride"] = "auto"
    """How ranks share a split: ``range`` gives each rank its own shards (reads 1/W of the
    bytes), ``stride`` makes the ranks' batches together exactly the one-process global batch;
    ``auto`` picks range when there are at least as many shards as ranks."""

    def validate(self, prefix: str) -> None:
        _check(bool(self.root), f"{prefix}.root", "must not be empty")
        if self.source == "movielens":
            _check(bool(self.source_dir), f"{prefix}.source_dir", "is required when source is 'movielens'")
        _check(self.seq_len >= 3, f"{prefix}.seq_len", f"must be >= 3, got {self.seq_len}")
        _check(
            self.min_t1_interactions >= 0,
            f"{prefix}.min_t1_interactions",
            f"must be >= 0, got {self.min_t1_interactions}",
        )
        _check(self.instances_per_shard >= 1, f"{prefix}.instances_per_shard", "must be >= 1")
        if self.prefetch is not None:
            _check(self.prefetch >= 0, f"{prefix}.prefetch", f"must be >= 0, got {self.prefetch}")
        _check(self.shuffle_buffer >= 1, f"{prefix}.shuffle_buffer", "must be >= 1")
        # Every split is needed: train to learn, valid to pick the best epoch, test to report.
        _check(
            len(self.split) == 3 and all(f > 0 for f in self.split) and abs(sum(self.split) - 1) < 1e-9,
            f"{prefix}.split",
            f"must be three fractions > 0 (train, valid, test) summing to 1, got {self.split}",
        )
        _check(self.split_seed >= 0, f"{prefix}.split_seed", f"must be >= 0, got {self.split_seed}")
        self.synthetic.validate(f"{prefix}.synthetic")
