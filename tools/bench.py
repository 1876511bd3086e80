"""Throughput of every training stage, alone and together, on the same patches: which one bounds the loop?

Usage:
    python tools/bench.py --data-root demo_data --device cpu                     # small sizes, well under a minute
    python tools/bench.py --data-root $HELICO_DATA --device cuda --cache /local/cache224 --json bench.json
    python tools/bench.py --data-root $HELICO_DATA --device cuda --no-channels-last --no-amp   # compare settings

Stages (img/s; warm-up batches excluded; CUDA timings bracketed by torch.cuda.synchronize):
    load_png    DataLoader over common.PatchDataset (PNG decode + resize) with --workers processes
    load_cache  DataLoader over packed_cache.CachedPatchDataset (one memmap gather per batch), same workers
    stream      feeds.StreamedBatches: a reading thread gathers batches from the memmap into pinned buffers,
                copied to the device (train.py's fallback when the patches do not fit on the device)
    normalize   on the device: Macenko + per-sample color jitter + symmetry + ImageNet normalization
                (model.model_input, exactly what train.py runs)
    model_step  train.py's own step (optimization.train_step: forward, backward, AdamW, schedule) on synthetic
                on-device batches: the ceiling
    loop        train.py's loop with --cache: feeds.cache_batches (patches held on the device when they fit in
                --resident-max-frac of its free memory, else streamed) -> normalize, one batch
                ahead on a CUDA stream of its own (feeds.Prefetched) -> step
    loop_loader a DataLoader over the cache (--loop-source png: PNGs) -> device -> normalize -> step: the loop
                without train.py's feeds, for comparison
    train       train.py itself (in this process) on --limit-samples training patches with --cache for
                --train-epochs epochs: its last epoch's logged img/s (training only, validation excluded) is the
                steady state; the first epoch's includes warm-up (and compilation with --compile). Needs a cache
                of every patch: --cache DIR (a training run's), else a temporary one is built first (slow on the
                full dataset: give --cache)
It also measures each loader in this process alone (one core) for the packed-vs-PNG ratio per core, img/s per
worker, peak host RSS (this process and the largest worker), peak device memory per stage, and the cache's size.
The PNGs are read once while the cache is built, so both loaders run from a warm page cache.
Without --cache a temporary cache of the benchmark's samples is built and deleted afterwards.

Exit codes: 0 ok, 2 bad input (missing data root, no CUDA for --device cuda, unusable stain reference).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]  # the workflow's commands and modules, one folder up
sys.path.insert(0, str(REPO))

import common
import train
from helico import augment, feeds, loaders, model, optimization, packed_cache, runlog, staining

PREFETCH = 2  # batches each worker decodes ahead; a loader stage warms up through this backlog too
STAGES = ("load_png", "load_cache", "stream", "normalize", "model_step", "loop", "loop_loader", "train")
JITTER = list(augment.DEFAULT_JITTER)  # train.py's default --jitter
DEFAULTS = {  # CPU: small enough for a minute on a laptop; CUDA: the settings of a real GPU run
    "cpu": {"image_size": 64, "batch_size": 16, "batches": 3, "warmup": 1, "limit_samples": 256, "threads": 1,
            "train_epochs": 2},
    "cuda": {"image_size": 224, "batch_size": 256, "batches": 30, "warmup": 5, "limit_samples": 8192,
             "threads": None, "train_epochs": 3},
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter, allow_abbrev=False)
    p.add_argument("--data-root", default=os.environ.get("HELICO_DATA"), help="HelicoDataSet folder (default "
                   "$HELICO_DATA); benchmark the copy training reads (node-local on a cluster)")
    common.add_device_flag(p)
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    p.add_argument("--batch-size", type=int, help="default 16 on CPU, 256 on CUDA (a real GPU run's)")
    p.add_argument("--image-size", type=int, help="default 64 on CPU, 224 on CUDA; the cache must match it")
    p.add_argument("--workers", type=int, help="DataLoader processes (default: CPUs this process may use, "
                   "minus one on CUDA, where the main process feeds the GPU)")
    p.add_argument("--batches", type=int, help="timed batches per stage (default 3 CPU, 30 CUDA); each stage "
                   "also runs at least --min-seconds")
    p.add_argument("--warmup", type=int, help="untimed batches first (worker start, cuDNN autotune); default 1 CPU, 5 CUDA")
    p.add_argument("--min-seconds", type=float, default=1.0, help="keep timing a stage at least this long, so "
                   "fast stages are not measured on a handful of milliseconds")
    p.add_argument("--limit-samples", type=int, help="patches used by every stage, a fixed random subset (default "
                   "256 CPU, 8192 CUDA; 0 = all). A temporary cache holds only these")
    p.add_argument("--cache", metavar="DIR", help="packed cache (patch_cache.py) to benchmark: a training run's "
                   "(plain or normalized) is reused as it is, an empty folder is built for all patches; a cache of "
                   "another --image-size or stale PNGs is refused (exit 2), never rebuilt. Default: a temporary "
                   "cache of the benchmark's patches")
    p.add_argument("--threads", type=int, help="torch CPU threads (torch.set_num_threads). Default 1 on CPU (a quick, "
                   "stable smoke run: on a busy machine OpenMP threads wait on each other), torch's own with CUDA")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset to time, e.g. "
                   "load_png,load_cache for loading alone at real sizes on a CPU-only machine")
    p.add_argument("--loop-source", choices=("cache", "png"), default="cache", help="loader of the loop_loader stage")
    p.add_argument("--resident-max-frac", type=float, default=feeds.DEFAULT_MAX_FRAC, help="as train.py's: the "
                   "loop stage holds the patches on the device when they take at most this share of its free memory "
                   "(else it streams them); 0 times the streamed fallback")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (model_step, loop, loop_loader and "
                   "train.py --compile in the train stage); warm-up batches absorb the compilation")
    p.add_argument("--train-epochs", type=int, help="epochs of the train stage (default 2 CPU, 3 CUDA); the last "
                   "one is the steady state")
    p.add_argument("--arch", default="resnet18", help="torchvision classifier (one-logit head, random weights)")
    common.add_amp_flag(p, "on for CUDA (fp16 with a GradScaler, as train.py), off on CPU", "Compare settings with "
                        "--no-amp")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC layout for model and input; default on for CUDA, off on CPU")
    p.add_argument("--macenko", action=argparse.BooleanOptionalAction, default=True,
                   help="include Macenko in the normalize and loop stages (skipped anyway for a normalized cache)")
    staining.add_reference_argument(p, "the one train.py uses")
    return p


def resolve(args) -> None:
    """Fill the device-dependent defaults in place."""
    args.device = common.resolve_device(args.device).type
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)  # threads stays None with CUDA: torch's own default
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.workers is None:
        args.workers = max(1, cpus - (args.device == "cuda"))
    cuda = args.device == "cuda"
    args.amp = cuda if args.amp is None else args.amp
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    if args.threads is not None:
        if args.threads < 1:
            raise common.DataError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    args.stages = [k.strip() for k in args.stages.split(",") if k.strip()]
    unknown = [k for k in args.stages if k not in STAGES]
    if unknown or not args.stages:
        raise common.DataError(f"--stages {','.join(args.stages)}: choose from {','.join(STAGES)}")
    args.stages = [k for k in STAGES if k in args.stages]
    if not 0 <= args.resident_max_frac <= 1:
        raise common.DataError(f"--resident-max-frac {args.resident_max_frac}: expected a share in [0, 1]")
    for flag in ("batch_size", "image_size", "batches", "train_epochs"):
        if getattr(args, flag) < 1:
            raise common.DataError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")


# ----------------------------------------------------------------------------------------------- timing
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(steps, device, warmup: int, batches: int, min_seconds: float) -> dict:
    """Run `steps` (an iterator yielding images per step): `warmup` untimed, then at least `batches` and
    `min_seconds`. Returns img/s, images, seconds and the stage's peak device memory."""
    for _ in range(warmup):
        next(steps)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, images, count = time.perf_counter(), 0, 0
    while count < batches or time.perf_counter() - t0 < min_seconds:
        images += next(steps)
        count += 1
    sync(device)
    seconds = time.perf_counter() - t0
    steps.close()  # ends the stage's generator: its DataLoader and worker processes go with it
    out = {"img_s": images / seconds, "images": images, "batches": count, "seconds": round(seconds, 3)}
    if device.type == "cuda":
        out["peak_device_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def cycle(loader):
    """Batches forever, epoch after epoch (persistent workers make a new epoch cheap)."""
    while True:
        yield from loader


def make_loader(dataset, args, workers: int):
    return loaders.make_loader(dataset, batch_size=args.batch_size, shuffle=True, workers=workers, drop_last=True,
                               pin_memory=args.device == "cuda", persistent=True, prefetch_factor=PREFETCH, seed=0)


def load_steps(loader):
    for images, labels, _ in cycle(loader):
        yield len(labels)


def per_core_rate(dataset, args, min_seconds: float) -> float:
    """img/s of one loader in this process alone (workers=0: exactly one core decodes or gathers)."""
    loader = make_loader(dataset, args, 0)
    return timed(load_steps(loader), torch.device("cpu"), 1, 2, min_seconds)["img_s"]


# ----------------------------------------------------------------------------------------------- stages
class Step:
    """train.py's optimization step itself (optimization.train_step), on a model, optimizer and schedule built as
    train.py builds them (optimization.build, with train.py's default lr and weight decay; pos_weight 1)."""
    LR, WEIGHT_DECAY, TOTAL_STEPS = 3e-4, 0.01, 1_000_000  # a schedule no benchmark reaches the end of

    def __init__(self, arch: str, precision: model.Precision, device, compile: bool = False):
        self.precision = precision
        net = precision.place(common.build_model(arch, "none"), device)
        self.opt, self.sched, self.scaler = optimization.build(net, self.LR, self.WEIGHT_DECAY, self.TOTAL_STEPS,
                                                                precision)
        self.model = torch.compile(net) if compile else net  # as train.py --compile: the step, not the optimizer

    def __call__(self, x, labels):
        optimization.train_step(self.model, x, labels, self.precision, self.opt, self.sched, self.scaler)


def model_steps(step, args, device):
    """Synthetic, already-normalized input on the device: nothing but the model's own work."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device, generator=g)
    x = x.contiguous(memory_format=torch.channels_last) if args.channels_last else x
    labels = (torch.rand(args.batch_size, device=device, generator=g) < 0.5).long()
    while True:
        step(x, labels)
        yield args.batch_size


def normalize_steps(batches, normalizer, args, device):
    """Real uint8 batches already on the device, through the augmentation alone."""
    gen = torch.Generator(device).manual_seed(0)
    k = 0
    while True:
        images = batches[k % len(batches)]
        with torch.no_grad():
            model.model_input(images, normalizer, JITTER, gen, args.channels_last)
        k += 1
        yield images.shape[0]


def loop_steps(loader, normalizer, step, args, device):
    """Batches from a DataLoader (on the host) or resident.*Batches (already on the device) through the step."""
    gen = torch.Generator(device).manual_seed(1)

    def prepare(images, labels, _):  # as train.py's Trainer.prepare: the input made one batch ahead of the step
        x = model.model_input(images.to(device, non_blocking=True), normalizer, JITTER, gen, args.channels_last)
        return x, labels.to(device, non_blocking=True)

    for x, labels in cycle(feeds.Prefetched(loader, prepare, gen, device)):
        step(x, labels)
        yield len(labels)


def cache_feed(cached, args, device, max_frac: float):
    """train.py's --cache path over the benchmark's patches: (batches, one line saying resident or streamed, s to
    load). A shuffling sampler stands in for train.py's epoch sampler (the same cost: one order per epoch)."""
    sampler = torch.utils.data.RandomSampler(range(len(cached)), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    batches, _, how = feeds.cache_batches(cached, sampler, cached, [], args.batch_size, True, device, max_frac)
    sync(device)
    return batches, how, time.perf_counter() - t0


def stream_steps(batches):
    for images, labels, _ in cycle(batches):
        yield len(labels)


def train_stage(args, data, cache_dir, tmp: str) -> dict:
    """train.py's own logged img/s per epoch on the bench's settings (an in-process train.main run)."""
    runs = Path(tmp) / "runs"
    argv = ["--data-root", str(data.root), "--runs-dir", str(runs), "--run-id", "bench", "--device", args.device,
            "--epochs", str(args.train_epochs), "--batch-size", str(args.batch_size), "--image-size",
            str(args.image_size), "--weights", "none", "--arch", args.arch, "--cache", str(cache_dir),
            "--resident-max-frac", str(args.resident_max_frac), "--workers", str(args.workers), "--seed", "0",
            "--amp" if args.amp else "--no-amp", "--channels-last" if args.channels_last else "--no-channels-last",
            *(["--limit-samples", str(args.limit_samples)] if args.limit_samples else []),
            *(["--compile"] if args.compile else [])]
    normalized = bool((packed_cache.read_meta(cache_dir) or {}).get("normalized"))
    if args.macenko:
        argv += ["--reference-patch", *args.reference_patch, "--cache-normalized" if normalized else
                 "--no-cache-normalized"]
    else:
        argv += ["--no-macenko"]
    code = train.main(argv)
    if code != common.EXIT_OK:
        raise common.DataError(f"--stages train: train.py {' '.join(argv)} exited {code} (its error is above)")
    records = runlog.read(runs / "bench")
    return {"img_s": records[-1]["img_s"], "per_epoch_img_s": [r["img_s"] for r in records],
            "epoch_seconds": [r["seconds"] for r in records], "argv": argv}


def bench_samples(data, limit: int) -> list:
    """One sample per path, a fixed random subset: every stage sees the same patches."""
    samples = packed_cache.unique_samples(data.all_samples())
    random.Random(0).shuffle(samples)
    return samples[:limit] if limit else samples


def open_cache(args, data, samples, tmp: str) -> tuple:
    """(CachedPatchDataset over `samples`, cache dir, build report or None)."""
    if args.cache:  # a training run's cache, as it is: a plain or normalized one is timed, never rebuilt
        meta = packed_cache.read_meta(Path(args.cache)) or {}
        normalized = bool(meta.get("normalized")) and meta.get("version") == packed_cache.VERSION
        reference = meta["stain"]["reference"] if normalized else None
        report = packed_cache.build_cache(data, args.cache, args.image_size, args.workers, normalized, reference,
                                         args.device, progress=False, rebuild=False)
        cache_dir = Path(args.cache)
    else:
        cache_dir = Path(tmp) / "cache"
        report = packed_cache.build_cache(data, cache_dir, args.image_size, args.workers, progress=False,
                                         samples=samples)
    return packed_cache.CachedPatchDataset(cache_dir, samples, args.image_size, root=data.root), cache_dir, report


def train_cache(args, data, tmp: str) -> Path:
    """The cache the train stage hands train.py: --cache as it is, else a temporary one of every patch (train.py
    would otherwise rebuild the benchmark's subset cache for all patches)."""
    if args.cache:
        return Path(args.cache)
    where = Path(tmp) / "train-cache"
    log(f"train stage: building a temporary cache of all {len(data.all_samples())} patches (give --cache to reuse one)")
    packed_cache.build_cache(data, where, args.image_size, args.workers, args.macenko, args.reference_patch,
                            args.device, progress=False)
    return where


def run(args) -> dict:
    device = torch.device(args.device)
    model.math_settings(device)  # as train.py: autotuned cuDNN and TF32 on CUDA
    data = common.load_data(args.data_root)
    samples = bench_samples(data, args.limit_samples)
    if len(samples) < args.batch_size:
        raise common.DataError(f"--batch-size {args.batch_size}: only {len(samples)} patches; lower it")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        log(f"cache: {args.cache or 'temporary'} ({len(samples)} patches)")
        cached, cache_dir, build = open_cache(args, data, samples, tmp)
        normalizer = None
        if args.macenko and not cached.normalized and {"normalize", "loop", "loop_loader"} & set(args.stages):
            normalizer = staining.fit_stain_reference(data.root, args.reference_patch).to(device)
        png = common.PatchDataset(data.root, samples, args.image_size)
        t = lambda steps, extra=0: timed(steps, device, args.warmup + extra, args.batches, args.min_seconds)
        backlog = args.workers * PREFETCH  # batches ready before timing starts would inflate a loader's rate
        precision = model.precision(device, args.amp, args.channels_last)
        step = Step(args.arch, precision, device, args.compile) \
            if {"model_step", "loop", "loop_loader"} & set(args.stages) else None
        feeds = {}

        def feed(max_frac):  # held (or streaming) only while its stage runs, then freed for the next
            batches, feeds[max_frac], seconds = cache_feed(cached, args, device, max_frac)
            log(f"{feeds[max_frac]} (ready in {seconds:.1f} s)")
            return batches
        real = lambda: [images.to(device) for images, _, _ in (next(iter(make_loader(cached, args, 0))) for _ in range(2))]
        stage = {  # each stage's loader (and its worker processes) lives only as long as its generator
            "load_png": lambda: t(load_steps(make_loader(png, args, args.workers)), backlog),
            "load_cache": lambda: t(load_steps(make_loader(cached, args, args.workers)), backlog),
            "normalize": lambda: t(normalize_steps(real(), normalizer, args, device)),
            "model_step": lambda: t(model_steps(step, args, device)),
            "stream": lambda: t(stream_steps(feed(0.0))),
            "loop": lambda: t(loop_steps(feed(args.resident_max_frac), normalizer, step, args, device)),
            "loop_loader": lambda: t(loop_steps(make_loader(cached if args.loop_source == "cache" else png, args,
                                                            args.workers), normalizer, step, args, device)),
            "train": lambda: train_stage(args, data, train_cache(args, data, tmp), tmp)}
        stages, per_core = {}, {}
        for name in args.stages:
            log(f"timing {name}")
            stages[name] = stage[name]()
            if name.startswith("load_"):  # the same loader in this process alone: one core's rate
                per_core[name] = per_core_rate(png if name == "load_png" else cached, args, args.min_seconds)
        cache_size = packed_cache.cache_bytes(cache_dir)
    return summarize(args, device, stages, per_core, len(samples), cached, cache_size, build, normalizer is not None,
                     feeds.get(args.resident_max_frac))


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def ratio(a, b):
    return a / b if a is not None and b else None


REAL_TRAINING_PATCHES = 54_000  # the real dataset's training part: the epoch-time projection


def summarize(args, device, stages, per_core, n, cached, cache_size, build, macenko, feed) -> dict:
    rates = {k: v["img_s"] for k, v in stages.items()}
    streamed = feed is not None and "streamed" in feed  # the loop's parts: on-device gather is ~free, streaming not
    parts = [k for k in ("stream" if streamed else None, "normalize", "model_step") if k in rates]
    ceiling = rates.get("model_step")
    ru = resource.getrusage
    memory = {"peak_host_rss_mb": round(ru(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "peak_worker_rss_mb": round(ru(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        memory["peak_device_mb"] = max(v.get("peak_device_mb", 0) for v in stages.values())
    return {
        "stages": rates, "bound": min(parts, key=rates.get) if parts else None,
        "loop_fraction_of_ceiling": ratio(rates.get("loop"), ceiling),
        "loop_loader_fraction_of_ceiling": ratio(rates.get("loop_loader"), ceiling),
        "train_fraction_of_ceiling": ratio(rates.get("train"), ceiling),
        "loop_vs_loop_loader": ratio(rates.get("loop"), rates.get("loop_loader")),
        "projected_epoch_s": {k: REAL_TRAINING_PATCHES / rates[k] for k in ("loop", "train") if rates.get(k)},
        "feed": feed, "compile": args.compile, "resident_max_frac": args.resident_max_frac,
        "ratios_to_ceiling": {k: ratio(v, ceiling) for k, v in rates.items()},
        "per_core": {**per_core, "packed_vs_png": ratio(per_core.get("load_cache"), per_core.get("load_png"))},
        "per_worker": {k: rates[k] / args.workers for k in ("load_png", "load_cache") if k in rates},
        "packed_vs_png_per_worker": ratio(rates.get("load_cache"), rates.get("load_png")),
        "details": stages, "memory": memory,
        "cache": {"bytes_on_disk": cache_size, "patches": cached.count, "normalized": cached.normalized,
                  "temporary": not args.cache, "build": build},
        "workers": args.workers, "batch_size": args.batch_size, "image_size": args.image_size, "device": str(device),
        "device_name": device_name(device), "cpus": len(os.sched_getaffinity(0)), "samples": n, "arch": args.arch,
        "amp": args.amp, "channels_last": args.channels_last, "macenko": macenko,
        "loop_source": args.loop_source, "warmup": args.warmup, "min_batches": args.batches,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "data_root": str(args.data_root),
        "load_average": os.getloadavg(),
    }


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(r: dict) -> str:
    ceiling = r["stages"].get("model_step")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    notes = {"load_png": f"{fmt(r['per_worker'].get('load_png'), '.0f')} img/s per worker",
             "load_cache": f"{fmt(r['per_worker'].get('load_cache'), '.0f')} img/s per worker",
             "normalize": ("Macenko + " if r["macenko"] else "") + "jitter + symmetry (model.model_input)",
             "stream": "reading thread -> pinned buffers -> device (the fallback)",
             "model_step": "ceiling" + (" (torch.compile)" if r["compile"] else ""),
             "loop": "train.py's --cache path: " + (r["feed"] or "-").split(":")[0],
             "loop_loader": f"DataLoader over the {r['loop_source']} -> device (no train.py feed)",
             "train": "train.py's last epoch (steady state, validation excluded)"}
    lines = [f"bench: {r['device']} ({r['device_name']}), {r['arch']}, {r['image_size']}px, batch {r['batch_size']}, "
             f"{r['workers']} workers, {r['samples']} patches, amp {'on' if r['amp'] else 'off'}, channels_last "
             f"{'on' if r['channels_last'] else 'off'}, torch {r['torch']}",
             f"{'stage':<11} {'img/s':>10} {'x ceiling':>10}  note"]
    if r["feed"]:
        lines.insert(1, f"loop feed: {r['feed']}")
    for k in (k for k in STAGES if k in r["stages"]):
        lines.append(f"{k:<11} {r['stages'][k]:>10.1f} {fmt(ratio(r['stages'][k], ceiling), '.2f'):>10}  {notes[k]}")
    pc, loop = r["per_core"], r["loop_fraction_of_ceiling"]
    train, vs, epoch = r["train_fraction_of_ceiling"], r["loop_vs_loop_loader"], r["projected_epoch_s"]
    lines += [f"bound: {r['bound']}" + (f"; loop at {100 * loop:.0f}% of the model-only ceiling (target >= 90%)"
                                        if loop else "")
              + (f"; train.py at {100 * train:.0f}% (target >= 85%)" if train else ""),
              f"loop / loop_loader: {fmt(vs, '.2f')}x; projected epoch of {REAL_TRAINING_PATCHES:,} patches: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in epoch.items()),
              f"per core (one process, workers=0): PNG {fmt(pc.get('load_png'), '.0f')} img/s, packed "
              f"{fmt(pc.get('load_cache'), '.0f')} img/s -> packed/PNG {fmt(pc['packed_vs_png'], '.1f')}x (target >= "
              f"10x); with {r['workers']} workers {fmt(r['packed_vs_png_per_worker'], '.1f')}x",
              f"memory: peak host RSS {r['memory']['peak_host_rss_mb']:.0f} MB (largest worker "
              f"{r['memory']['peak_worker_rss_mb']:.0f} MB)" + (f", peak device {r['memory']['peak_device_mb']:.0f} MB"
                                                               if "peak_device_mb" in r["memory"] else ""),
              f"cache: {r['cache']['bytes_on_disk'] / 1e6:.1f} MB on disk for {r['cache']['patches']} patches"
              + (" (temporary)" if r["cache"]["temporary"] else "")]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if not args.data_root:
            raise common.DataError("--data-root is required (or set HELICO_DATA)")
        resolve(args)
        result = run(args)
    except common.DataError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, from a DataLoader worker too (loaders carries it)
        return common.EXIT_BAD_INPUT
    except common.EnvironmentFault as e:
        print(f"error: {e}", file=sys.stderr)
        return common.EXIT_ENVIRONMENT
    except (OSError, ImportError) as e:
        return common.unexpected_fault(e)
    finally:
        loaders.stop_workers()
        torch.set_num_threads(threads)  # --threads must not outlive main() when called in-process
    print(table(result))
    if args.json:
        common.atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return common.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
