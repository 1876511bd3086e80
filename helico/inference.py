"""Patches through a network for inference, batched: where the batches come from and how each becomes model input.

evaluate.py scores patches with it (sigmoid of the logit) and bags.py extracts features with it (the penultimate
layer), so both see exactly the pixels validation saw:
- batches: a DataLoader decoding PNGs with `workers` processes, or, with a packed cache (packed_cache.py), one uint8
  tensor on the device when it fits in `resident_max_frac` of its free memory, else batches streamed from the host
  cache by a thread (feeds.scoring_batches; no DataLoader either way);
- input: model.model_input (Macenko when the checkpoint has a stain and the cache does not hold normalized patches,
  then ImageNet normalization) under the run's precision (model.Precision: autocast, memory layout).

    bad = inference.run(net, normalizer, root, samples, 64, device, consume, batch_size=256, workers=4)
    # consume(indices, outputs, dropped) per batch: numpy indices into samples, net's float32 outputs on the CPU,
    # and the indices of undecodable files dropped from this batch (skip_bad only)
"""
from __future__ import annotations

import contextlib
import sys

import torch
from tqdm import tqdm

import common
from common import DataError
from helico import feeds, loaders, model, packed_cache, staining


def cached_patches(cache, root, samples, image_size: int, normalizer, skip_bad: bool, stats=None):
    """The samples read from the packed cache, and the normalizer still to apply to them: none when the cache holds
    patches already normalized to the checkpoint's own stain reference (refused when to another one)."""
    ds = packed_cache.CachedPatchDataset(cache, samples, image_size, root=root, skip_bad=skip_bad, stats=stats)
    if not ds.normalized:
        return ds, normalizer
    if not staining.same_stain(ds.stain, normalizer.state_dict() if normalizer else None):
        raise DataError(f"--cache {cache}: holds patches Macenko-normalized to {ds.reference}, but the checkpoint was "
                        f"trained {'with another stain reference' if normalizer else 'without Macenko'}; give "
                        f"--cache a folder of plain patches")
    return ds, None


def run(net, normalizer, root, samples, image_size: int, device, consume, *, batch_size: int, workers: int,
        skip_bad: bool = False, cache=None, precision: model.Precision | None = None,
        resident_max_frac: float = feeds.DEFAULT_MAX_FRAC, desc: str = "scoring", stats=None) -> list[int]:
    """Run `net` over `samples` in order, calling consume(indices, outputs, dropped) per batch; returns the indices
    of the files skipped as undecodable. Batched, under `precision`'s autocast and layout (default float32).
    stats: HelicoData.file_stats, so a cache's staleness check stats no file."""
    precision = precision or model.precision(device, amp=False)
    if cache is None:
        ds = common.PatchDataset(root, samples, image_size=image_size, skip_bad=skip_bad)
        batches = loaders.make_loader(ds, batch_size=batch_size, workers=workers, pin_memory=device.type == "cuda")
    else:  # on the device when it fits, else streamed by a thread: no worker pickles a batch
        ds, normalizer = cached_patches(cache, root, samples, image_size, normalizer, skip_bad, stats)
        batches, _ = feeds.scoring_batches(ds, batch_size, device, resident_max_frac)
    bad = []
    net = precision.place(net, device)
    interactive = sys.stderr.isatty()  # in a log file a cleared bar leaves its last state for the next line to land on
    bar = tqdm(batches, desc=desc, unit="batch", mininterval=2 if interactive else 30, leave=not interactive)
    with torch.inference_mode(), contextlib.closing(bar):
        for images, labels, idx in bar:
            images, labels, idx, dropped = common.drop_bad(images, labels, idx)
            bad += dropped
            if len(idx):
                x = model.model_input(images.to(device, non_blocking=True), normalizer,
                                      channels_last=precision.channels_last)
                with precision.autocast():
                    out = net(x)
                consume(idx.cpu().numpy(), out.float().cpu(), dropped)
            elif dropped:
                consume(idx.cpu().numpy(), None, dropped)
    return bad
