"""Negative samplers. Draws come from a generator seeded identically on every rank."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch


def make_generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded from several integers (run seed, task, phase, epoch...)."""
    mixed = np.random.SeedSequence(list(seeds)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & ((1 << 63) - 1))


def hash_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (the data order's shuffle seed)."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:4], "little")


def num_negatives(num_items: int, fraction: float) -> int:
    """T1's shared negatives per step: ``fraction`` of the items 1..V-1, at least one."""
    return max(1, int(round(fraction * (num_items - 1))))


class SharedNegativeSampler:
    """T1 sampled softmax: ``fraction`` of the vocabulary (ids 1..V-1) drawn without replacement,
    shared by the whole global batch."""

    def __init__(self, num_items: int, fraction: float) -> None:
        self.num_items = num_items
        self.num_negatives = num_negatives(num_items, fraction)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(self.num_items - 1, generator=generator)[: self.num_negatives] + 1


class PopularityNegativeSampler:
    """Static popularity sampler (LambdaFM): items ranked by training frequency, rank r drawn with
    probability proportional to exp(-(r + 1) / (rho * N))."""

    def __init__(self, train_counts: np.ndarray, rho: float) -> None:
        num_items = len(train_counts)
        # Most frequent first; ties by id so the ranking is the same everywhere.
        self.items_by_rank = torch.from_numpy(np.lexsort((np.arange(num_items), -train_counts)).astype(np.int64))
        ranks = torch.arange(num_items, dtype=torch.float64)
        self.probs = torch.exp(-(ranks + 1) / (rho * num_items))
        self.probs /= self.probs.sum()

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        ranks = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        return self.items_by_rank[ranks]
