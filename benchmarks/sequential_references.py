"""Count-based references for T1 on a data root: most popular, and first- and second-order Markov
chains over the training sequences, scored like a model (exact ranks over every item, ties to
the lower id, ``conure_dist.train.metrics``).

* ``popular``: training-target frequency (the run report's trivial reference);
* ``markov1``: how often each item followed the history's last item in training, ties broken by
  popularity;
* ``markov2``: how often each item followed the history's last two items, ties broken by
  ``markov1``'s counts, then popularity (a back-off where the pair was never seen).

Transitions are counted in the training split only, between neighbouring items of a training
sequence (leave-one-out windows overlap by one item, so no transition is counted twice)::

    python benchmarks/sequential_references.py --data runs/data/ml100k_loo --out refs.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch

from conure_dist.data.manifest import Manifest
from conure_dist.data.stream import iter_batches
from conure_dist.train.metrics import finalize, ranking_sums, target_ranks

MAX_DENSE_ITEMS = 50_000
"""The first-order counts are a dense [items, items] table."""


def _sequences(manifest: Manifest, split: str) -> np.ndarray:
    batches = iter_batches(manifest, "t1", split, 4096, shuffle=False, seed=0, epoch=0)
    return np.concatenate([b.seq.numpy() for b in batches])


def count_transitions(train: np.ndarray, num_items: int) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:
    """First-order counts [prev, next] and second-order counts (prev2, prev) -> counts of next."""
    first = np.zeros((num_items, num_items), dtype=np.float64)
    pairs: dict[tuple[int, int], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for seq in train:
        items = seq[seq > 0].tolist()
        for i in range(1, len(items)):
            first[items[i - 1], items[i]] += 1
            if i >= 2:
                pairs[(items[i - 2], items[i - 1])][items[i]] += 1
    second = {}
    for key, nexts in pairs.items():
        row = np.zeros(num_items, dtype=np.float64)
        row[list(nexts)] = list(nexts.values())
        second[key] = row
    return first, second


def reference_scores(
    histories: np.ndarray, popularity: np.ndarray, first: np.ndarray, second: dict[tuple[int, int], np.ndarray]
) -> dict[str, np.ndarray]:
    """Scores [N, items] of each reference for the histories (the last item of each row of
    ``histories`` is the target and is not read). Orders are made lexicographic by scaling each
    level above the largest value of the next."""
    scale1 = popularity.max() + 1
    scale2 = (first.max() + 1) * scale1
    prev = histories[:, -2]
    prev2 = histories[:, -3]
    markov1 = first[prev] * scale1 + popularity
    markov2 = markov1.copy()
    for i, key in enumerate(zip(prev2.tolist(), prev.tolist(), strict=True)):
        if key in second:
            markov2[i] += second[key] * scale2
    scores = {"popular": np.broadcast_to(popularity, markov1.shape).copy(), "markov1": markov1, "markov2": markov2}
    for s in scores.values():
        s[:, 0] = -np.inf  # padding is never a candidate
    return scores


def evaluate(manifest: Manifest, split: str, k: int, references: tuple) -> dict[str, dict[str, float]]:
    seqs = _sequences(manifest, split)
    target = torch.from_numpy(seqs[:, -1].astype(np.int64))
    out = {}
    for name, scores in reference_scores(seqs, *references).items():
        ranks = target_ranks(torch.from_numpy(scores), target)
        out[name] = finalize(ranking_sums(ranks, k))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="data root (manifest.json) with a T1 task")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    manifest = Manifest.load(args.data)
    num_items = manifest.num_seq_items
    if num_items > MAX_DENSE_ITEMS:
        raise SystemExit(f"{args.data}: {num_items} T1 items; the dense transition table stops at {MAX_DENSE_ITEMS}")
    popularity = manifest.load_train_counts("t1").astype(np.float64)
    references = (popularity, *count_transitions(_sequences(manifest, "train"), num_items))
    result = {
        "data": args.data,
        "split": manifest.split,
        **{split: evaluate(manifest, split, args.k, references) for split in ("valid", "test")},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
