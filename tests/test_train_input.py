"""train_input.py: per-sample jitter equal to torchvision's, independent per sample; square symmetries; epoch order."""
import numpy as np
import torch

import common
import train_input


# ----------------------------------------------------------------------------------------------- augmentation
def test_color_jitter_equals_torchvision_adjust_functions_per_sample():
    import torchvision.transforms.functional as TF
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([[1.04, 0.97, 1.02, 0.01], [0.96, 1.05, 0.98, -0.01], [1.0, 1.0, 1.0, 0.3]])
    out = train_input.color_jitter(x, factors)
    for k, (b, c, s, h) in enumerate(factors.tolist()):
        ref = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[k], b), c), s), h)
        torch.testing.assert_close(out[k], ref, atol=2e-6, rtol=0)


def test_each_sample_gets_its_own_jitter_whatever_its_batch_mates():
    a, b, c = torch.rand(3, 1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    jitter = [0.3, 0.3, 0.3, 0.2]
    draws = lambda n, seed=5: train_input.jitter_factors(n, jitter, torch.Generator().manual_seed(seed), "cpu")
    first = train_input.color_jitter(torch.cat([a, b]), draws(2))
    second = train_input.color_jitter(torch.cat([a, c]), draws(2))
    torch.testing.assert_close(first[0], second[0])  # contrast uses each image's own mean, not the batch's
    same = train_input.color_jitter(a.repeat(8, 1, 1, 1), draws(8))
    assert len({tuple(img.flatten()[:5].tolist()) for img in same}) == 8  # 8 copies, 8 different results
    factors = draws(4000, 0)
    assert factors[:, :3].min() >= 0.7 and factors[:, :3].max() <= 1.3 and factors[:, 3].abs().max() <= 0.2
    assert abs(np.corrcoef(factors[:, 0], factors[:, 1])[0, 1]) < 0.1  # brightness and contrast drawn apart


def test_random_symmetry_gives_each_image_one_of_the_eight_square_symmetries():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5).repeat(32, 1, 1, 1)
    out = train_input.random_symmetry(x, torch.Generator().manual_seed(0))
    seen = set()
    for img, res in zip(x, out):
        options = [torch.rot90(t, k, (-2, -1)) for t in (img, img.flip(-1)) for k in range(4)]
        match = [k for k, o in enumerate(options) if torch.equal(o, res)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 8


# ----------------------------------------------------------------------------------------------- order
def test_epoch_sampler_shards_cover_every_sample_and_replay_per_epoch():
    labels = [0] * 37 + [1] * 3
    shards = [train_input.EpochSampler(labels, False, seed=0, rank=r, world=3) for r in range(3)]
    for s in shards:
        s.set_epoch(4)
    orders = [list(s) for s in shards]
    assert {len(o) for o in orders} == {14} and set(sum(orders, [])) == set(range(40))
    again = train_input.EpochSampler(labels, False, seed=0, rank=1, world=3)
    again.set_epoch(4, skip=5)
    assert list(again) == orders[1][5:]  # mid-epoch resume continues the same order
    balanced = train_input.EpochSampler(labels, True, seed=0)
    picks = []
    for epoch in range(50):
        balanced.set_epoch(epoch)
        picks += [labels[i] for i in balanced]
    assert 0.4 < np.mean(picks) < 0.6


def test_limit_samples_keeps_the_class_ratio():
    samples = [common.Sample(f"p/{k}.png", "B22-01", "annotated", int(k < 20), k) for k in range(200)]
    subset = train_input.stratified_subset(samples, 50, seed=0)
    assert len(subset) == 50 and sum(s.label for s in subset) == 5
    assert subset == train_input.stratified_subset(samples, 50, seed=0)
