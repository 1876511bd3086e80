"""train.py's command line, defined once and without torch: train.py parses it, and audit_leakage.py accepts it whole.

The launcher (run_h_pylori.sh) hands one argument list to the audit and to train.py, so the audit checks exactly the
split train.py trains and a mistyped flag is refused by both (before anything is staged: the launcher asks the audit
first, which loads no torch). The defaults that belong to a torch module (the color jitter, the resident share) are
set by train.py with `set_defaults`, so they are written once, where they are used.

    parser = argparse.ArgumentParser(parents=[train_flags.train_args_parser()], allow_abbrev=False)
    parser = argparse.ArgumentParser(parents=[train_flags.train_args_parser(shown=False)])  # accepted, not listed
"""
from __future__ import annotations

import argparse

import common
from helico import splits


def train_args_parser(shown: bool = True) -> argparse.ArgumentParser:
    """Every train.py flag (the split flags included, from splits.split_args_parser()), for `parents=`. shown=False
    keeps the split flags in --help and hides the others (audit_leakage.py accepts them only to ignore them)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, parents=[splits.split_args_parser()])
    add_argument_group = p.add_argument_group if shown else lambda title: Hidden(p)
    g = add_argument_group("run")
    g.add_argument("--run-id", help="run folder name under --runs-dir; re-use it to resume. Default: $SLURM_JOB_ID "
                   "(a requeued job keeps its ID, so it resumes itself), else the start time YYYYmmdd-HHMMSS")
    g.add_argument("--runs-dir", default="runs", help="where run folders live; put it on shared storage on a cluster")
    g.add_argument("--force", action="store_true", help="resume even though the run folder's config.json holds "
                   "different flags (e.g. more --epochs): the new flags win but the split stays the checkpoint's; or, "
                   "in a folder holding an earlier model and no last.pt, replace it: its best.pt, config.json and log "
                   "are removed and its evaluation folders (eval/, patient/, ...) renamed <name>.stale")
    g.add_argument("--seed", type=int, default=0, help="model init, sample order and augmentation draws")
    common.add_device_flag(g, note="under torchrun each process takes cuda:$LOCAL_RANK")
    g = add_argument_group("model and optimization")
    g.add_argument("--arch", default="resnet18", help="any torchvision classifier; its head becomes one logit")
    g.add_argument("--weights", default="imagenet", help="imagenet (torchvision cache; fetch it once on a login node "
                   "if compute nodes are offline), none (random init: demo only), or a .pt state dict/checkpoint")
    g.add_argument("--epochs", type=int, default=15, help="passes over the training patients")
    g.add_argument("--batch-size", type=int, default=128, help="per process; the global batch is this times the "
                   "number of processes. Halve it (and --lr) if the GPU runs out of memory")
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate (linear warmup over the first "
                   "5%% of steps, cosine decay to 0); scale it with the global batch size")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay")
    g.add_argument("--pos-weight", default="auto", help="weight of the positive class in the loss against the "
                   "~1:40 imbalance: auto = n_neg/n_pos of the training set (1 with --sampler balanced), or a number")
    g.add_argument("--sampler", choices=("shuffle", "balanced"), default="shuffle", help="balanced draws both "
                   "classes equally often (with replacement) instead of weighting the loss")
    common.add_amp_flag(g, "on for CUDA (fp16 with a GradScaler), off on CPU", "Try --no-amp if the loss turns NaN")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="NHWC memory layout: usually faster with --amp on tensor-core GPUs (measure with tools/bench.py)")
    g.add_argument("--deterministic", action="store_true", help="repeatable GPU kernels (cuDNN deterministic, no "
                   "autotuning, torch's deterministic algorithms, CUBLAS_WORKSPACE_CONFIG): a resumed or repeated GPU "
                   "run gives bitwise the same weights, at some speed. The CPU is repeatable without it")
    g.add_argument("--compile", action="store_true", help="torch.compile the model: faster steps once compiled "
                   "(a minute or more first, per process); off until measured to pay off end to end (tools/bench.py "
                   "--compile). Validation and checkpoints use the plain model")
    g = add_argument_group("stain and augmentation (run batched on the device)")
    g.add_argument("--macenko", action=argparse.BooleanOptionalAction, default=True, help="Macenko stain "
                   "normalization to --reference-patch (the original pipeline's); --no-macenko trains on raw colors")
    g.add_argument("--jitter", default=None, help="color jitter B,C,S,H: brightness, contrast, saturation "
                   "factors in [1-x, 1+x] and hue shift in [-h, h] turns, drawn per sample; 0 disables")
    g.add_argument("--hed-jitter", default="0", metavar="A,B", help="HED stain augmentation (Tellez et al. 2018) "
                   "after Macenko: each stain's concentration s (scikit-image's rgb2hed) -> alpha * s + beta, alpha in "
                   "[1-A, 1+A], beta in [-B, B], per sample and stain; HED-light is 0.05,0.05, but beta moves every "
                   "pixel, white ones too, and DAB's amount is the signal: start small (0.05,0.005). 0 disables")
    g.add_argument("--image-size", type=int, default=256, help="patches are resized to this square side; 256 is "
                   "native. 64-128 makes CPU demos fast")
    g.add_argument("--easy-negatives", choices=("half", "all"), default="half", help="which Cropped patches of "
                   "the training NEGATIVA patients the model trains on as easy negatives: half keeps the other half "
                   "(chosen by a hash of each window, not by label) for train_patient.py's bags, so the patient model "
                   "never learns from patches this model has already fitted; all trains on every one of them")
    g.add_argument("--limit-samples", type=int, default=None, help="train on a stratified random subset of this "
                   "many training samples (CPU demo, smoke tests); validation is never subsampled")
    g = add_argument_group("data loading")
    g.add_argument("--workers", type=int, default=None, help="PNG-decoding processes per training process; decoding "
                   "is the usual bottleneck. Default: the CPUs this process may use (per GPU under torchrun) minus 1")
    g.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="page-locked batches for asynchronous host-to-GPU copies. Default: on with CUDA")
    g.add_argument("--persistent-workers", action=argparse.BooleanOptionalAction, default=True,
                   help="keep workers alive between epochs instead of re-forking them")
    g.add_argument("--prefetch-factor", type=int, default=4, help="batches each worker decodes ahead")
    g.add_argument("--cache", metavar="DIR", help="packed uint8 cache of decoded patches (built on first use, reused "
                   "after; see patch_cache.py): later epochs and evaluations never decode a PNG. Put it on node-local "
                   "disk")
    g.add_argument("--cache-base", metavar="DIR", help="like --cache, in the folder under DIR that "
                   "packed_cache.cache_folder names from --image-size, the cache kind and --reference-patch (so runs "
                   "of another size or stain never share one); if the disk fails there (no space), a warning and "
                   "training decodes PNGs. --cache DIR wins. The launcher passes it beside the node-local copy")
    g.add_argument("--cache-normalized", action=argparse.BooleanOptionalAction, default=None, help="store patches "
                   "already Macenko-normalized, so Macenko runs once, not every epoch (needs --cache and --macenko; "
                   "the stain still goes in checkpoints; same pixels, so bitwise the same weights). Default: on with "
                   "--cache and --macenko, unless the --cache folder already holds a finished plain cache of this "
                   "size (then Macenko runs on the device each step, as with --no-cache-normalized)")
    g.add_argument("--resident-max-frac", type=float, default=None, metavar="F", help="with "
                   "--cache: hold the training patches and this rank's validation patches on the device (one uint8 "
                   "tensor, batches gathered there: no DataLoader) when they take at most F of its free memory (CPU: "
                   "available RAM); otherwise a reading thread streams them from the host cache. 0: always stream")
    g.add_argument("--skip-bad-images", action="store_true", help="leave undecodable PNGs out of the loss and the "
                   "metrics (they are named on stderr) instead of stopping at the first")
    return p


class Hidden:
    """An argument group whose flags are parsed but left out of --help."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser

    def add_argument(self, *names, **kwargs):
        return self.parser.add_argument(*names, **{**kwargs, "help": argparse.SUPPRESS})
