"""augment.py: per-sample jitter equal to torchvision's, independent per sample; square symmetries."""
import numpy as np
import torch

from helico import augment


def test_color_jitter_equals_torchvision_adjust_functions_per_sample():
    import torchvision.transforms.functional as TF
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([[1.04, 0.97, 1.02, 0.01], [0.96, 1.05, 0.98, -0.01], [1.0, 1.0, 1.0, 0.3]])
    out = augment.color_jitter(x, factors)
    for k, (b, c, s, h) in enumerate(factors.tolist()):
        ref = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[k], b), c), s), h)
        torch.testing.assert_close(out[k], ref, atol=2e-6, rtol=0)


def test_each_sample_gets_its_own_jitter_whatever_its_batch_mates():
    a, b, c = torch.rand(3, 1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    jitter = [0.3, 0.3, 0.3, 0.2]
    draws = lambda n, seed=5: augment.jitter_factors(n, jitter, torch.Generator().manual_seed(seed), "cpu")
    first = augment.color_jitter(torch.cat([a, b]), draws(2))
    second = augment.color_jitter(torch.cat([a, c]), draws(2))
    torch.testing.assert_close(first[0], second[0])  # contrast uses each image's own mean, not the batch's
    same = augment.color_jitter(a.repeat(8, 1, 1, 1), draws(8))
    assert len({tuple(img.flatten()[:5].tolist()) for img in same}) == 8  # 8 copies, 8 different results
    factors = draws(4000, 0)
    assert factors[:, :3].min() >= 0.7 and factors[:, :3].max() <= 1.3 and factors[:, 3].abs().max() <= 0.2
    assert abs(np.corrcoef(factors[:, 0], factors[:, 1])[0, 1]) < 0.1  # brightness and contrast drawn apart


def test_random_symmetry_gives_each_image_one_of_the_eight_square_symmetries():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5).repeat(32, 1, 1, 1)
    out = augment.random_symmetry(x, torch.Generator().manual_seed(0))
    seen = set()
    for img, res in zip(x, out):
        options = [torch.rot90(t, k, (-2, -1)) for t in (img, img.flip(-1)) for k in range(4)]
        match = [k for k, o in enumerate(options) if torch.equal(o, res)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 8
