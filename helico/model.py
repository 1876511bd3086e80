"""The network and its contract: architecture and weights, what it is fed, how it runs, and how it is stored.

Owns four decisions every script (train.py, evaluate.py, bench.py, gradcam.py) takes from here, so validation,
evaluation and benchmarks cannot drift apart:
- the model's input (model_input): uint8 batch on the device -> Macenko (when a stain normalizer is given) ->
  [training only: augment.augment] -> ImageNet normalization -> memory layout;
- precision and layout (precision): autocast on or off, bf16 on the CPU and Ampere+ GPUs else fp16 with a GradScaler,
  channels_last for model and input together;
- the checkpoint schema (checkpoint / slim / load_checkpoint): a plain dict that torch.load(weights_only=True) reads;
  best.pt is slim (no training state) and carries the stored decision (decision.py);
- the stain reference (fit_stain_reference): the Macenko normalizer of --reference-patch (pooled patches), and
  dab_hue_survey: the slides whose DAB hue lies far from it.

    net = model.build_model("resnet18", "imagenet")
    precision = model.precision(device, amp=None, channels_last=False)    # amp None: on for CUDA, off on CPU
    with precision.autocast():
        logits = net(model.model_input(uint8_batch, normalizer, channels_last=precision.channels_last))
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from helico import augment, helicodata
import macenko_gpu
from common import DataError, files_digest, remembered, size_mtime_or_none

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------- architecture
def build_model(arch: str = "resnet18", weights: str = "none"):
    """Any torchvision classifier by name, its last Linear layer replaced by a one-logit head.

    weights: 'imagenet' (torchvision's download cache), a path to a state dict or checkpoint, or 'none'."""
    # Imported here, the one place that needs it: torchvision's import costs ~3 s of CPU (its ops load torch._dynamo),
    # which the cache build, every --help and every bad-flag exit of train.py and evaluate.py would pay for nothing.
    import torchvision
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise DataError(f"--arch {arch}: not a torchvision classifier (e.g. resnet18, resnet50, convnext_tiny)")
    model = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        w = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            model.load_state_dict(w.get_state_dict(progress=False))
        except Exception as e:  # URLError, socket errors, hash mismatch: all mean 'could not get the file'
            cache = Path(torch.hub.get_dir()) / "checkpoints" / w.url.rsplit("/", 1)[-1]
            fetch = f"import torchvision; torchvision.models.get_model_weights('{arch}').DEFAULT.get_state_dict()"
            raise DataError(f"--weights imagenet: {arch}'s weights are not in torchvision's cache {cache} and could "
                            f"not be downloaded ({type(e).__name__}; compute nodes are often offline): on a login "
                            f"node with the same $TORCH_HOME run python -c \"{fetch}\", or pass --weights none/FILE"
                            ) from None
    _one_logit_head(model)
    if weights not in ("none", "imagenet", None):
        path = Path(weights)
        if not path.is_file():
            raise DataError(f"--weights {weights}: file not found (use imagenet, none or a .pt path)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        own = model.state_dict()
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}  # foreign heads drop out
        if not state:
            raise DataError(f"--weights {weights}: no tensor matches {arch}'s layers")
        model.load_state_dict(state, strict=False)
    return model


def _head_slot(model) -> tuple[nn.Module, str]:
    """(parent module, attribute) of the classifier's last Linear layer: fc, classifier[-1], heads.head."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr  # Sequential children are named "0", "1"


def _one_logit_head(model) -> None:
    parent, attr = _head_slot(model)
    setattr(parent, attr, nn.Linear(getattr(parent, attr).in_features, 1))


def penultimate(net) -> tuple[nn.Module, nn.Module]:
    """(a copy of `net` that outputs its penultimate layer: the one-logit head replaced by nn.Identity, that head):
    head(body(x)) == net(x). The patient model's features (bags.py)."""
    body = copy.deepcopy(net)
    parent, attr = _head_slot(body)
    head = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    return body, head


# ----------------------------------------------------------------------------------------------- precision and layout
@dataclass(frozen=True)
class Precision:
    """How the model runs on one device: autocast (on/off, dtype) and the memory layout of model and input."""
    device_type: str
    amp: bool
    dtype: torch.dtype
    channels_last: bool

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.amp)

    @property
    def grad_scaling(self) -> bool:
        """fp16 gradients underflow without a GradScaler; bf16 has float32's range and needs none."""
        return self.amp and self.dtype == torch.float16

    def place(self, net, device):
        """The model on `device` in this layout (input and weights must share it for the fast kernels)."""
        net = net.to(device)
        return net.to(memory_format=torch.channels_last) if self.channels_last else net


def precision(device, amp: bool | None = None, channels_last: bool = False) -> Precision:
    """The one precision rule: amp None means on for CUDA, off on CPU; bf16 on the CPU (its autocast dtype) and on
    GPUs of compute capability 8.0+ (Ampere on), else fp16 (with a GradScaler when training). The stored threshold
    was chosen on scores computed this way."""
    # Not torch.cuda.is_bf16_supported(): it counts emulated bf16 (slow on V100/T4) and asks the current device,
    # which is not `device` when nobody set it (evaluate.py --device cuda:1).
    bf16 = device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 0)
    amp = device.type == "cuda" if amp is None else amp
    return Precision(device.type, bool(amp), torch.bfloat16 if bf16 else torch.float16, bool(channels_last))


CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for repeatable results; read when its first handle is made


def math_settings(device, deterministic: bool = False) -> None:
    """The process's kernel settings for training (train.py, bench.py), decided here once. Default: on CUDA, cuDNN
    autotunes its kernels (fixed input size) and the network's float32 matmuls and convolutions may use TF32 (the
    stain normalizer turns TF32 off for itself: macenko_gpu.ieee_fp32). That is fast, not repeatable: bitwise
    equal weights (resume, cache, feeds) hold on the CPU only. deterministic: cuDNN deterministic and not
    autotuned, torch.use_deterministic_algorithms (ops without a deterministic kernel warn, naming themselves) and
    cuBLAS's workspace setting, so a GPU run repeats bitwise too. The newer fp32_precision API only: mixing it
    with allow_tf32 raises."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # before the first cuBLAS call
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"


def scoring_precision(ckpt: dict, device, no_amp: bool = False) -> Precision:
    """Inference as training validated (evaluate.py's scores, bags.py's features), since the stored threshold was
    chosen on those scores: the run's autocast (on CUDA only, unless no_amp) and its memory layout."""
    config = ckpt.get("config") or {}
    amp = device.type == "cuda" and config.get("amp", True) and not no_amp
    return precision(device, amp=amp, channels_last=config.get("channels_last", False))


# ----------------------------------------------------------------------------------------------- input
def to_unit(images, normalizer=None):
    """uint8 (B, 3, H, W) on the device -> float32 in [0, 1], Macenko-normalized when a normalizer is given."""
    return normalizer.normalize(images) if normalizer is not None else images.float().div_(255)


_CONSTANTS: dict = {}


def imagenet_normalize(x):
    key = (x.device, x.dtype)
    if key not in _CONSTANTS:  # made once per device: a fresh host->GPU copy every step would stall the stream
        _CONSTANTS[key] = tuple(torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
                                for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _CONSTANTS[key]
    return (x - mean) / std


def model_input(images, normalizer=None, jitter=None, gen=None, channels_last=False, hed=(0.0, 0.0)):
    """uint8 batch on the device -> normalized float input; with a generator (training) also colour jitter, HED
    jitter and symmetry. The one preparation of model input: training, validation, evaluation, Grad-CAM and
    bench.py all call it."""
    x = to_unit(images, normalizer)
    if gen is not None:
        x = augment.augment(x, jitter, gen, hed)
    x = imagenet_normalize(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def fit_stain_reference(root, reference):
    """The Macenko normalizer (on the CPU) fitted to --reference-patch: one PNG, several, or folders of them
    (helicodata.reference_files), their pixels pooled."""
    files = helicodata.reference_files(root, reference)
    if not files:
        raise DataError("--reference-patch: none given (Macenko needs a stain reference tile, or --no-macenko)")
    try:
        return macenko_gpu.MacenkoNormalizer().fit([macenko_gpu.load_rgb(f) for f in files])
    except ValueError as e:
        where = files[0] if len(files) == 1 else f"{len(files)} PNGs ({files[0].parent}, ...)"
        raise DataError(f"--reference-patch {where}: {e}") from None


SURVEY_PATCHES = 8  # per slide: ~0.5 M pixels pooled, enough for a DAB direction where a slide shows rods
# Synthetic slides (python stain_check.py): the true hue reads 1.2 degrees, DAB turned 5 degrees 4.2-6.9 (rods'
# DAB x0.86-x1.10 after normalization), turned 10 degrees 6.1-10.2 (x0.73-x1.20).
DAB_HUE_WARN_DEG = 4.0


def readable(path):
    """The image, or None for an undecodable one: the survey leaves it out, training names it (or stops at it)."""
    try:
        return macenko_gpu.load_rgb(path)
    except (ValueError, OSError):
        return None


def dab_hue_survey(root, samples, normalizer, per_slide: int = SURVEY_PATCHES, memo: Path | None = None) -> dict:
    """How far each slide's DAB hue lies from the reference's (macenko_gpu.MacenkoNormalizer.dab_angles), from up
    to per_slide patches per slide folder spread over its sorted paths (no labels read). The ihc mode keeps the
    reference's DAB vector, so a far slide's DAB amount changes. {"threshold_deg", "patches_per_slide",
    "angles": {slide: degrees or None (too little DAB to measure)}, "far": [slides above the threshold]}.

    `memo` (a JSON file) keeps the last survey, keyed by the patches read (path, size, mtime) and the normalizer's
    state: a new run on unchanged files reads it instead of decoding ~1,200 PNGs (about 1.3 s of decoding alone at
    256 px, more Macenko on the CPU). A missing, unreadable or stale memo is surveyed again and rewritten."""
    by_slide: dict[str, list[str]] = {}
    for s in samples:
        by_slide.setdefault(s.path.rsplit("/", 2)[-2], []).append(s.path)
    picks = {}  # slide -> per_slide paths spread evenly over its sorted paths
    for slide in sorted(by_slide):
        paths = sorted(set(by_slide[slide]))
        step = max(1.0, len(paths) / per_slide)
        picks[slide] = [paths[int(k * step)] for k in range(min(per_slide, len(paths)))]
    key = _survey_key(root, picks, normalizer, per_slide) if memo is not None else None
    return remembered(memo, key, "survey", lambda: _surveyed(root, picks, normalizer, per_slide),
                      lambda survey: isinstance(survey["angles"], dict))


def _surveyed(root, picks: dict, normalizer, per_slide: int) -> dict:
    """dab_hue_survey's survey of `picks` (slide -> paths), decoded here."""
    slides, angles = list(picks), {}
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes with the GIL released
        for lo in range(0, len(slides), 16):  # 16 slides decoded at a time: memory stays ~25 MB at 256 px
            chunk = slides[lo:lo + 16]
            images = [pool.map(readable, [Path(root) / p for p in picks[s]]) for s in chunk]
            readable_ones = [[image for image in decoded if image is not None] for decoded in images]
            angles.update(zip(chunk, normalizer.dab_angles(readable_ones)))
    return {"threshold_deg": DAB_HUE_WARN_DEG, "patches_per_slide": per_slide, "angles": angles,
            "far": [s for s, a in angles.items() if a is not None and a > DAB_HUE_WARN_DEG]}


def _survey_key(root, picks: dict, normalizer, per_slide: int) -> str:
    """What a survey depends on: the patches it reads (an unreadable one as such), the normalizer's exact state,
    the sampling and the threshold."""
    files = files_digest((p, *(size_mtime_or_none(Path(root) / p) or (-1, -1))) for ps in picks.values() for p in ps)
    state = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in normalizer.state_dict().items()}
    what = {"files": files, "stain": state, "per_slide": per_slide, "threshold": DAB_HUE_WARN_DEG}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- checkpoint
CHECKPOINT_VERSION = 1
TRAINING_KEYS = ("progress", "best_score", "optimizer", "scheduler", "scaler", "rng")  # what resumes training
REQUIRED_KEYS = ("model", "arch", "config", "split", "stain", "threshold", "image_size")  # what evaluate.py rebuilds from


def checkpoint(*, model_state, arch, config, split, stain, threshold, threshold_rule, image_size, epoch, val_metrics,
               training: dict) -> dict:
    """The checkpoint schema: plain tensors and Python values only, so torch.load(weights_only=True) reads it.
    `training` holds TRAINING_KEYS (optimizer, scheduler, scaler and RNG states, progress, best score)."""
    if set(training) != set(TRAINING_KEYS):
        raise ValueError(f"training state needs exactly {TRAINING_KEYS}, got {sorted(training)}")
    return {"model": model_state, "arch": arch, "config": config, "split": split, "stain": stain,
            "threshold": threshold, "threshold_rule": threshold_rule, "image_size": image_size, "epoch": epoch,
            "val_metrics": val_metrics, **training, "version": CHECKPOINT_VERSION}


def slim(ckpt: dict, decision: dict | None = None) -> dict:
    """best.pt: what rebuilds and runs the model (weights, config, split, stain, thresholds) and the stored
    decision (decision.py), without the optimizer, scheduler, scaler and RNG states only a resume needs (last.pt
    keeps them): less than half of last.pt's size."""
    out = {k: v for k, v in ckpt.items() if k not in TRAINING_KEYS}
    if decision is not None:
        out["decision"] = decision
    return out


def load_checkpoint(path, training: bool = False, named: str = "--checkpoint") -> dict:
    """A checkpoint() dict, loaded with weights_only=True; one-line errors naming the file otherwise.
    training=True also requires the state that resumes training; `named` is what the user gave that led here, for
    the message (train.py: the run it resumes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{named} {path}: file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, ...
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        why = next((ln for ln in lines if "Unsupported global" in ln), lines[0])  # torch's weights_only verdict
        why = why.split(". ")[0].rstrip(".") or "file ends early"  # its first sentence, whole; the rest is advice
        raise DataError(f"{named} {path}: unreadable checkpoint ({type(e).__name__}: {why}); truncated or not "
                        f"written by train.py") from None
    required = REQUIRED_KEYS + (TRAINING_KEYS if training else ())
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise DataError(f"{named} {path}: not a train.py checkpoint (missing {', '.join(missing)})")
    return ckpt


def from_checkpoint(ckpt: dict, path, arch: str | None, device):
    """(model in eval mode on device, stain normalizer or None) rebuilt from a checkpoint's own settings."""
    if arch and ckpt["arch"] != arch:
        raise DataError(f"--checkpoint {path}: architecture {ckpt['arch']}, not --arch {arch}")
    net = build_model(ckpt["arch"], weights="none")
    try:
        state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
        net.load_state_dict(state)
    except (AttributeError, RuntimeError) as e:  # torch: a header line, then one line per kind of mismatch
        detail = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise DataError(f"--checkpoint {path}: weights do not fit a {ckpt['arch']} "
                        f"({detail[min(1, len(detail) - 1)][:160]})") from None
    net.to(device).eval()
    normalizer = None
    if ckpt["stain"] is not None:
        try:
            normalizer = macenko_gpu.MacenkoNormalizer.from_state_dict(ckpt["stain"]).to(device)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"--checkpoint {path}: unusable stain reference ({type(e).__name__}: {e})") from None
    return net, normalizer
