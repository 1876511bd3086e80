"""Training augmentation as pure tensor functions: per-sample color jitter, HED stain jitter and the 8 symmetries
of the square.

Owns what "augmented" means; model.model_input calls augment() between Macenko and ImageNet normalization. Every
function takes float (B, 3, H, W) tensors in [0, 1] on any device and draws only from the generator passed in,
so a resumed run repeats its draws exactly. torchvision's ColorJitter on a batch would share one draw; here each
image gets its own factors, and color_jitter equals torchvision's adjust_brightness -> adjust_contrast ->
adjust_saturation -> adjust_hue with those factors (tests/test_augment.py checks it). hed_jitter is Tellez et
al.'s (2018) HED augmentation in scikit-image's stain space: each stain's concentration s -> alpha * s + beta.

    x = augment.augment(x, jitter=[0.05, 0.05, 0.02, 0.01], gen=torch.Generator(device).manual_seed(1),
                        hed=(0.05, 0.01))
"""
from __future__ import annotations

import functools

import torch

DEFAULT_JITTER = (0.05, 0.05, 0.02, 0.01)  # the original pipeline's ColorJitter(brightness, contrast, saturation, hue)
GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights, so jitter matches its adjust_* functions


@functools.lru_cache(maxsize=64)
def constant(values: tuple, device, shape=(-1,)):
    """A small constant made once per device: torch.tensor(..., device=cuda) each step would wait for the GPU."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(shape)


def grey(x):
    return (x * constant(GREY, x.device, (1, 3, 1, 1))).sum(1, keepdim=True)


def jitter_factors(n: int, jitter, gen, device):
    """(n, 4) per-sample brightness, contrast, saturation factors ~ U[1-j, 1+j] and hue shift ~ U[-h, h]."""
    u = torch.rand(n, 4, generator=gen, device=device) * 2 - 1
    return u * constant(tuple(jitter), device) + constant((1.0, 1.0, 1.0, 0.0), device)


def shift_hue(x, turns):
    """Rotate each image's HSV hue by turns (B,); saturation and value stay, as in torchvision's adjust_hue."""
    r, g, b = x.unbind(1)
    v, c = x.amax(1), x.amax(1) - x.amin(1)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = (h / 6 + turns.view(-1, 1, 1)) % 1
    k = (constant((5.0, 3.0, 1.0), x.device, (1, 3, 1, 1)) + 6 * h.unsqueeze(1)) % 6  # HSV->RGB, branch-free
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def color_jitter(x, factors):
    """torchvision's adjust_brightness, _contrast, _saturation, _hue in that order, each sample its own factors."""
    b, c, s = (factors[:, k].view(-1, 1, 1, 1) for k in range(3))
    x = (x * b).clamp(0, 1)
    x = (c * x + (1 - c) * grey(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    x = (s * x + (1 - s) * grey(x)).clamp(0, 1)
    return shift_hue(x, factors[:, 3])


# scikit-image's rgb_from_hed (Ruifrok & Johnston): rows are the hematoxylin, eosin and DAB optical densities; its
# stain space measures OD in units of -ln(1e-6), as rgb2hed / hed2rgb do.
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
HED_FROM_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(RGB_FROM_HED, dtype=torch.float64)).tolist()))
LOG_ADJUST = 13.815510557964274  # -ln(1e-6)


def hed_factors(n: int, hed, gen, device):
    """(n, 2, 3) per-sample, per-stain alpha ~ U[1-a, 1+a] and beta ~ U[-b, b] for hed = (a, b)."""
    u = torch.rand(n, 2, 3, generator=gen, device=device) * 2 - 1
    return u * constant((float(hed[0]), float(hed[1])), device, (1, 2, 1)) + constant((1.0, 0.0), device, (1, 2, 1))


def hed_jitter(x, factors):
    """scikit-image's rgb2hed, s -> alpha * s + beta per stain and sample, then hed2rgb; without rgb2hed's clamp of
    negative stains at 0, so alpha 1, beta 0 gives the patch back (up to float rounding)."""
    to_hed, to_rgb = constant(HED_FROM_RGB, x.device, (3, 3)), constant(RGB_FROM_HED, x.device, (3, 3))
    stains = torch.einsum("bchw,cs->bshw", torch.log(x.clamp(min=1e-6)) / -LOG_ADJUST, to_hed)
    stains = stains * factors[:, 0, :, None, None] + factors[:, 1, :, None, None]
    return torch.exp(torch.einsum("bshw,sc->bchw", stains, to_rgb) * -LOG_ADJUST).clamp(0, 1)


def random_symmetry(x, gen):
    """Each image independently gets one of the 8 symmetries of the square (transpose, flip, flip): bacteria and
    tissue have no preferred orientation, so this is free data."""
    bits = torch.rand(x.shape[0], 3, 1, 1, 1, generator=gen, device=x.device) < 0.5
    x = torch.where(bits[:, 0], x.transpose(-1, -2), x)
    x = torch.where(bits[:, 1], x.flip(-1), x)
    return torch.where(bits[:, 2], x.flip(-2), x)


def augment(x, jitter, gen, hed=(0.0, 0.0)):
    """Color jitter (B, C, S, H amplitudes; all 0 skips it), HED jitter (alpha, beta amplitudes; (0, 0) skips it
    and draws nothing, so runs without it repeat older runs' draws) then a random symmetry, per sample."""
    factors = jitter_factors(x.shape[0], jitter, gen, x.device)  # drawn even when 0: same draws either way
    x = color_jitter(x, factors) if any(jitter) else x
    if any(hed):
        x = hed_jitter(x, hed_factors(x.shape[0], hed, gen, x.device))
    return random_symmetry(x, gen)
