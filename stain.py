"""Stain normalization by hand: a folder of PNGs, a mosaic to judge by eye, or a benchmark against torchstain.

Usage:
    # offline pre-normalization: every PNG under IN_DIR (recursively) -> same tree under OUT_DIR
    python stain.py --reference-patch ref.png IN_DIR OUT_DIR [--device cuda] [--batch-size 64] [--mode ihc|macenko|auto]
    # speed of macenko_gpu and of torchstain's per-image normalizer, same inputs and device
    python stain.py --benchmark [--device cpu|cuda] [--batch-size 64] [--image-size 224] [--json OUT]
    # a mosaic to judge by eye: --count patches of IN_DIR as original | default (ihc) | canonical Macenko
    python stain.py --preview --reference-patch ref.png IN_DIR OUT.png [--count 8]

The normalizer itself (modes, reference rules, memory) is macenko_gpu.py; training and evaluation use it directly.

Exit codes: 0 ok, 2 bad input or usage (missing reference, empty folder, unreadable PNG, missing torchstain).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import common
import macenko_gpu


def normalize_folder(reference, in_dir, out_dir, device, batch_size, mode="ihc") -> int:
    """Normalize every PNG under in_dir into the same relative path under out_dir; returns how many."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not Path(reference).is_file():
        raise FileNotFoundError(f"reference image not found: {reference}")
    if not in_dir.is_dir():
        raise FileNotFoundError(f"input folder not found: {in_dir}")
    if out_dir.resolve() == in_dir.resolve() or in_dir.resolve() in out_dir.resolve().parents:
        raise ValueError(f"output folder {out_dir} must not be the input folder or inside it")
    files = sorted(p for p in in_dir.rglob("*") if p.suffix.lower() == ".png" and p.is_file())  # skips Thumbs.db
    if not files:
        raise ValueError(f"no .png files under {in_dir}")
    norm = macenko_gpu.MacenkoNormalizer(mode=mode).to(device).fit(macenko_gpu.load_rgb(reference))
    from tqdm import tqdm
    batch, paths = [], []
    for path in tqdm(files, unit="img", desc="macenko", disable=None):
        image = macenko_gpu.load_rgb(path)
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):  # a batch holds one tile size
            _write_batch(norm, batch, paths, in_dir, out_dir)
            batch, paths = [], []
        batch.append(image)
        paths.append(path)
    _write_batch(norm, batch, paths, in_dir, out_dir)
    return len(files)


def _write_batch(norm, images, paths, in_dir, out_dir):
    levels = norm.normalize(torch.stack(images).to(norm.device)).mul(255).round().to(torch.uint8)
    for rgb, path in zip(levels.permute(0, 2, 3, 1).cpu().numpy(), paths):
        with common.atomic_path(out_dir / path.relative_to(in_dir)) as tmp:
            Image.fromarray(rgb).save(tmp, "PNG")


def preview(reference, in_dir, out_png, count=8, device="cpu") -> int:
    """Mosaic of `count` PNGs spread evenly over in_dir's sorted tree: original | default (ihc) | canonical
    (macenko; left out, with a note, if the reference cannot serve it). Returns how many patches it shows."""
    in_dir = Path(in_dir)
    if not Path(reference).is_file():
        raise FileNotFoundError(f"reference image not found: {reference}")
    files = sorted(p for p in in_dir.rglob("*") if p.suffix.lower() == ".png" and p.is_file()) if in_dir.is_dir() \
        else []
    if not files:
        raise ValueError(f"no .png files under {in_dir}")
    picked = [files[i * len(files) // min(count, len(files))] for i in range(min(count, len(files)))]
    ref, columns = macenko_gpu.load_rgb(reference), {}
    columns["default (ihc)"] = macenko_gpu.MacenkoNormalizer().to(device).fit(ref)
    try:
        columns["canonical Macenko"] = macenko_gpu.MacenkoNormalizer(mode="macenko").to(device).fit(ref)
    except ValueError as err:
        print(f"note: canonical Macenko column left out: {err}", file=sys.stderr)
    labels = [p.relative_to(in_dir).as_posix() for p in picked]
    mosaic = macenko_gpu.preview_mosaic([macenko_gpu.load_rgb(p) for p in picked], columns, labels)
    with common.atomic_path(out_png) as tmp:
        mosaic.save(tmp, "PNG")
    return len(picked)


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # time the work, not the queueing
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def benchmark(device, batch_size=64, size=224, repeats=3) -> dict:
    """img/s of normalize() (default ihc mode, and canonical macenko) on one batch and of torchstain's per-image
    TorchMacenkoNormalizer on the same tiles; the grey-level difference of the macenko mode to torchstain."""
    try:
        from torchstain.torch.normalizers import TorchMacenkoNormalizer
    except ImportError:
        raise ValueError("--benchmark compares against torchstain, which is not installed: "
                         "pip install -r requirements-dev.txt") from None
    device = torch.device(device)
    tiles = macenko_gpu.synthetic_ihc_tiles(batch_size + 1, size, seed=0).to(device)
    reference, batch = tiles[0], tiles[1:]
    theirs, rates, outputs = TorchMacenkoNormalizer(), {}, {}
    theirs.fit(reference)
    for mode in ("ihc", "macenko"):
        ours = macenko_gpu.MacenkoNormalizer(mode=mode).to(device).fit(reference)
        ours.normalize(batch[:2])  # warm-up: kernels, allocator
        runs = [_timed(lambda: ours.normalize(batch), device) for _ in range(repeats)]
        rates[mode], outputs[mode] = batch_size / sorted(t for t, _ in runs)[len(runs) // 2], runs[0][1]  # median
    theirs.normalize(batch[0], stains=False)
    theirs_s, theirs_out = _timed(lambda: [theirs.normalize(t, stains=False)[0] for t in batch], device)
    diff = outputs["macenko"].mul(255).round() - torch.stack(theirs_out).permute(0, 3, 1, 2).float()
    theirs_rate = batch_size / theirs_s
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU thread(s)"
    return {"device": str(device), "card": card, "batch_size": batch_size, "size": size, "torch": torch.__version__,
            "macenko_gpu_img_per_s": round(rates["ihc"], 1), "macenko_mode_img_per_s": round(rates["macenko"], 1),
            "torchstain_img_per_s": round(theirs_rate, 1), "ratio": round(rates["ihc"] / theirs_rate, 2),
            "macenko_mode_ratio": round(rates["macenko"] / theirs_rate, 2),
            "mean_abs_level_difference": round(float(diff.abs().mean()), 3)}


def get_args_parser():
    p = argparse.ArgumentParser(description="Batched, IHC-safe Macenko stain normalization: normalize a folder of "
                                "PNGs, or --benchmark against torchstain.", epilog="exit codes: 0 ok, 2 bad input",
                                formatter_class=common.HelpFormatter, allow_abbrev=False)
    p.add_argument("in_dir", nargs="?", help="folder of PNG tiles, searched recursively (folder mode)")
    p.add_argument("out_dir", nargs="?", help="where the normalized PNGs go, same relative paths; not inside IN_DIR")
    p.add_argument("--reference-patch", metavar="PNG", help="the PNG defining the target colors (one file here; "
                   "train.py's flag of the same name also pools several): a tissue-rich tile with blue DAB-free nuclei "
                   "and clear brown DAB (a few bacteria are enough); keep the same one for training and evaluation")
    p.add_argument("--preview", action="store_true", help="write a mosaic PNG (OUT_DIR is then the PNG's path) of "
                   "--count patches of IN_DIR: original | default | canonical Macenko, to judge the stain by eye")
    p.add_argument("--count", type=int, default=8, help="--preview: patches shown, spread evenly over IN_DIR")
    p.add_argument("--benchmark", action="store_true", help="print img/s of this implementation and of torchstain's "
                   "per-image normalizer on the same synthetic tiles and device (needs requirements-dev.txt)")
    common.add_device_flag(p)
    p.add_argument("--batch-size", type=int, default=64, help="tiles per normalize() call; 256 or more pays off "
                   "on a GPU, 64 is plenty on a CPU")
    p.add_argument("--image-size", type=int, default=224, help="benchmark: side in pixels of the synthetic tiles, "
                   "as train.py's --image-size (the model input) would make them")
    p.add_argument("--repeats", type=int, default=3, help="benchmark: timed runs of our batch (the median counts)")
    p.add_argument("--json", help="benchmark: also write the numbers to this JSON file")
    p.add_argument("--mode", choices=macenko_gpu.MODES, default="ihc", help="ihc (default): DAB vector from the "
                   "reference, its "
                   "amount kept, hematoxylin per patch - bacteria stay brown, nuclei stay blue; macenko: canonical "
                   "Macenko on every patch (torchstain's; paints DAB-free nuclei brown); auto: the previous default, "
                   "for checkpoints trained with it (loses sparse bacteria)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.batch_size < 1 or args.image_size < 8 or args.repeats < 1:
            raise ValueError("--batch-size and --repeats must be >= 1 and --image-size >= 8")
        device = common.resolve_device(args.device)
        if args.benchmark:
            if args.reference_patch or args.in_dir:
                raise ValueError("--benchmark takes no --reference-patch, IN_DIR or OUT_DIR")
            r = benchmark(device, args.batch_size, args.image_size, args.repeats)
            print(f"{r['device']} ({r['card']}), batch {r['batch_size']} x 3x{r['size']}x{r['size']}, "
                  f"torch {r['torch']}")
            print(f"macenko_gpu, default ihc mode (batched) : {r['macenko_gpu_img_per_s']:10.1f} img/s")
            print(f"macenko_gpu, macenko mode (batched)     : {r['macenko_mode_img_per_s']:10.1f} img/s")
            print(f"torchstain (per-image loop)             : {r['torchstain_img_per_s']:10.1f} img/s")
            print(f"ratio, ihc / torchstain                 : {r['ratio']:10.2f}x")
            print(f"ratio, macenko mode / torchstain        : {r['macenko_mode_ratio']:10.2f}x  (outputs differ by "
                  f"{r['mean_abs_level_difference']} grey levels on average)")
            if args.json:
                common.atomic_write_text(args.json, json.dumps(r, indent=2))
            return common.EXIT_OK
        if not (args.reference_patch and args.in_dir and args.out_dir):
            raise ValueError("folder mode needs --reference-patch REF.png IN_DIR OUT_DIR (or use --benchmark)")
        if args.preview:
            if args.count < 1 or not args.out_dir.lower().endswith(".png"):
                raise ValueError("--preview needs --count >= 1 and an OUT.png path ending in .png")
            shown = preview(args.reference_patch, args.in_dir, args.out_dir, args.count, device)
            print(f"wrote {args.out_dir}: {shown} patches, original | default (ihc) | canonical Macenko")
            return common.EXIT_OK
        count = normalize_folder(args.reference_patch, args.in_dir, args.out_dir, device, args.batch_size, args.mode)
        print(f"normalized {count} images into {args.out_dir}")
        return common.EXIT_OK
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return common.EXIT_BAD_INPUT
    except (OSError, ImportError) as err:  # a full disk is exit 5, not bad input; torchstain missing: one line
        return common.unexpected_fault(err)


if __name__ == "__main__":
    sys.exit(main())
