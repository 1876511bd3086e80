"""What the model sees in training and in which order: batched per-sample augmentation on the device, the resumable
epoch sampler, the stratified subset of --limit-samples, the patch datasets (PNGs or the packed --cache) and the stain
reference. Split out of train.py to keep it under ~500 lines.

    import train_input
    x = train_input.model_input(uint8_batch, normalizer, jitter=[0.05, 0.05, 0.02, 0.01], gen=generator)  # training
    x = train_input.model_input(uint8_batch, normalizer)                                                  # evaluation

model_input: common.to_unit (Macenko when a normalizer is given) -> colour jitter with independent factors per sample
(torchvision's ColorJitter on a batch would share one draw; here each image gets its own, and equals torchvision's
adjust_brightness -> adjust_contrast -> adjust_saturation -> adjust_hue with those factors) -> one of the 8 symmetries
of the square per sample -> common.imagenet_normalize. Every random draw comes from the generator passed in, so a
resumed run repeats them exactly.
"""
from __future__ import annotations

import functools
import math
import random
from pathlib import Path

import torch

import common

# ----------------------------------------------------------------------------------------------- augmentation
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


def model_input(images, normalizer=None, jitter=None, gen=None, channels_last=False):
    """uint8 batch on the device -> normalized float input; with a generator (training) also jitter + symmetry."""
    x = common.to_unit(images, normalizer)
    if gen is not None:
        factors = jitter_factors(x.shape[0], jitter, gen, x.device)  # drawn even when 0: same draws either way
        x = random_symmetry(color_jitter(x, factors) if any(jitter) else x, gen)
    x = common.imagenet_normalize(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------------------------- order
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


# ----------------------------------------------------------------------------------------------- pixels
def fit_normalizer(args, root: Path):
    """The Macenko normalizer of --reference-patch (relative to the data root unless absolute)."""
    import macenko_gpu  # only with --macenko
    ref = Path(args.reference_patch)
    ref = ref if ref.is_absolute() else root / ref
    if not ref.is_file():
        raise common.DataError(f"--reference-patch {ref}: file not found (--macenko needs a stain reference tile; "
                               f"pass one under the data root or use --no-macenko)")
    try:
        return macenko_gpu.MacenkoNormalizer().fit(macenko_gpu.load_rgb(ref))
    except ValueError as e:
        raise common.DataError(f"--reference-patch {ref}: {e}") from None


def prepare_cache(args, data, device) -> None:
    """--cache: build, resume or reuse the packed cache, once, before any DataLoader worker forks (else a no-op).
    With --cache-normalized it holds Macenko's output for --reference-patch; a finished cache of another kind
    (size, normalization, reference) is refused rather than rebuilt under a job that may be reading it."""
    if args.cache:
        import patch_cache  # only with --cache
        patch_cache.prepare(args.cache, data, args.image_size, max(1, args.workers), args.cache_normalized,
                            args.reference_patch, device)


def make_dataset(args, data, samples):
    """(uint8 image, label, index) items: decoded PNGs, or with --cache the same bytes from the packed cache."""
    if not args.cache:
        return common.PatchDataset(data.root, samples, args.image_size, args.skip_bad_images)
    import patch_cache
    return patch_cache.CachedPatchDataset(args.cache, samples, args.image_size, root=data.root,
                                          skip_bad=args.skip_bad_images)
