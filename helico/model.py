"""How the network runs: what it is fed, at which precision and layout, and how a checkpoint becomes a network
again. Building it and the checkpoint schema are common.py's.

Owns the decisions every script (train.py, evaluate.py, the benchmarks, gradcam.py) takes from here, so
validation, evaluation and benchmarks cannot drift apart:
- the model's input (model_input): uint8 batch on the device -> Macenko (when a stain normalizer is given) ->
  [training only: augment.augment] -> ImageNet normalization -> memory layout;
- precision and layout (precision): autocast on or off, bf16 on the CPU and Ampere+ GPUs else fp16 with a GradScaler,
  channels_last for model and input together;
- from a checkpoint (from_checkpoint): the network and its stain normalizer, rebuilt from the checkpoint's settings.
The stain reference it is fed through is staining.py's.

    net = common.build_model("resnet18", "imagenet")
    precision = model.precision(device, amp=None, channels_last=False)    # amp None: on for CUDA, off on CPU
    with precision.autocast():
        logits = net(model.model_input(uint8_batch, normalizer, channels_last=precision.channels_last))
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

import common
from helico import augment
import macenko_gpu
from common import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------- architecture
def penultimate(net) -> tuple[nn.Module, nn.Module]:
    """(a copy of `net` that outputs its penultimate layer: the one-logit head replaced by nn.Identity, that head):
    head(body(x)) == net(x). The patient model's features (bags.py)."""
    body = copy.deepcopy(net)
    parent, attr = common.head_slot(body)
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
    """The process's kernel settings for training (train.py, tools/bench.py), decided here once. Default: on CUDA, cuDNN
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


def scoring_precision(ckpt: dict, device, amp: bool | None = None) -> Precision:
    """Inference as training validated (evaluate.py's scores, bags.py's features), since the stored threshold was
    chosen on those scores: the run's autocast (on CUDA only; amp True or False overrides it) and its memory
    layout."""
    config = ckpt.get("config") or {}
    amp = (device.type == "cuda" and bool(config.get("amp", True))) if amp is None else amp
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
    """uint8 batch on the device -> normalized float input; with a generator (training) also color jitter, HED
    jitter and symmetry. The one preparation of model input: training, validation, evaluation, Grad-CAM and
    tools/bench.py all call it."""
    x = to_unit(images, normalizer)
    if gen is not None:
        x = augment.augment(x, jitter, gen, hed)
    x = imagenet_normalize(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------------------------- checkpoint


def from_checkpoint(ckpt: dict, path, arch: str | None, device):
    """(model in eval mode on device, stain normalizer or None) rebuilt from a checkpoint's own settings."""
    if arch and ckpt["arch"] != arch:
        raise DataError(f"--checkpoint {path}: architecture {ckpt['arch']}, not --arch {arch}")
    net = common.build_model(ckpt["arch"], weights="none")
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
