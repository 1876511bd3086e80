"""Which training samples a run sees, and in what order: the stratified --limit-samples subset and the epoch sampler.

The order is drawn from (seed, epoch) alone, never from a generator that lives across epochs, so a resumed run (even
mid-epoch) sees exactly the order the uninterrupted run saw; feeds.py and the DataLoader both take it.
"""
from __future__ import annotations

import math
import random

import torch


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler's contract (equal padded share per rank, set_epoch) with the order drawn from (seed, epoch)
    alone, so a resumed run sees the same order; `skip` resumes mid-epoch, `balanced` draws classes equally."""

    def __init__(self, labels, balanced: bool, seed: int, rank: int = 0, world: int = 1):
        self.labels, self.balanced, self.seed = torch.as_tensor(labels), balanced, seed
        self.rank, self.world = rank, world
        self.per_rank = math.ceil(len(labels) / world)
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n, total = len(self.labels), self.per_rank * self.world
        if self.balanced:
            weights = 1.0 / torch.bincount(self.labels, minlength=2).float()[self.labels]
            order = torch.multinomial(weights, total, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g).repeat(math.ceil(total / n))[:total]  # pad like DistributedSampler
        return iter(order[self.rank::self.world][self.skip:].tolist())

    def __len__(self):
        return max(0, self.per_rank - self.skip)


def stratified_subset(samples, n, seed):
    """n samples keeping the class ratio (at least one per class), the same ones for a given seed."""
    if n is None or n >= len(samples):
        return samples
    by_label: dict[int, list[int]] = {}
    for k, s in enumerate(samples):
        by_label.setdefault(s.label, []).append(k)
    rng, keep = random.Random(seed), []
    for label, ks in sorted(by_label.items()):
        keep += rng.sample(ks, min(len(ks), max(1, round(n * len(ks) / len(samples)))))
    return [samples[k] for k in sorted(keep)]
