"""Training augmentation as pure tensor functions: per-sample colour jitter and the 8 symmetries of the square.

Owns what "augmented" means; model.model_input calls augment() between Macenko and ImageNet normalization. Every
function takes float (B, 3, H, W) tensors in [0, 1] on any device and draws only from the generator passed in,
so a resumed run repeats its draws exactly. torchvision's ColorJitter on a batch would share one draw; here each
image gets its own factors, and color_jitter equals torchvision's adjust_brightness -> adjust_contrast ->
adjust_saturation -> adjust_hue with those factors (tests/test_augment.py checks it).

    x = augment.augment(x, jitter=[0.05, 0.05, 0.02, 0.01], gen=torch.Generator(device).manual_seed(1))
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


def random_symmetry(x, gen):
    """Each image independently gets one of the 8 symmetries of the square (transpose, flip, flip): bacteria and
    tissue have no preferred orientation, so this is free data."""
    bits = torch.rand(x.shape[0], 3, 1, 1, 1, generator=gen, device=x.device) < 0.5
    x = torch.where(bits[:, 0], x.transpose(-1, -2), x)
    x = torch.where(bits[:, 1], x.flip(-1), x)
    return torch.where(bits[:, 2], x.flip(-2), x)


def augment(x, jitter, gen):
    """Colour jitter (B, C, S, H amplitudes; all 0 skips it) then a random symmetry, per sample."""
    factors = jitter_factors(x.shape[0], jitter, gen, x.device)  # drawn even when 0: same draws either way
    return random_symmetry(color_jitter(x, factors) if any(jitter) else x, gen)
