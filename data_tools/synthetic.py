"""The embedded synthetic dataset: small, deterministic, with structure a model can learn.

Planted structure (all drawn from ``SyntheticSpec.seed``):

* Items of every catalogue belong to genres; inside a genre, popularity follows a Zipf law.
* Each user has a sparse taste over genres (a Dirichlet draw with a small concentration).
* T1 sequences come from a taste-driven Markov process: stay in the current genre with
  ``stay_prob`` (and then follow the previous item's fixed *successor* with ``successor_prob``,
  otherwise draw by popularity), else jump to a genre drawn from the user's taste. The previous
  item and the genre mix of the history therefore both predict the next item far better than
  global popularity does.
* ``click`` (item task): 1..``max_clicks`` items per user from a 300-item catalogue, genres drawn
  from the user's taste. ``like`` (item task): 0..``max_likes`` items from a 200-item catalogue,
  genres drawn from the *sharpened* taste (the user's top genres), so it correlates with click.
  With ``recent_prob`` a click/like target is instead the fixed "related" item (same genre) of
  one of the user's last ``recent_window`` T1 items: item-level signal that popularity lacks.
* ``gender`` (2 classes) and ``age`` (5 brackets): noisy functions of the taste, roughly balanced
  so the majority class stays far below the accuracy a taste-aware model reaches.

How click and like relate is ``SyntheticSpec.relation``; T1 is the same in all three:

* ``shared_taste`` (default; the quick start's data, unchanged): the two above. Click and like
  are separate catalogues drawn independently, linked only through the user's taste and recent
  items, so neither is a subset of the other.
* ``related`` (as thumbs-up in real data): the genres are split in two halves; clicks come from
  the first half only (the taste restricted to it, recency only for recent items of it). Each
  click becomes a like with probability ``like_rate`` x the sharpened taste of the item's genre
  over the user's largest one, so the like items of a user are a subset of their click items,
  concentrated on their top click genre (with ``relation_strength`` < 1 each like is instead,
  with probability 1 - strength, the ``independent`` draw below). Like shares click's catalogue.
* ``independent`` (the control): the same users, counts and click task, but each like item is
  drawn from the other half of the genres by the same law (sharpened taste restricted to that
  half, recency only for recent items of it): equally learnable from the T1 history, and nothing
  that click learns about its half of the genres or its items helps it.

In ``related`` and ``independent`` the profile labels are functions of the genre mix *observed*
in the user's T1 history (not of the latent taste), so they are tied to the sequence itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from conure_dist.data.manifest import Manifest
from conure_dist.errors import UserError
from data_tools.shards import TaskData, write_dataset
from data_tools.split import DEFAULT_FRACTIONS

AGE_BRACKETS: tuple[str, ...] = ("<25", "25-34", "35-44", "45-54", "55+")
# Cumulative shares of the age brackets: uneven like real audiences, largest bracket ~30%.
AGE_QUANTILES: tuple[float, ...] = (0.15, 0.45, 0.70, 0.88)
RELATIONS: tuple[str, ...] = ("shared_taste", "related", "independent")


@dataclass
class SyntheticSpec:
    """Size and planted-structure parameters of the synthetic dataset."""

    num_users: int = 3000
    num_items: int = 500
    """T1 vocabulary size excluding the pad id 0 (ids 1..num_items)."""
    seq_len: int = 20
    num_genres: int = 10
    seed: int = 0
    taste_concentration: float = 0.2
    """Dirichlet concentration of user tastes; small values give a few dominant genres."""
    stay_prob: float = 0.65
    """Probability that the next T1 item stays in the current genre."""
    successor_prob: float = 0.5
    """Given a stay: probability of taking the previous item's fixed successor."""
    zipf_exponent: float = 0.8
    """Popularity of the r-th T1 item inside a genre is proportional to 1 / r**zipf_exponent."""
    target_zipf_exponent: float = 0.8
    """The same for the click and like catalogues."""
    min_history: float = 0.5
    """Shortest T1 history as a fraction of seq_len (shorter ones are left-padded)."""
    click_items: int = 300
    like_items: int = 200
    max_clicks: int = 4
    max_likes: int = 2
    recent_prob: float = 0.4
    """Probability that a click/like target is the item related to one of the user's last
    ``recent_window`` T1 items instead of a draw from the user's taste."""
    recent_window: int = 1
    """1: the related item of the most recent T1 item (the easiest to pick up for a model)."""
    gender_sharpness: float = 2.5
    """Slope of P(M) in the standardised taste score; larger is less noisy."""
    age_noise: float = 0.3
    """Std of the noise added to the standardised taste score before bracketing."""
    relation: Literal["shared_taste", "related", "independent"] = "shared_taste"
    """How like relates to click (module docstring); ``shared_taste`` is the original data."""
    relation_strength: float = 1.0
    """``related`` only: probability that a like is the liked click itself rather than an
    ``independent`` draw for the same user (1: like items are exactly a subset of clicks)."""
    like_rate: float = 0.5
    """``related`` / ``independent``: probability that a click of the user's top click genre
    becomes a like (scaled down for other genres); ``like_items`` and ``max_likes`` apply to
    ``shared_taste`` only."""

    def __post_init__(self) -> None:
        # Each check with the bound it enforces. Every genre needs 2 T1 items (an item's
        # successor is another item of its genre) and 1 item in each target catalogue.
        checks = {
            "num_users": (self.num_users >= 10, ">= 10"),
            "num_genres": (self.num_genres >= 2, ">= 2"),
            "num_items": (self.num_items >= 2 * self.num_genres, f">= 2 * num_genres = {2 * self.num_genres}"),
            "click_items": (self.click_items >= self.num_genres, f">= num_genres = {self.num_genres}"),
            "like_items": (self.like_items >= self.num_genres, f">= num_genres = {self.num_genres}"),
            "seq_len": (self.seq_len >= 3, ">= 3"),
            "seed": (self.seed >= 0, ">= 0"),
            "taste_concentration": (self.taste_concentration > 0, "> 0"),
            "stay_prob": (0 <= self.stay_prob <= 1, "in [0, 1]"),
            "successor_prob": (0 <= self.successor_prob <= 1, "in [0, 1]"),
            "zipf_exponent": (self.zipf_exponent >= 0, ">= 0"),
            "target_zipf_exponent": (self.target_zipf_exponent >= 0, ">= 0"),
            "min_history": (0 < self.min_history <= 1, "in (0, 1]"),
            "max_clicks": (self.max_clicks >= 1, ">= 1"),
            "max_likes": (self.max_likes >= 1, ">= 1"),
            "recent_prob": (0 <= self.recent_prob <= 1, "in [0, 1]"),
            "recent_window": (1 <= self.recent_window <= self.seq_len, f"in [1, seq_len = {self.seq_len}]"),
            "age_noise": (self.age_noise >= 0, ">= 0"),
            "relation": (self.relation in RELATIONS, f"one of {list(RELATIONS)}"),
            "relation_strength": (
                0 <= self.relation_strength <= 1 and (self.relation == "related" or self.relation_strength == 1),
                "in [0, 1], and 1 unless relation is 'related'",
            ),
            "like_rate": (0 < self.like_rate <= 1, "in (0, 1]"),
        }
        bad = [f"{name}={getattr(self, name)}: must be {bound}" for name, (ok, bound) in checks.items() if not ok]
        if bad:
            raise UserError(f"invalid SyntheticSpec: {'; '.join(bad)}")


@dataclass(frozen=True)
class _Catalogue:
    """Items grouped by genre, with cumulative within-genre popularity for vectorised draws."""

    members: np.ndarray
    """int64 [G, max_size]: item ids of each genre, most popular first (padded)."""
    sizes: np.ndarray
    """int64 [G]: number of items per genre."""
    cum_popularity: np.ndarray
    """float [G, max_size]: cumulative within-genre probabilities (1.0 in the padding)."""
    item_genre: np.ndarray
    """int64 [num_items]: genre of item ``first_id + i``."""
    first_id: int

    @property
    def num_items(self) -> int:
        return len(self.item_genre)

    def draw(self, rng: np.random.Generator, genres: np.ndarray) -> np.ndarray:
        """One popularity-weighted item per entry of ``genres``."""
        u = rng.random(len(genres))
        index = (u[:, None] > self.cum_popularity[genres]).sum(axis=1)
        index = np.minimum(index, self.sizes[genres] - 1)  # guards float round-off at the end
        return self.members[genres, index]


def _make_catalogue(
    rng: np.random.Generator, num_items: int, num_genres: int, zipf: float, first_id: int
) -> _Catalogue:
    item_genre = rng.permutation(np.arange(num_items) % num_genres)
    sizes = np.bincount(item_genre, minlength=num_genres)
    width = int(sizes.max())
    members = np.zeros((num_genres, width), dtype=np.int64)
    cum = np.ones((num_genres, width))
    for g in range(num_genres):
        ids = rng.permutation(np.flatnonzero(item_genre == g)) + first_id  # random popularity rank
        weights = 1.0 / np.arange(1, len(ids) + 1) ** zipf
        members[g, : len(ids)] = ids
        cum[g, : len(ids)] = np.cumsum(weights / weights.sum())
    return _Catalogue(members, sizes, cum, item_genre, first_id)


def _draw_genres(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One genre per row of ``weights`` ([n, G], rows sum to 1)."""
    index = (rng.random(len(weights))[:, None] > np.cumsum(weights, axis=1)).sum(axis=1)
    return np.minimum(index, weights.shape[1] - 1)


def _successors(rng: np.random.Generator, catalogue: _Catalogue, vocab: int) -> np.ndarray:
    """A fixed next item for every item, in the same genre and never the item itself."""
    successor = np.zeros(vocab, dtype=np.int64)
    for g, size in enumerate(catalogue.sizes):
        ids = catalogue.members[g, :size]
        # A random cyclic order of the genre: each item points to the next one in it.
        cycle = rng.permutation(ids)
        successor[cycle] = np.roll(cycle, -1)
    return successor


def _t1_sequences(
    rng: np.random.Generator, spec: SyntheticSpec, taste: np.ndarray, catalogue: _Catalogue
) -> np.ndarray:
    successor = _successors(rng, catalogue, spec.num_items + 1)
    num_users, length = spec.num_users, spec.seq_len
    seqs = np.zeros((num_users, length), dtype=np.int32)
    genre = _draw_genres(rng, taste)
    item = catalogue.draw(rng, genre)
    seqs[:, 0] = item
    for t in range(1, length):
        stay = rng.random(num_users) < spec.stay_prob
        genre = np.where(stay, genre, _draw_genres(rng, taste))
        follow = stay & (rng.random(num_users) < spec.successor_prob)
        item = np.where(follow, successor[item], catalogue.draw(rng, genre))
        seqs[:, t] = item
    # Keep the most recent part of each history; the rest becomes left padding.
    shortest = max(2, math.ceil(spec.min_history * length))
    lengths = rng.integers(shortest, length + 1, size=num_users)
    seqs[np.arange(length)[None, :] < (length - lengths)[:, None]] = 0
    return seqs


def _related_items(rng: np.random.Generator, source: _Catalogue, target: _Catalogue, vocab: int) -> np.ndarray:
    """For every T1 item, one fixed item of the same genre in the ``target`` catalogue."""
    related = np.zeros(vocab, dtype=np.int64)
    genres = source.item_genre
    pick = (rng.random(len(genres)) * target.sizes[genres]).astype(np.int64)
    related[source.first_id + np.arange(len(genres))] = target.members[genres, pick]
    return related


def _draw_targets(
    rng: np.random.Generator,
    users: np.ndarray,
    genre_weights: np.ndarray,
    catalogue: _Catalogue,
    t1_seqs: np.ndarray,
    related: np.ndarray,
    spec: SyntheticSpec,
    recent_ok: np.ndarray | None = None,
) -> np.ndarray:
    """One target per entry of ``users``: drawn from their genre weights, or related to one of
    their recent T1 items (only where ``recent_ok``, a bool per T1 item id, allows it)."""
    targets = catalogue.draw(rng, _draw_genres(rng, genre_weights[users]))
    # Recency gives the task item-level signal that only a model reading the sequence can use.
    back = rng.integers(1, spec.recent_window + 1, size=len(users))
    recent = t1_seqs[users, t1_seqs.shape[1] - back]
    recent = np.where(recent > 0, recent, t1_seqs[users, -1])  # short history: use the last item
    use_recent = rng.random(len(users)) < spec.recent_prob
    if recent_ok is not None:
        use_recent &= recent_ok[recent]
    return np.where(use_recent, related[recent], targets).astype(np.int64)


def _item_task(
    rng: np.random.Generator,
    name: str,
    genre_weights: np.ndarray,
    catalogue: _Catalogue,
    t1_seqs: np.ndarray,
    related: np.ndarray,
    spec: SyntheticSpec,
    per_user: tuple[int, int],
    recent_ok: np.ndarray | None = None,
) -> TaskData:
    """``per_user`` targets for every user (``_draw_targets``)."""
    counts = rng.integers(per_user[0], per_user[1] + 1, size=len(genre_weights))
    users = np.repeat(np.arange(len(genre_weights), dtype=np.int64), counts)
    targets = _draw_targets(rng, users, genre_weights, catalogue, t1_seqs, related, spec, recent_ok)
    return TaskData(name, "item", None, users, targets, num_items=catalogue.num_items)


def _restricted(weights: np.ndarray, genres: np.ndarray) -> np.ndarray:
    """Each row's weights on ``genres`` only (a bool per genre), renormalised."""
    kept = weights * genres[None, :] + 1e-12 * genres[None, :]  # no all-zero row
    return kept / kept.sum(axis=1, keepdims=True)


def _observed_genre_mix(t1_seqs: np.ndarray, catalogue: _Catalogue, num_genres: int) -> np.ndarray:
    """[U, G]: share of each genre among the items of each user's T1 history."""
    rows, cols = np.nonzero(t1_seqs)
    mix = np.zeros((len(t1_seqs), num_genres))
    np.add.at(mix, (rows, catalogue.item_genre[t1_seqs[rows, cols] - catalogue.first_id]), 1.0)
    return mix / mix.sum(axis=1, keepdims=True)


def _paired_tasks(
    rngs: tuple[np.random.Generator, ...],
    spec: SyntheticSpec,
    taste: np.ndarray,
    t1_seqs: np.ndarray,
    t1_catalogue: _Catalogue,
    click_catalogue: _Catalogue,
    click_related: np.ndarray,
) -> list[TaskData]:
    """click, like, gender, age of ``relation`` ``related`` / ``independent`` (module docstring).
    Both relations make the same draws, so they differ only where the like items come from."""
    rng_click, rng_like, rng_class = rngs
    first_half = np.arange(spec.num_genres) < spec.num_genres // 2
    halves = {"click": first_half, "other": ~first_half}
    t1_genre = np.r_[0, t1_catalogue.item_genre]  # genre of each T1 id (the pad id gets 0)
    top = taste**2 / (taste**2).sum(axis=1, keepdims=True)
    click = _item_task(
        rng_click,
        "click",
        _restricted(taste, first_half),
        click_catalogue,
        t1_seqs,
        click_related,
        spec,
        (1, spec.max_clicks),
        recent_ok=first_half[t1_genre],
    )
    top_click = _restricted(top, first_half)
    genre = click_catalogue.item_genre[click.targets]
    weight = top_click[click.users, genre] / top_click[click.users].max(axis=1)
    liked = rng_like.random(click.num_instances) < spec.like_rate * weight
    users = click.users[liked]
    elsewhere = _draw_targets(
        rng_like,
        users,
        _restricted(top, halves["other"]),
        click_catalogue,
        t1_seqs,
        click_related,
        spec,
        recent_ok=halves["other"][t1_genre],
    )
    strength = spec.relation_strength if spec.relation == "related" else 0.0
    keep = rng_like.random(len(users)) < strength
    targets = np.where(keep, click.targets[liked], elsewhere)
    like = TaskData("like", "item", None, users, targets, num_items=click_catalogue.num_items)
    mix = _observed_genre_mix(t1_seqs, t1_catalogue, spec.num_genres)
    return [click, like, *_class_tasks(rng_class, spec, mix)]


def _standardised_score(rng: np.random.Generator, taste: np.ndarray) -> np.ndarray:
    """Taste projected on a random direction over genres, centred and scaled."""
    score = taste @ rng.normal(size=taste.shape[1])
    return (score - np.median(score)) / (score.std() + 1e-12)


def _class_tasks(rng: np.random.Generator, spec: SyntheticSpec, taste: np.ndarray) -> list[TaskData]:
    """gender and age from ``taste`` ([U, G]: the latent taste, or the observed genre mix)."""
    users = np.arange(spec.num_users, dtype=np.int64)
    p_male = 1.0 / (1.0 + np.exp(-spec.gender_sharpness * _standardised_score(rng, taste)))
    gender = (rng.random(spec.num_users) < p_male).astype(np.int64)
    noisy = _standardised_score(rng, taste) + rng.normal(scale=spec.age_noise, size=spec.num_users)
    age = np.searchsorted(np.quantile(noisy, AGE_QUANTILES), noisy, side="right").astype(np.int64)
    return [
        TaskData("gender", "class", None, users, gender, num_classes=2, class_names=["F", "M"]),
        TaskData("age", "class", None, users, age, num_classes=len(AGE_BRACKETS), class_names=list(AGE_BRACKETS)),
    ]


def generate(spec: SyntheticSpec) -> tuple[np.ndarray, list[TaskData], dict[str, Any]]:
    """T1 table [num_users, seq_len], the tasks (t1, click, like, gender, age) and a source record."""
    # Independent streams per component, so changing one task's draws leaves the others unchanged.
    streams = np.random.SeedSequence(spec.seed).spawn(6)
    rng_taste, rng_t1, rng_click, rng_like, rng_class, rng_cat = (np.random.default_rng(s) for s in streams)
    genres = spec.num_genres
    taste = rng_taste.dirichlet(np.full(genres, spec.taste_concentration), size=spec.num_users)
    t1_catalogue = _make_catalogue(rng_cat, spec.num_items, genres, spec.zipf_exponent, first_id=1)
    click_catalogue, like_catalogue = (
        _make_catalogue(rng_cat, size, genres, spec.target_zipf_exponent, first_id=0)
        for size in (spec.click_items, spec.like_items)
    )
    t1_seqs = _t1_sequences(rng_t1, spec, taste, t1_catalogue)
    vocab = spec.num_items + 1
    click_related, like_related = (
        _related_items(rng_cat, t1_catalogue, target, vocab) for target in (click_catalogue, like_catalogue)
    )
    users = np.arange(spec.num_users, dtype=np.int64)
    t1 = TaskData("t1", "sequence", t1_seqs, users, None, num_items=vocab)
    source = {"generator": "data_tools.synthetic", "spec": asdict(spec)}
    if spec.relation != "shared_taste":
        later = _paired_tasks(
            (rng_click, rng_like, rng_class), spec, taste, t1_seqs, t1_catalogue, click_catalogue, click_related
        )
        return t1_seqs, [t1, *later], source
    top_taste = taste**2 / (taste**2).sum(axis=1, keepdims=True)  # each user's top genres
    later = [
        _item_task(rng_click, "click", taste, click_catalogue, t1_seqs, click_related, spec, (1, spec.max_clicks)),
        _item_task(rng_like, "like", top_taste, like_catalogue, t1_seqs, like_related, spec, (0, spec.max_likes)),
        *_class_tasks(rng_class, spec, taste),
    ]
    return t1_seqs, [t1, *later], source


def write_synthetic(
    out: str,
    spec: SyntheticSpec | None = None,
    *,
    split_seed: int = 0,
    split: tuple[float, float, float] = DEFAULT_FRACTIONS,
    instances_per_shard: int = 50_000,
    records_per_sample: int = 256,
    protocol: str = "random",
) -> Manifest:
    """Generate the dataset of ``spec`` and write it as shards + manifest under ``out``
    (``protocol``: ``shards.split_task``)."""
    t1_seqs, tasks, source = generate(spec or SyntheticSpec())
    return write_dataset(
        out,
        dataset="synthetic",
        t1_seqs=t1_seqs,
        tasks=tasks,
        seed=split_seed,
        split=split,
        source=source,
        skipped_rows={},
        instances_per_shard=instances_per_shard,
        records_per_sample=records_per_sample,
        protocol=protocol,
    )
