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


def test_hed_jitter_is_scikit_images_stain_space_scaled_and_shifted_per_sample():
    from skimage import data
    from skimage.color import hed_from_rgb, rgb2hed, rgb_from_hed
    x = torch.from_numpy(data.immunohistochemistry()[:48, :48]).permute(2, 0, 1).float().div(255)
    x = torch.stack((x, x.flip(-1)))
    factors = torch.tensor([[[1.05, 0.97, 1.02], [0.01, -0.005, 0.003]], [[0.9, 1.1, 1.0], [0.0, 0.02, -0.01]]])
    out = augment.hed_jitter(x, factors)
    for i in range(2):  # scikit-image's formulas with its matrices, in float64
        rgb = np.maximum(x[i].permute(1, 2, 0).double().numpy(), 1e-6)
        stains = (np.log(rgb) / np.log(1e-6)) @ hed_from_rgb
        assert np.allclose(stains[stains.min(-1) > 0], rgb2hed(rgb)[stains.min(-1) > 0], atol=1e-9)  # same space
        stains = stains * factors[i, 0].double().numpy() + factors[i, 1].double().numpy()
        expected = np.clip(np.exp(-(stains * -np.log(1e-6)) @ rgb_from_hed), 0, 1)
        assert np.abs(out[i].permute(1, 2, 0).double().numpy() - expected).max() < 1e-5
    identity = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]]).repeat(2, 1, 1)
    assert (augment.hed_jitter(x, identity) - x).abs().max() < 1e-5  # rgb2hed's clamp at 0 would change it:
    assert (rgb2hed(x[0].permute(1, 2, 0).numpy())[..., 1] <= 0).mean() > 0.9  # eosin is negative on IHC


def test_augment_draws_hed_factors_only_when_asked_and_repeats_by_seed():
    x = torch.rand(4, 3, 16, 16) * 0.8 + 0.1
    jitter = augment.DEFAULT_JITTER
    plain = augment.augment(x, jitter, torch.Generator().manual_seed(3))
    assert torch.equal(augment.augment(x, jitter, torch.Generator().manual_seed(3), (0.0, 0.0)), plain)
    hed = [augment.augment(x, jitter, torch.Generator().manual_seed(3), (0.05, 0.01)) for _ in range(2)]
    assert torch.equal(hed[0], hed[1]) and not torch.allclose(hed[0], plain, atol=1e-3)
    factors = augment.hed_factors(10000, (0.05, 0.01), torch.Generator().manual_seed(0), "cpu")
    assert 0.95 <= factors[:, 0].min() and factors[:, 0].max() <= 1.05 and factors[:, 1].abs().max() <= 0.01
    assert factors[:, 0].std() > 0.02 and factors[:, 1].abs().max() > 0.0099
