"""sampling.py: the epoch order replays from (seed, epoch) alone, per rank; --limit-samples keeps the class ratio."""
import numpy as np

import common
from helico import sampling


def test_epoch_sampler_shards_cover_every_sample_and_replay_per_epoch():
    labels = [0] * 37 + [1] * 3
    shards = [sampling.EpochSampler(labels, False, seed=0, rank=r, world=3) for r in range(3)]
    for s in shards:
        s.set_epoch(4)
    orders = [list(s) for s in shards]
    assert {len(o) for o in orders} == {14} and set(sum(orders, [])) == set(range(40))
    again = sampling.EpochSampler(labels, False, seed=0, rank=1, world=3)
    again.set_epoch(4, skip=5)
    assert list(again) == orders[1][5:]  # mid-epoch resume continues the same order
    balanced = sampling.EpochSampler(labels, True, seed=0)
    picks = []
    for epoch in range(50):
        balanced.set_epoch(epoch)
        picks += [labels[i] for i in balanced]
    assert 0.4 < np.mean(picks) < 0.6


def test_limit_samples_keeps_the_class_ratio():
    samples = [common.Sample(f"p/{k}.png", "B22-01", "annotated", int(k < 20), k) for k in range(200)]
    subset = sampling.stratified_subset(samples, 50, seed=0)
    assert len(subset) == 50 and sum(s.label for s in subset) == 5
    assert subset == sampling.stratified_subset(samples, 50, seed=0)
