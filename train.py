"""Train the H. pylori patch classifier: resumable, preemption-safe, one GPU, DDP, or CPU for the demo.

Usage:
    python train.py --data-root HelicoDataSet --run-id 26                        # one GPU (or CPU)
    torchrun --nproc_per_node 4 train.py --data-root HelicoDataSet --run-id 26   # DDP, one process per GPU
    python train.py --data-root demo_data --run-id demo --device cpu --weights none --image-size 64 --epochs 6 --lr 1e-3

Re-running the same --run-id resumes from runs/<run-id>/last.pt, mid-epoch included (what makes SLURM requeue
safe); a run folder whose config.json holds different flags refuses to resume unless --force, and a finished run
says so and trains nothing (exit 0). A run folder holding a model but no last.pt (best.pt, config.json, an eval/
folder: an earlier run whose last.pt was deleted) is refused in one line naming what is there, exit 2, nothing
changed; with --force the earlier model's files are removed and its evaluation folders renamed <name>.stale before
training. One train.py at a time per run folder: rank 0 holds a flock on runs/<run-id>/.train.lock (its pid and
host inside) for the whole run, so a second one on the same --run-id exits 2 naming the folder and that pid; the
lock dies with its process, so a requeued or killed run still resumes.
Flags are spelled out in full: a prefix (--epoch for --epochs, --val for --val-frac) is refused, exit 2.

Run folder runs/<run-id>/: config.json (resolved flags, git commit, versions, device, SLURM job id), split.json,
log.jsonl (one JSON line per epoch), best.pt (highest validation PR-AUC; slim: no optimizer state, and once training
ends the patient rule and threshold chosen on the validation patients' Cropped patches, helico/decision.py), last.pt
(what a resume needs), learning_curves.png, and with
Macenko stain_survey.json (each slide's DAB hue against the reference's; a warning names the far ones).
Checkpoints are plain dicts of tensors and Python values: torch.load(path, weights_only=True) reads them.

Pipeline: DataLoader workers only decode PNGs to uint8; with --cache there is no DataLoader: the packed uint8 patches
sit on the device (or stream from the host when they do not fit, see feeds.py), Macenko already applied by default
(--cache-normalized). On the device, batched: Macenko (unless the cache holds normalized patches) ->
color jitter with independent random factors per sample -> one of the 8 symmetries of the square per sample ->
ImageNet normalization -> model under autocast (bf16 on Ampere+ GPUs, else fp16 with a GradScaler; off on CPU
unless --amp). The operating threshold is the one that maximizes F1 on the validation patients.
This file owns the training loop; the run folder (lock, refusal, resume check, stop signals, requeue) is
run_folder.py's, the sample order is sampling.py's, the optimization step
optimization.py's (tools/bench.py times that same step), log.jsonl's format runlog.py's; what the model sees, its precision
are model.py's, the network and the checkpoint schema common.py's (evaluate.py and tools/bench.py call the same
functions), the metrics metrics.py's.

Exit codes: 0 done (or already complete), 1 the HoldOut is not independent (a HoldOut patient shares an ID or a
byte-identical image with CrossValidation; nothing trained), 2 bad input (one-line `error:`), 3 non-finite loss
(nothing saved, the last good checkpoint stays), 4 stopped by SIGUSR1/SIGTERM/Ctrl-C after writing last.pt (and
`scontrol requeue` under SLURM), 5 no space left or an I/O error while saving (one line naming the folder; the previous
checkpoints stay). A second signal exits at once with 128 + signal number.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common
import macenko_gpu
from helico import (
    analysis, augment, decision, feeds, figures, identity, inference, loaders, metrics, model, optimization,
    packed_cache, run_folder, runlog, sampling, splits, staining, train_flags, unseen
)

DEFAULT_JITTER = ",".join(map(str, augment.DEFAULT_JITTER))  # as --jitter spells it: "0.05,0.05,0.02,0.01"

class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # "(default: None)" says nothing: those helps describe their automatic value
        return action.help if action.default is None else super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    # No prefixes: `--val 0.3` or `--epoch 1` would pass for --val-frac/--epochs. The flags are
    # train_flags' (torch-free), so that audit_leakage.py parses this very command line.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter,
                                parents=[train_flags.train_args_parser()], allow_abbrev=False)
    p.set_defaults(jitter=DEFAULT_JITTER, resident_max_frac=feeds.DEFAULT_MAX_FRAC)  # their modules' own defaults
    return p


# ----------------------------------------------------------------------------------------------- data
def loader(dataset, sampler, args, drop_last=False):
    return loaders.make_loader(dataset, batch_size=args.batch_size, sampler=sampler, workers=args.workers,
                               pin_memory=args.pin_memory, drop_last=drop_last, persistent=args.persistent_workers,
                               prefetch_factor=args.prefetch_factor, seed=args.seed)


# ----------------------------------------------------------------------------------------------- setup
JITTER_HELP = (f"expected 0 or four numbers B,C,S,H like {DEFAULT_JITTER}, with B, C, S in [0, 1) and H in "
               f"[0, 0.5]")

HED_HELP = "expected 0 or two numbers A,B like 0.05,0.005, with A in [0, 1) and B in [0, 0.5]"


def numbers(flag: str, text: str, expected: str) -> list[float]:
    """The comma-separated numbers of --flag, or a one-line error saying what was expected."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise common.DataError(f"--{flag} {text}: {expected}") from None


def resolve_args(args, device, local_world: int) -> None:
    """Fill in automatic defaults and reject bad values with one-line messages naming the flag."""
    if not args.data_root:
        raise common.DataError("--data-root: not given and $HELICO_DATA is not set")
    jitter = numbers("jitter", args.jitter, JITTER_HELP)
    jitter = jitter * 4 if jitter == [0.0] else jitter
    if len(jitter) != 4 or not all(0 <= v < 1 for v in jitter[:3]) or not 0 <= jitter[3] <= 0.5:
        raise common.DataError(f"--jitter {args.jitter}: {JITTER_HELP}")
    args.jitter = jitter
    hed = numbers("hed-jitter", args.hed_jitter, HED_HELP)
    hed = hed * 2 if hed == [0.0] else hed
    if len(hed) != 2 or not 0 <= hed[0] < 1 or not 0 <= hed[1] <= 0.5:
        raise common.DataError(f"--hed-jitter {args.hed_jitter}: {HED_HELP}")
    args.hed_jitter = hed
    for flag, value, low in (("epochs", args.epochs, 1), ("batch-size", args.batch_size, 2), ("image-size",
                             args.image_size, 32), ("prefetch-factor", args.prefetch_factor, 1),
                             ("limit-samples", args.limit_samples, 2), ("workers", args.workers, 0)):
        if value is not None and value < low:
            raise common.DataError(f"--{flag} {value}: must be at least {low}")
    if args.cache_base and not args.cache:  # the folder of this kind under the base; --cache DIR wins
        args.cache_normalized = args.macenko if args.cache_normalized is None else args.cache_normalized
        args.cache = str(packed_cache.cache_folder(args.cache_base, args.image_size, args.cache_normalized,
                                                   args.reference_patch))
    else:
        args.cache_base = None  # what run() reads: the cache is not --cache-base's, so a disk fault stays fatal
    if args.cache_normalized and not (args.cache and args.macenko):
        raise common.DataError("--cache-normalized: needs --cache DIR (or --cache-base) and --macenko (it stores "
                               "Macenko's output)")
    if args.cache_normalized is None:  # Macenko once, at cache build time, unless a plain cache is already there
        args.cache_normalized = bool(args.cache and args.macenko) and not packed_cache.holds_plain(args.cache,
                                                                                                  args.image_size)
    if not 0 <= args.resident_max_frac <= 1:
        raise common.DataError(f"--resident-max-frac {args.resident_max_frac}: expected a share in [0, 1]")
    if not args.lr > 0 or args.weight_decay < 0:
        raise common.DataError(f"--lr {args.lr} / --weight-decay {args.weight_decay}: need lr > 0, weight decay >= 0")
    if args.pos_weight != "auto":
        weight = numbers("pos-weight", args.pos_weight, "expected auto or a positive number")
        if len(weight) != 1 or not weight[0] > 0:
            raise common.DataError(f"--pos-weight {args.pos_weight}: expected auto or a positive number")
    cuda = device.type == "cuda"
    args.device, args.amp = str(device), cuda if args.amp is None else args.amp
    args.pin_memory = cuda if args.pin_memory is None else args.pin_memory
    if args.workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.workers = max(0, cpus // local_world - 1)
    args.data_root = str(Path(args.data_root).absolute())


def environment(device) -> dict:
    import torchvision

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=Path(__file__).parent, capture_output=True, text=True,
                                  timeout=20, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "-uno")),
            "python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
            "torchvision": str(torchvision.__version__), "cuda": torch.version.cuda, "hostname": platform.node(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


class Samples(NamedTuple):
    train: list   # what the patch model trains on (Aug copies included)
    val: list     # the validation patients' annotated windows, each content once
    config: dict  # config.json: the resolved flags and the environment


def samples_and_config(args, data, split, world, device) -> Samples:
    """Training/validation samples of the split and the run's config dict (resolved flags + environment)."""
    train = unseen.encoder_training_samples(data, split["train"], args.easy_negatives, args.limit_samples, args.seed)
    # validation (epoch and threshold) on the annotated windows only: the Cropped patches of NEGATIVA patients are
    # easy negatives that would inflate accuracy and flatten the threshold; evaluate.py's headline is the same set
    val = [s for s in common.select(data.labelled, split["val"]) if s.source == "annotated"]
    # a byte-identical window (a slide under two patient IDs) counts once, exactly as evaluate.py counts it
    identical = identity.identical_files(data, identity.hash_cache_path(args.hash_cache, data.root))
    val = [s for s, keep in zip(val, identity.first_copies([s.path for s in val], identical)) if keep]
    positives = sum(s.label == 1 for s in train)
    if not train or not val or positives == 0:
        raise common.DataError(f"split: {len(train)} training samples ({positives} positive), {len(val)} validation "
                               f"samples; need both, with positives in training (check --val-frac/--folds)")
    pos_weight = args.pos_weight
    if pos_weight == "auto":
        pos_weight = 1.0 if args.sampler == "balanced" else (len(train) - positives) / positives
    config = {**vars(args), "pos_weight": float(pos_weight), "world_size": world, "environment": environment(device)}
    return Samples(train, val, config)


def plan_run(args, data, world, device) -> dict:
    """Rank 0: the split (the checkpoint's when resuming), checked for leaks, and whether to resume; with them what
    rank 0 alone keeps (too big to broadcast): the checkpoint and (train, val, config), each read once."""
    split, groups, shared = splits.resolve_split(data, **splits.split_options(args))
    splits.check_holdout_independent(data, shared)  # the HoldOut must stay an independent test: exit 1 otherwise
    run_dir = Path(args.runs_dir) / args.run_id
    ckpt = last_checkpoint(run_dir, args.run_id) if (run_dir / "last.pt").is_file() else None
    samples = None
    if ckpt:
        split = ckpt["split"]
        samples = samples_and_config(args, data, split, world, device)
        run_folder.check_resume(run_dir, samples.config, args.force)
    problems = splits.split_problems(split, data, groups, args.reference_patch if args.macenko else None)
    if problems:
        raise common.DataError(f"split{' ' + args.split if args.split else ''}: {problems[0]} ({len(problems)} "
                               f"problem(s) in all; audit_leakage.py lists them)")
    return {"split": split, "resume": ckpt is not None, "run_id": args.run_id, "checkpoint": ckpt,
            "complete": ckpt is not None and ckpt["epoch"] >= args.epochs,
            "samples": samples or samples_and_config(args, data, split, world, device)}


def last_checkpoint(run_dir: Path, run_id: str) -> dict:
    """The run folder's last.pt with the state that resumes training."""
    return common.load_checkpoint(run_dir / "last.pt", training=True, named=f"--run-id {run_id}: resuming from")


# ----------------------------------------------------------------------------------------------- training
def batch_feeds(args, train_ds, val_ds, sampler, shard: list[int], device) -> tuple:
    """(training batches, validation batches, one line saying where they come from)."""
    drop_last = sampler.per_rank >= args.batch_size
    if args.cache:  # on the device when it fits, else streamed by a thread: never pickled by DataLoader workers
        return feeds.cache_batches(train_ds, sampler, val_ds, shard, args.batch_size, drop_last, device,
                                   args.resident_max_frac)
    return (loader(train_ds, sampler, args, drop_last=drop_last),
            loader(torch.utils.data.Subset(val_ds, shard), None, args),
            f"PNGs decoded by {args.workers} DataLoader worker(s)")


def stain_normalizer(args, data, train_ds, ckpt, device) -> tuple:
    """(the normalizer the device applies each step or None, the stain reference checkpoints carry). A resumed run
    keeps its checkpoint's stain (an older mode included); --cache-normalized patches already are normalized, but
    checkpoints still carry their reference for evaluate.py."""
    if args.cache_normalized:
        return None, train_ds.stain
    if not args.macenko:
        return None, None
    if ckpt and ckpt["stain"] is not None:
        return macenko_gpu.MacenkoNormalizer.from_state_dict(ckpt["stain"]).to(device), ckpt["stain"]
    normalizer = staining.fit_stain_reference(data.root, args.reference_patch)
    return normalizer.to(device), normalizer.state_dict()


def device_rng(device):
    """The state of `device`'s own generator (CUDA: dropout and stochastic depth draw from it; torch.manual_seed at
    start-up resets it, so a resume must restore it), None on the CPU, whose generator torch.get_rng_state holds."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_device_rng(device, state) -> None:
    """Restore device_rng's state on `device` (checkpoints from before it was saved, or from a CPU run, have none)."""
    if device.type == "cuda" and state is not None:
        torch.cuda.set_rng_state(state, device)


def network(args, precision: model.Precision, device, world: int, resumed: bool) -> tuple:
    """(the plain model: validation and checkpoints, the model the training step calls: DDP and compile)."""
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    raw = precision.place(common.build_model(args.arch, "none" if resumed else args.weights), device)
    net = raw if world == 1 else torch.nn.parallel.DistributedDataParallel(
        raw, device_ids=[device.index] if device.type == "cuda" else None)
    return raw, torch.compile(net) if args.compile else net  # compiled for training steps only


class Trainer:
    """One run: model, optimizer, data and run folder. Every rank computes; rank 0 alone writes files."""

    def __init__(self, args, data, plan, device, rank, world):
        """plan: plan_run's split, checkpoint (None for a new run) and (train, val, config), each read once."""
        self.args, self.device, self.rank, self.world, self.split = args, device, rank, world, plan["split"]
        self.run_dir = Path(args.runs_dir) / args.run_id
        (train, val, self.config), ckpt = plan["samples"], plan["checkpoint"]
        self.counts = (len(train), sum(s.label for s in train), len(val), sum(s.label for s in val))
        self.train_paths, self.val_paths = [s.path for s in train], [s.path for s in val]
        # ============ data: the patches, their stain, the epoch order and the feeds ============
        train_ds, val_ds = (packed_cache.patch_dataset(data.root, part, args.image_size, args.skip_bad_images,
                                                       args.cache, data.file_stats) for part in (train, val))
        self.normalizer, self.stain = stain_normalizer(args, data, train_ds, ckpt, device)
        self.slides = (data.root, data.labelled + data.cropped if rank == 0 and self.stain is not None else [])
        self.survey_memo = identity.beside_hash_cache(identity.hash_cache_path(args.hash_cache, data.root), ".survey.json")
        self.sampler = sampling.EpochSampler([s.label for s in train], args.sampler == "balanced", args.seed, rank,
                                             world)
        shard = list(range(len(val)))[rank::world]  # every window on exactly one rank: no padded duplicates
        self.train_loader, self.val_loader, self.feed = batch_feeds(args, train_ds, val_ds, self.sampler, shard,
                                                                    device)
        self.skipped = run_folder.Skipped(self.run_dir, writes=rank == 0)
        recorded = train_ds.bad if args.cache and args.skip_bad_images else []  # undecodable when the cache was built
        self.recorded_bad = [path for path, bad in zip(self.train_paths, recorded) if bad]
        # ============ model and optimization ============
        self.precision = model.precision(device, args.amp, args.channels_last)
        self.raw, self.model = network(args, self.precision, device, world, resumed=ckpt is not None)
        self.opt, self.sched, self.scaler = optimization.build(self.raw, args.lr, args.weight_decay,
                                                               len(self.train_loader) * args.epochs, self.precision)
        self.pos_weight = torch.tensor(self.config["pos_weight"], device=device)
        self.gen = torch.Generator(device).manual_seed(args.seed * 1000 + 1 + rank)  # augmentation draws
        self.batches = feeds.Prefetched(self.train_loader, self.prepare, self.gen, device)
        # ============ progress: a new run's, or the checkpoint's ============
        self.epoch, self.progress, self.best, self.records = 0, {"step": 0, "loss_sum": 0.0, "seen": 0}, None, []
        self.threshold, self.rule, self.val_metrics = 0.5, "default 0.5: not validated yet", {}
        if ckpt is not None:
            self.restore(ckpt)

    # ------------------------------------------------------------------------------------------- state
    def restore(self, ckpt):
        self.raw.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when saved without fp16 (CPU, bf16, --no-amp)
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.progress, self.best = ckpt["epoch"], ckpt["progress"], ckpt["best_score"]
        self.threshold, self.rule, self.val_metrics = ckpt["threshold"], ckpt["threshold_rule"], ckpt["val_metrics"]
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        if len(rng["augment"]) == self.world and rng["augment"][0].shape == self.gen.get_state().shape:
            self.gen.set_state(rng["augment"][self.rank])  # unless the world size or device type changed
        device_states = rng.get("device") or []  # absent in checkpoints written before it was saved
        set_device_rng(self.device, device_states[self.rank] if len(device_states) == self.world else None)
        # the log's lines of epochs after the checkpoint would be repeated: drop them
        self.records = [r for r in runlog.read(self.run_dir) if r["epoch"] <= self.epoch]

    def save(self, *names):
        """Write a checkpoint that rebuilds the model (evaluate.py) or continues training. Collective under DDP."""
        mine = (self.gen.get_state(), device_rng(self.device))
        states = [mine] * self.world
        if self.world > 1:
            dist.all_gather_object(states, mine)
        if self.rank != 0:
            return
        np_rng, py_rng = np.random.get_state(), random.getstate()
        rng = {"torch": torch.get_rng_state(), "augment": [a for a, _ in states], "device": [d for _, d in states],
               "python": [py_rng[0], list(py_rng[1]), py_rng[2]],
               "numpy": [np_rng[0], torch.from_numpy(np_rng[1].astype(np.int64)), *np_rng[2:]]}
        ckpt = common.checkpoint(
            model_state=self.raw.state_dict(), arch=self.args.arch, config=self.config, split=self.split,
            stain=self.stain, threshold=self.threshold, threshold_rule=self.rule, image_size=self.args.image_size,
            epoch=self.epoch, val_metrics=self.val_metrics,
            training={"progress": dict(self.progress), "best_score": self.best, "optimizer": self.opt.state_dict(),
                      "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng})
        for name in names:  # best.pt is slim: a resume reads last.pt
            common.atomic_torch_save(common.slim(ckpt) if name == "best.pt" else ckpt, self.run_dir / name)

    # ------------------------------------------------------------------------------------------- loops
    def train_epoch(self):
        """Train from progress["step"] to the epoch's end or a stop request; returns (nan_step or None, stopped)."""
        args, dev, p = self.args, self.device, self.progress
        self.sampler.set_epoch(self.epoch, skip=p["step"] * args.batch_size)
        self.model.train()
        bar = tqdm(total=len(self.train_loader) + p["step"], initial=p["step"], unit="step", dynamic_ncols=True,
                   desc=f"epoch {self.epoch + 1}/{args.epochs}", disable=self.rank != 0,
                   mininterval=1 if sys.stderr.isatty() else 60)  # a SLURM log gets a line a minute
        loss_sum, seen, pending, nan_step, stopped = 0.0, 0, None, None, False
        t0, images = time.perf_counter(), 0
        try:  # closed on every path: an error line must not land on a half-drawn bar
            for x, labels in self.batches:  # model input made one batch ahead (self.prepare)
                loss, summed, kept = optimization.train_step(self.model, x, labels, self.precision, self.opt,
                                                             self.sched, self.scaler, self.pos_weight)
                loss_sum, seen = loss_sum + summed, seen + kept
                status = torch.stack([(~torch.isfinite(loss)).float(), loss,
                                     torch.full((), float(run_folder.STOP.is_set()), device=dev)])
                if self.world > 1:
                    dist.all_reduce(status, op=dist.ReduceOp.MAX)  # every rank stops at the same step
                p["step"] += 1
                images += len(labels) * self.world
                bar.update()
                # Read the previous step's status, not this one's: the host never waits for the GPU to drain.
                previous, pending = pending, (p["step"], status)
                if previous is not None:
                    nan_step, stopped = self.read_status(*previous, bar)
                    if nan_step or stopped:
                        break
            if pending is not None and not nan_step:
                nan_step, stop_now = self.read_status(*pending, bar)
                stopped = stopped or stop_now
        finally:
            self.batches.close()  # the augmentation generator as if the batch prepared ahead had not been drawn
            bar.close()
        p["loss_sum"], p["seen"] = p["loss_sum"] + float(loss_sum), p["seen"] + int(seen)
        self.img_s = images / max(time.perf_counter() - t0, 1e-9)
        return nan_step, stopped

    def prepare(self, x, labels, idx):
        """A training batch -> (model input, labels) on the device, one batch ahead of the step (feeds.Prefetched)."""
        # DataLoader batches are on the host still: no device sync. Cache batches may already be on the GPU: their
        # undecodable rows were recorded at build time and named once when the run started
        if labels.device.type == "cpu" and (labels == common.BAD).any():
            self.skipped.note(self.train_paths[k] for k in idx[labels == common.BAD].tolist())
        x = model.model_input(x.to(self.device, non_blocking=True), self.normalizer, self.args.jitter, self.gen,
                              self.precision.channels_last, self.args.hed_jitter)
        return x, labels.to(self.device, non_blocking=True)

    @staticmethod
    def read_status(step, status, bar):
        nonfinite, loss, stop = status.tolist()
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        return (step if nonfinite else None), bool(stop)

    @torch.no_grad()
    def validate(self):
        """(labels, scores, mean loss) of every validation window exactly once, gathered across ranks by index."""
        self.raw.eval()  # unwrapped: no DDP collectives, so ranks may hold different numbers of batches
        if self.world > 1:
            for buffer in self.raw.buffers():  # BatchNorm statistics drift apart per rank: use rank 0's, as saved
                dist.broadcast(buffer, 0)
        idx, labels, scores, loss = [], [], [], torch.zeros((), device=self.device)
        for images, y, i in self.val_loader:  # no host sync per batch: results stay on the device until the end
            x = model.model_input(images.to(self.device, non_blocking=True), self.normalizer,
                                  channels_last=self.precision.channels_last)
            with self.precision.autocast():
                logits = self.raw(x).squeeze(1).float()
            y = y.to(self.device, non_blocking=True)
            keep = y != common.BAD  # undecodable rows (zeros) are scored like any patch, then dropped below
            loss += (F.binary_cross_entropy_with_logits(logits, y.clamp(min=0).float(), pos_weight=self.pos_weight,
                                                        reduction="none") * keep).sum()
            idx.append(i), labels.append(y), scores.append(torch.sigmoid(logits))
        i, y, s = (torch.cat(t).cpu() if t else torch.zeros(0) for t in (idx, labels, scores))  # one copy each
        bad = y == common.BAD
        self.skipped.note(self.val_paths[k] for k in i[bad].long().tolist())
        idx, labels, scores = i[~bad].long().tolist(), y[~bad].long().tolist(), s[~bad].tolist()
        parts = [(idx, labels, scores, float(loss))] * self.world
        if self.world > 1:
            dist.all_gather_object(parts, parts[0])
        by_index = {i: (y, s) for part in parts for i, y, s in zip(*part[:3])}
        y, s = (np.array([by_index[i][k] for i in sorted(by_index)]) for k in (0, 1))
        return y.astype(np.int64), s.astype(np.float64), sum(part[3] for part in parts) / max(len(y), 1)

    def fit(self) -> int:
        """The epoch loop; returns the exit code."""
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            common.atomic_write_text(self.run_dir / "config.json", json.dumps(self.config, indent=1) + "\n")
            common.atomic_write_text(self.run_dir / "split.json", json.dumps(self.split, indent=1) + "\n")
            resumed = f"resuming after epoch {self.epoch} step {self.progress['step']}" if self.epoch or \
                self.progress["step"] else "new run"
            print(f"{self.run_dir}: {resumed}; train {self.counts[0]} samples ({self.counts[1]} positive, pos_weight "
                  f"{self.config['pos_weight']:.2f}), validation {self.counts[2]} windows ({self.counts[3]} positive); "
                  f"{self.world} x {self.device}, amp {self.precision.dtype if self.precision.amp else 'off'}, commit "
                  f"{self.config['environment']['git_commit']}; {self.feed}", file=sys.stderr)
        self.skipped.note(self.recorded_bad)
        if self.slides[1]:  # once per run, rank 0, with a stain reference; no labels read, no HoldOut pixels
            staining.survey_run(self.run_dir / "stain_survey.json", *self.slides, self.stain, self.device,
                                self.survey_memo)
        while self.epoch < self.args.epochs:
            start = time.perf_counter()
            nan_step, stopped = self.train_epoch()
            if nan_step:
                last = self.run_dir / "last.pt"
                if self.rank == 0:
                    print(f"error: loss is NaN/inf at epoch {self.epoch + 1} step {nan_step}; stopped without saving, "
                          f"last good checkpoint: {last if last.is_file() else 'none'} (try a lower --lr or --no-amp)",
                          file=sys.stderr)
                return common.EXIT_NAN
            if stopped:
                self.save("last.pt")
                if self.rank == 0:
                    print(run_folder.stopped_line(self.run_dir, self.epoch + 1, self.progress["step"]),
                          file=sys.stderr)
                return common.EXIT_STOPPED
            self.end_epoch(start)
        best = max(self.records, key=lambda r: r["pr_auc"] if r["pr_auc"] == r["pr_auc"] else -1, default=None)
        if self.rank == 0 and best:
            print(f"done: best validation PR-AUC {best['pr_auc']:.3f} (dummy {best['dummy_pr_auc']:.3f}), ROC-AUC "
                  f"{best['roc_auc']:.3f} at epoch {best['epoch']}: {self.run_dir / 'best.pt'}", file=sys.stderr)
        return common.EXIT_OK

    def end_epoch(self, start: float):
        """Validate, choose the threshold, write best.pt, last.pt, log.jsonl and learning_curves.png."""
        y, s, val_loss = self.validate()
        self.threshold, self.rule = metrics.best_f1_threshold(y, s)
        m = self.val_metrics = metrics.binary_metrics(y, s, self.threshold)
        p, self.progress = self.progress, {"step": 0, "loss_sum": 0.0, "seen": 0}
        self.epoch += 1
        score = m["pr_auc"] if m["pr_auc"] == m["pr_auc"] else -1.0  # NaN (one-class validation) never wins
        is_best = self.best is None or score > self.best
        self.best = score if is_best else self.best
        r = {"epoch": self.epoch, "train_loss": p["loss_sum"] / max(p["seen"], 1), "val_loss": val_loss,
             **{k: m[k] for k in ("pr_auc", "roc_auc", "recall", "precision", "f1", "threshold")},
             "val_samples": m["n"], "val_positives": m["positives"], "dummy_pr_auc": m["positives"] / max(m["n"], 1),
             "lr": self.sched.get_last_lr()[0], "img_s": round(self.img_s, 1),
             "seconds": round(time.perf_counter() - start, 1)}
        self.records.append(r)
        self.save(*(["best.pt"] if is_best else []), "last.pt")
        if self.rank == 0:
            runlog.write(self.run_dir, self.records)
            figures.plot_learning_curves(self.records, self.run_dir / "learning_curves.png")
            print(f"epoch {self.epoch}: train loss {r['train_loss']:.4f}, val loss {val_loss:.4f}, PR-AUC "
                  f"{r['pr_auc']:.3f} (dummy {r['dummy_pr_auc']:.3f}), ROC-AUC {r['roc_auc']:.3f}, recall "
                  f"{r['recall']:.3f}, precision {r['precision']:.3f} at threshold {r['threshold']:.3f}, "
                  f"{r['img_s']:.0f} img/s{', best so far' if is_best else ''}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- main
def run(args, rank: int, world: int, local_rank: int) -> int:
    device = common.resolve_device(args.device, local_rank, world)
    resolve_args(args, device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    data = common.load_data(args.data_root)
    model.math_settings(device, args.deterministic)  # TF32 + autotuned cuDNN, or repeatable kernels
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    args.run_id = args.run_id or os.environ.get("SLURM_JOB_ID") or time.strftime("%Y%m%d-%H%M%S")
    plan, error = None, None
    if rank == 0:
        try:
            run_folder.claim(Path(args.runs_dir) / args.run_id, args.force)  # held until main() returns
            plan = plan_run(args, data, world, device)
        except common.DataError as e:  # IndependenceError included: its type decides the exit code
            error = e
    if world > 1:  # the other ranks take the split and run ID from rank 0, and stop with it on an error
        box = [({k: plan[k] for k in ("split", "resume", "run_id", "complete")} if plan else None, error)]
        dist.broadcast_object_list(box, src=0)
        plan, error = (plan, error) if rank == 0 else box[0]
    if error:
        raise error if rank == 0 else type(error)("")  # said once, by rank 0
    args.run_id = plan["run_id"]
    if plan["complete"]:  # re-running a finished run (`make demo` twice) trains nothing and builds no cache
        if rank == 0:
            run_dir, ckpt = Path(args.runs_dir) / args.run_id, plan["checkpoint"]
            score = ckpt["best_score"]  # -1: validation had one class only
            best = f"; best validation PR-AUC {score:.3f}: {run_dir / 'best.pt'}" if (score or -1) >= 0 else ""
            print(f"{run_dir}: already complete ({ckpt['epoch']} of {args.epochs} epochs), nothing trained{best}",
                  file=sys.stderr)
            store_decision(args, data, device)
        return common.EXIT_OK
    if rank != 0:  # what rank 0 read while planning, read once here
        plan["checkpoint"] = last_checkpoint(Path(args.runs_dir) / args.run_id, args.run_id) if plan["resume"] else None
        plan["samples"] = samples_and_config(args, data, plan["split"], world, device)
    if rank == 0 and not plan["resume"]:  # --force on an earlier model: nothing of it left to mix with this run's
        retired = run_folder.retire_earlier_run(Path(args.runs_dir) / args.run_id)
        if retired:
            print(retired, file=sys.stderr)
    if args.cache:  # after the resume check (a refused run builds nothing), before any DataLoader worker forks
        prepare_cache(args, data, plan, device)
    code = Trainer(args, data, plan, device, rank, world).fit()
    if code == common.EXIT_OK and rank == 0:
        store_decision(args, data, device)
    return code


def store_decision(args, data, device) -> None:
    """Rank 0, once training is done: choose the patient rule and its threshold on the validation patients' Cropped
    patches scored by best.pt (decision.py), and store it in best.pt, so that evaluate.py and predict.py apply one
    choice made before any test or new patient was seen. A run stopped before this step does it on its next start."""
    path = Path(args.runs_dir) / args.run_id / "best.pt"
    if not path.is_file():
        return
    ckpt = common.load_checkpoint(path)
    if ckpt.get("decision"):
        return
    val = sorted(ckpt["split"].get("val") or [])
    rows, _ = analysis.count_identical_once(
        [r for r in analysis.evaluation_rows(data, {"val": val}) if r.patient_eval],
        identity.identical_files(data, identity.hash_cache_path(args.hash_cache, data.root)))
    rows = [r for r in rows if r.patient_eval]
    net, normalizer = model.from_checkpoint(ckpt, path, None, device)
    samples, scores = [r.sample for r in rows], np.full(len(rows), np.nan)

    def keep(idx, logits, dropped):
        if logits is not None:
            scores[idx] = torch.sigmoid(logits.reshape(-1)).numpy()
    # undecodable Cropped patches (never read by training) are left out and named, not a reason to lose the run
    bad = inference.run(net, normalizer, data.root, samples, int(ckpt["image_size"]), device, keep,
                        batch_size=args.batch_size, workers=args.workers, skip_bad=True, cache=args.cache,
                        precision=model.scoring_precision(ckpt, device), desc="patient rule", stats=data.file_stats)
    for i in bad:
        print(f"warning: skipped unreadable {samples[i].path} (the patient rule is chosen without it)",
              file=sys.stderr)
    ok = np.isfinite(scores)
    pred = analysis.Predictions([s for s, k in zip(samples, ok) if k], np.array(["val"] * int(ok.sum())),
                                np.zeros(int(ok.sum()), bool), np.ones(int(ok.sum()), bool), scores[ok])
    patients = analysis.patient_scores(pred, val, data.diagnosis, float(ckpt["threshold"]), 10)
    rule = analysis.choose_patient_rule(patients)
    common.atomic_torch_save(common.slim(ckpt, decision.stored_rule(rule, patients, analysis.TOP_SHARE)), path)
    chosen = f"{rule['rule']} >= {rule['threshold']:.3f}" if rule["rule"] else f"none ({rule['reason']})"
    print(f"patient rule chosen on {len(val)} validation patients: {chosen}; stored in {path}", file=sys.stderr)


def prepare_cache(args, data, plan, device) -> None:
    """Build or reuse the cache. --cache DIR is strict; under --cache-base a disk fault (no space for ~43 GB on a
    node) only costs speed, so training decodes PNGs instead, said in one line, and config.json says so."""
    workers = max(1, args.workers)
    if not args.cache_base:
        packed_cache.prepare(args.cache, data, args.image_size, workers, args.cache_normalized, args.reference_patch,
                             device)
    elif packed_cache.prepare_in(args.cache_base, data, args.image_size, workers, args.cache_normalized,
                                 args.reference_patch, device) is None:
        args.cache, args.cache_normalized = None, False
        plan["samples"].config.update(cache=None, cache_normalized=False)  # config.json: what was trained from


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    rank, world, local_rank = (int(os.environ.get(k, "0")) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    previous = run_folder.catch_stop_signals()  # Ctrl-C too: it checkpoints
    try:
        code = run(args, rank, max(world, 1), local_rank)
        if world > 1:
            dist.barrier()  # torchrun stops every rank when one exits: let rank 0 finish writing first
        return code
    except common.DataError as e:  # raised in a DataLoader worker too: loaders carries it here as itself
        if str(e):
            print(f"error: {e}", file=sys.stderr)
        return common.EXIT_LEAK if isinstance(e, splits.IndependenceError) else common.EXIT_BAD_INPUT
    except common.EnvironmentFault as e:  # only rank 0 writes files
        print(f"error: {e}", file=sys.stderr)
        return common.EXIT_ENVIRONMENT
    except (OSError, ImportError) as e:  # never Python's exit 1, which here means a dependent HoldOut
        return common.unexpected_fault(e)
    finally:
        loaders.stop_workers()  # workers ignore SIGTERM: left to Python's exit they would keep it waiting for ever
        run_folder.release()
        run_folder.restore_signals(previous)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
