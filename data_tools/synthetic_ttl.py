"""A synthetic dataset at Tencent TTL scale, streamed to shards with bounded memory.

Sizes default to TTL's: 646K T1 items, 1.47M users with 100-item sequences, and five later
tasks (``click`` over 18K items, ``thumbsup`` over 8K, ``age`` 8 classes, ``gender`` 2,
``life_status`` 6). Users are generated ``chunk_users`` at a time and written through
``StreamingDatasetWriter``, so memory depends on the chunk and the shard size, not on the number
of users.

Planted structure: items belong to genres and, inside a genre, follow a Zipf popularity law
(the genres themselves too). Each user has a main and a second genre; each position of the
sequence comes from the main genre with ``main_prob``, else from the second one or, with
``explore_prob``, from a popularity-weighted genre. Click targets come from the user's genres
(thumbs-up from the main genre only, so the two correlate), and the profile labels are noisy
functions of the main genre. The same seed gives the same shards.

``TTLSpec.relation`` (CLI ``--relation``) sets how thumbs-up relates to click; T1 and the
profile labels are the same in all three:

* ``shared_genre`` (default, the data above): separate catalogues, linked through the main genre.
* ``related`` (as in TTL, where a thumbs-up marks a more satisfying click): clicks come from the
  main genre only, and each click becomes a thumbs-up with probability ``like_rate``, so a user's
  thumbs-up items are a subset of their click items (thumbs-up shares the click vocabulary).
* ``independent`` (the control): the same clicks and the same thumbs-up users and counts, but each
  thumbs-up item is drawn from the user's *second* genre: as visible in T1 as the main genre
  (30% against 60% of the positions) and unrelated to what click learns.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from conure_dist.data.manifest import Manifest
from conure_dist.errors import UserError
from data_tools.shard_streaming import StreamingDatasetWriter, StreamTask
from data_tools.split import DEFAULT_FRACTIONS

RELATIONS: tuple[str, ...] = ("shared_genre", "related", "independent")


@dataclass
class TTLSpec:
    num_users: int = 1_470_000
    num_items: int = 646_000
    seq_len: int = 100
    num_genres: int = 500
    click_items: int = 18_000
    thumbsup_items: int = 8_000
    zipf_exponent: float = 1.0
    main_prob: float = 0.6
    explore_prob: float = 0.1
    label_noise: float = 0.3
    """Probability that a profile label is drawn at random instead of from the main genre."""
    seed: int = 0
    relation: Literal["shared_genre", "related", "independent"] = "shared_genre"
    """How thumbs-up relates to click (module docstring); ``shared_genre`` is the original data."""
    like_rate: float = 0.5
    """``related`` / ``independent``: probability that a click also gets a thumbs-up."""

    def __post_init__(self) -> None:
        bounds = {
            "num_items": (self.num_items >= 2 * self.num_genres, f">= 2 * num_genres = {2 * self.num_genres}"),
            "click_items": (self.click_items >= self.num_genres, f">= num_genres = {self.num_genres}"),
            "thumbsup_items": (self.thumbsup_items >= self.num_genres, f">= num_genres = {self.num_genres}"),
            "num_users": (self.num_users >= 1, ">= 1"),
            "seq_len": (self.seq_len >= 2, ">= 2"),
            "relation": (self.relation in RELATIONS, f"one of {list(RELATIONS)}"),
            "like_rate": (0 < self.like_rate <= 1, "in (0, 1]"),
        }
        bad = [f"{name}={getattr(self, name)}: must be {bound}" for name, (ok, bound) in bounds.items() if not ok]
        if bad:
            raise UserError(f"invalid TTLSpec: {'; '.join(bad)}")


class _Catalogue:
    """Items grouped by genre with Zipf popularity inside each genre; vectorised draws."""

    def __init__(self, rng: np.random.Generator, num_items: int, num_genres: int, zipf: float, first_id: int):
        genre = rng.permutation(np.arange(num_items) % num_genres)
        order = np.argsort(genre, kind="stable")
        self.members = (order + first_id).astype(np.int64)  # grouped by genre, random rank inside
        self.starts = np.searchsorted(genre[order], np.arange(num_genres))
        sizes = np.bincount(genre, minlength=num_genres)
        rank = np.arange(num_items) - np.repeat(self.starts, sizes)
        weight = 1.0 / (rank + 1.0) ** zipf
        total = np.add.reduceat(weight, self.starts)
        # Cumulative popularity inside each genre, shifted by the genre index: g + [0, 1].
        cum = np.cumsum(weight) - np.repeat(np.cumsum(total) - total, sizes)
        self.shifted = np.repeat(np.arange(num_genres), sizes) + cum / np.repeat(total, sizes)
        self.genre_of = np.empty(num_items, dtype=np.int64)
        self.genre_of[order] = np.repeat(np.arange(num_genres), sizes)
        self.num_genres = num_genres

    def draw(self, rng: np.random.Generator, genres: np.ndarray) -> np.ndarray:
        u = genres + rng.random(genres.shape)
        index = np.minimum(np.searchsorted(self.shifted, u.ravel()), len(self.members) - 1)
        return self.members[index].reshape(genres.shape)


def _zipf_genres(rng: np.random.Generator, shape, num_genres: int, zipf: float) -> np.ndarray:
    weight = 1.0 / np.arange(1, num_genres + 1) ** zipf
    cum = np.cumsum(weight / weight.sum())
    return np.minimum(np.searchsorted(cum, rng.random(shape)), num_genres - 1)


def _add_paired_item_tasks(
    writer: StreamingDatasetWriter,
    rng: np.random.Generator,
    spec: TTLSpec,
    clicks: _Catalogue,
    seqs: np.ndarray,
    users: np.ndarray,
    main: np.ndarray,
    second: np.ndarray,
) -> None:
    """click and thumbs-up of a chunk for ``relation`` related / independent (module docstring).
    Both relations make the same draws, so they differ only where the thumbs-up items come from."""
    rows = np.repeat(np.arange(len(users)), rng.integers(1, 4, size=len(users)))
    click_items = clicks.draw(rng, main[rows])
    writer.add("click", seqs[rows], users[rows], click_items)
    liked = rng.random(len(rows)) < spec.like_rate
    elsewhere = clicks.draw(rng, second[rows[liked]])
    targets = click_items[liked] if spec.relation == "related" else elsewhere
    writer.add("thumbsup", seqs[rows[liked]], users[rows[liked]], targets)


def write_synthetic_ttl(
    out: str,
    spec: TTLSpec | None = None,
    *,
    chunk_users: int = 20_000,
    split_seed: int = 0,
    split: tuple[float, float, float] = DEFAULT_FRACTIONS,
    instances_per_shard: int = 50_000,
    progress: bool = False,
) -> Manifest:
    """Generate ``spec``'s users chunk by chunk and stream them to shards under ``out``."""
    spec = spec or TTLSpec()
    start = time.perf_counter()
    root = np.random.SeedSequence(spec.seed)
    rng_cat = np.random.default_rng(root.spawn(1)[0])
    items = _Catalogue(rng_cat, spec.num_items, spec.num_genres, spec.zipf_exponent, first_id=1)
    clicks = _Catalogue(rng_cat, spec.click_items, spec.num_genres, spec.zipf_exponent, first_id=0)
    thumbs = _Catalogue(rng_cat, spec.thumbsup_items, spec.num_genres, spec.zipf_exponent, first_id=0)
    # Profile labels: a fixed class per genre for each profile task.
    labels = {"age": 8, "gender": 2, "life_status": 6}
    genre_label = {name: rng_cat.integers(0, n, size=spec.num_genres) for name, n in labels.items()}
    thumbsup_items = spec.thumbsup_items if spec.relation == "shared_genre" else spec.click_items
    tasks = [
        StreamTask("t1", "sequence", spec.num_items + 1),
        StreamTask("click", "item", spec.click_items),
        StreamTask("thumbsup", "item", thumbsup_items),
        *(StreamTask(name, "class", n, [str(c) for c in range(n)]) for name, n in labels.items()),
    ]
    writer = StreamingDatasetWriter(
        out,
        dataset="synthetic-ttl",
        tasks=tasks,
        seq_len=spec.seq_len,
        seed=split_seed,
        split=split,
        instances_per_shard=instances_per_shard,
    )
    for chunk, first in enumerate(range(0, spec.num_users, chunk_users)):
        rng = np.random.default_rng([spec.seed, 1, chunk])
        n = min(chunk_users, spec.num_users - first)
        users = np.arange(first, first + n, dtype=np.int64)
        main = _zipf_genres(rng, n, spec.num_genres, spec.zipf_exponent)
        second = _zipf_genres(rng, n, spec.num_genres, spec.zipf_exponent)
        u = rng.random((n, spec.seq_len))
        explore = _zipf_genres(rng, (n, spec.seq_len), spec.num_genres, spec.zipf_exponent)
        genres = np.where(
            u < spec.main_prob, main[:, None], np.where(u < 1 - spec.explore_prob, second[:, None], explore)
        )
        seqs = items.draw(rng, genres).astype(np.int32)
        lengths = rng.integers(spec.seq_len // 2, spec.seq_len + 1, size=n)
        seqs[np.arange(spec.seq_len)[None, :] < (spec.seq_len - lengths)[:, None]] = 0
        writer.add("t1", seqs, users)
        if spec.relation == "shared_genre":
            num_clicks = rng.integers(1, 4, size=n)
            rows = np.repeat(np.arange(n), num_clicks)
            click_genre = np.where(rng.random(len(rows)) < 0.7, main[rows], second[rows])
            writer.add("click", seqs[rows], users[rows], clicks.draw(rng, click_genre))
            liked = rng.random(n) < 0.6
            writer.add("thumbsup", seqs[liked], users[liked], thumbs.draw(rng, main[liked]))
        else:
            _add_paired_item_tasks(writer, rng, spec, clicks, seqs, users, main, second)
        for name, n_classes in labels.items():
            noisy = rng.random(n) < spec.label_noise
            label = np.where(noisy, rng.integers(0, n_classes, size=n), genre_label[name][main])
            writer.add(name, seqs, users, label)
        if progress and chunk % 10 == 0:
            print(f"{first + n:,} / {spec.num_users:,} users, {time.perf_counter() - start:.0f} s", flush=True)
    source = {"generator": "data_tools.synthetic_ttl", "spec": asdict(spec), "chunk_users": chunk_users}
    return writer.close(source)


def main(argv: list[str] | None = None) -> Any:
    """``python -m data_tools.synthetic_ttl --out DIR [--num-users N]``: prints wall time and peak RSS."""
    import argparse
    import resource

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-users", type=int, default=TTLSpec.num_users)
    parser.add_argument("--num-items", type=int, default=TTLSpec.num_items)
    parser.add_argument("--chunk-users", type=int, default=20_000)
    parser.add_argument("--instances-per-shard", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--relation", choices=RELATIONS, default="shared_genre", help="how thumbs-up relates to click (see above)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = write_synthetic_ttl(
        args.out,
        TTLSpec(num_users=args.num_users, num_items=args.num_items, seed=args.seed, relation=args.relation),
        chunk_users=args.chunk_users,
        instances_per_shard=args.instances_per_shard,
        progress=True,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for task in manifest.tasks:
        sizes = ", ".join(f"{s} {task.splits[s].num_instances:,}" for s in ("train", "valid", "test"))
        print(f"{task.name:12s} {sizes}")
    print(f"wall {time.perf_counter() - start:.0f} s, peak RSS {peak:.2f} GB")
    return manifest


if __name__ == "__main__":
    main()
