"""Benchmarks of the patient model (train_patient.py): training the MIL model at the real dataset's size, and the
feature extraction's img/s.

    python tools/bench_patient.py                                      # MIL on synthetic bags of one real-sized fold
    python tools/bench_patient.py --checkpoint runs/demo/best.pt --device cpu --workers 2   # + extraction on its data
    python tools/bench_patient.py --checkpoint runs/26/best.pt --data-root $STAGED --device cuda --workers 15 \\
        --batch-size 512 --patches 20000                        # the extraction rate on a GPU
    python tools/bench_patient.py --checkpoint runs/26/best.pt --device cuda --encoders checkpoint,uni,virchow2,phikon

mil: mil.fit (train_patient.py's training, the same defaults, --mil-seeds models) on --train-bags training and
     --val-bags validation synthetic bags of --bag-size patches x --features float32 features (a few planted positive
     patches in half of the bags), for --epochs epochs, on the CPU with torch's threads (--threads to fix them).
     Prints seconds and bags/s.
extract: bags.extract (train_patient.py's extraction: decode or cache, the checkpoint's Macenko and precision) over
     the first --patches Cropped patches of the checkpoint's data, into a temporary folder deleted afterwards, once
     per --encoders entry: checkpoint (the penultimate layer) or a foundation encoder (its architecture with timm's
     random weights: the same arithmetic as the real ones, no weights file needed; needs timm). Prints img/s per
     encoder and the projection for the real dataset's --real-patches patches.
Absolute times depend on the machine: the output names it (CPU model, cores, GPU).

Exit codes: 0 ok, 2 bad input (unreadable checkpoint, missing data root, bad flag value), 5 no space left or an
I/O error writing --json, 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

from pathlib import Path
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]  # the workflow's commands and modules, one folder up
sys.path.insert(0, str(REPO))

import common
from common import DataError
from helico import bags, encoders, loaders, mil, model


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=common.HelpFormatter, allow_abbrev=False)
    p.add_argument("--train-bags", type=int, default=150, help="training patients of one fold of the real data")
    p.add_argument("--val-bags", type=int, default=38, help="validation patients")
    p.add_argument("--bag-size", type=int, default=800, help="patches per bag (real Cropped folders: hundreds)")
    p.add_argument("--features", type=int, default=512, help="features per patch (resnet18's penultimate layer)")
    p.add_argument("--epochs", type=int, default=mil.DEFAULTS["epochs"], help="MIL epochs (train_patient.py's)")
    p.add_argument("--mil-seeds", type=int, default=mil.DEFAULTS["seeds"], help="MIL models trained "
                   "(train_patient.py's --mil-seeds)")
    p.add_argument("--threads", type=int, help="torch CPU threads for the MIL stage (default: torch's own)")
    p.add_argument("--checkpoint", help="a patch checkpoint: also time the feature extraction on its data")
    p.add_argument("--data-root", help="default: the checkpoint's")
    common.add_device_flag(p, what="where features are extracted")
    common.add_amp_flag(p, "as train_patient.py extracts: the patch run's precision for its features, autocast on "
                        "CUDA for a foundation encoder")
    p.add_argument("--batch-size", type=int, default=256, help="extraction batch")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="PNG-decoding processes")
    p.add_argument("--patches", type=int, default=2048, help="patches extracted (the first Cropped ones)")
    p.add_argument("--encoders", default="checkpoint", help="comma-separated feature networks to time: checkpoint, "
                   f"{', '.join(encoders.NAMES)} or timm:ARCH (random weights: the rate is the real one's)")
    p.add_argument("--real-patches", type=int, default=220_000, help="the count the projection is made for")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    return p


def machine(device=None) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = f", {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads{gpu}"


def bench_mil(args) -> dict:
    g = np.random.default_rng(0)

    def bags_of(n):
        out = []
        for i in range(n):
            x = g.normal(size=(args.bag_size, args.features)).astype(np.float32)
            if i % 2:
                x[: 5, 0] += 4  # a few "bacteria" patches
            out.append(torch.from_numpy(x))
        return out, [i % 2 for i in range(n)]
    train_b, train_y = bags_of(args.train_bags)
    val_b, val_y = bags_of(args.val_bags)
    start = time.perf_counter()
    fit = mil.fit(train_b, train_y, val_b, val_y, seed=0, seeds=args.mil_seeds, epochs=args.epochs)
    seconds = time.perf_counter() - start
    return {"stage": "mil", "seconds": seconds, "bags_per_s": args.train_bags * args.epochs / seconds,
            "epochs": args.epochs, "mil_seeds": args.mil_seeds, "train_bags": args.train_bags, "val_bags": args.val_bags,
            "bag_size": args.bag_size, "features": args.features, "best_epoch": fit["epoch"]}


def bench_extract(args, device) -> list[dict]:
    ckpt = common.load_checkpoint(args.checkpoint)
    root = args.data_root or ckpt["config"].get("data_root")
    data = common.load_data(root)
    net, normalizer = model.from_checkpoint(ckpt, args.checkpoint, None, torch.device("cpu"))
    samples = common.one_per_window(data.cropped)[: args.patches]
    wanted: dict[str, list] = {}
    for s in samples:
        wanted.setdefault(s.patient, []).append((s, "cropped"))
    out = []
    for name in args.encoders.split(","):
        if name == "checkpoint":
            body, _ = bags.feature_network(ckpt, net, "checkpoint", "bench")
        else:
            body = encoders.untrained(name)
        with tempfile.TemporaryDirectory() as folder:
            stats = bags.extract(body, normalizer.to(device) if normalizer else None, data.root, wanted, folder,
                                 "bench", int(ckpt["image_size"]), device, batch_size=args.batch_size,
                                 workers=args.workers, precision=bags.extraction_precision(
                                     ckpt, name, device, args.amp))
        out.append({"stage": "extract", "encoder": name, "img_s": stats["img_s"], "patches": stats["patches"],
                    "seconds": stats["seconds"], "image_size": int(ckpt["image_size"]),
                    "input_size": getattr(getattr(body, "spec", None), "input_size", int(ckpt["image_size"])),
                    "device": str(device), "workers": args.workers,
                    "projected_seconds": args.real_patches / stats["img_s"], "real_patches": args.real_patches})
    return out


def report(args, device, results) -> None:
    print(f"machine: {machine(device)}")
    m = results[0]
    print(f"mil      {m['train_bags']} training + {m['val_bags']} validation bags x {m['bag_size']} patches x "
          f"{m['features']} features, {m['epochs']} epochs: {m['seconds']:.1f} s ({m['bags_per_s']:.0f} bags/s)")
    for e in results[1:]:
        print(f"extract  {e['encoder']}: {e['patches']} patches at {e['image_size']} px ({e['input_size']} px in) "
              f"on {e['device']}, {e['workers']} workers: {e['img_s']:.0f} img/s; {e['real_patches']:,} patches "
              f"would take {e['projected_seconds'] / 60:.1f} min")
    if args.json:
        common.atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    threads = torch.get_num_threads()

    def body():
        for flag in ("train_bags", "val_bags", "bag_size", "features", "epochs", "batch_size", "patches",
                     "mil_seeds"):
            if getattr(args, flag) < 1:
                raise DataError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
        if args.threads:
            torch.set_num_threads(args.threads)
        device = common.resolve_device(args.device) if args.checkpoint else None
        results = [bench_mil(args)]
        for name in args.encoders.split(","):
            if name != "checkpoint" and not encoders.is_encoder(name):
                raise DataError(f"--encoders {args.encoders}: unknown {name!r} (checkpoint, "
                                f"{', '.join(encoders.NAMES)} or timm:ARCH)")
            if name != "checkpoint":
                encoders.need_timm(name)
        if args.checkpoint:
            results += bench_extract(args, device)
        report(args, device, results)  # before the threads are reset: the machine line names the ones timed
        return common.EXIT_OK

    def cleanup():
        loaders.stop_workers()
        torch.set_num_threads(threads)  # --threads must not outlive main() when called in-process
    return common.guarded_main(body, kept="nothing written", again="run the same command again", cleanup=cleanup)


if __name__ == "__main__":
    sys.exit(main())
