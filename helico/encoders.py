"""Pathology foundation encoders from a local weights file, for the patient model's bags: their published
architectures (timm), input sizes, normalizations and outputs, in one table; nothing is downloaded.

    enc = encoders.build("uni", "/models/uni/pytorch_model.bin")   # -> nn.Module: model_input batch -> features
    enc = encoders.build("timm:vit_small_patch16_224", "vits.safetensors")

Each encoder takes the batch model.model_input made (the checkpoint's stain normalization, then ImageNet's
normalization, at the checkpoint's image size), turns it back to [0, 1] RGB, resizes it to the encoder's input size
and normalizes it with the encoder's own mean and std. timm is optional: without it, one line naming
`pip install timm`. Weights that do not fit: one line naming the file and the first missing or unexpected key.

Where users get the weights (Hugging Face; most are gated: accept the terms there, then download the file once on a
machine with network access) and their licences as published (each model page has the current terms):
    uni          MahmoodLab/UNI      pytorch_model.bin   CC-BY-NC-ND 4.0
    uni2-h       MahmoodLab/UNI2-h   pytorch_model.bin   CC-BY-NC-ND 4.0
    virchow2     paige-ai/Virchow2   pytorch_model.bin   CC-BY-NC-ND 4.0
    h-optimus-0  bioptimus/H-optimus-0  pytorch_model.bin   Apache 2.0
    phikon       owkin/phikon        pytorch_model.bin (transformers' ViTModel keys)   Owkin non-commercial
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import DataError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Spec:
    arch: str                 # timm constructor
    kwargs: dict              # from the model card; mlp_layer/act_layer named, resolved when timm is imported
    mean: tuple
    std: tuple
    output: str = "cls"       # cls | cls+mean (CLS beside the mean of the patch tokens, register tokens excluded)
    keys: str = "timm"        # timm | hf-vit (transformers' ViTModel names, converted)
    input_size: int = 224
    ignored: tuple = field(default=())  # checkpoint keys the model card's loader leaves unused


SPECS = {
    "uni": Spec("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                                          "dynamic_img_size": True}, *IMAGENET),
    "uni2-h": Spec("vit_giant_patch14_224", {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                                             "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                                             "num_classes": 0, "no_embed_class": True, "mlp_layer": "SwiGLUPacked",
                                             "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True},
                   *IMAGENET),
    "virchow2": Spec("vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "num_classes": 0,
                                              "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
                                              "dynamic_img_size": True, "mlp_layer": "SwiGLUPacked",
                                              "act_layer": "SiLU"}, *IMAGENET, output="cls+mean"),
    "h-optimus-0": Spec("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5, "num_classes": 0,
                                                          "global_pool": "token", "dynamic_img_size": False},
                        (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),
    "phikon": Spec("vit_base_patch16_224", {"img_size": 224, "num_classes": 0, "norm_layer": "LayerNorm1e-12"},
                   *IMAGENET, keys="hf-vit", ignored=("pooler.dense.weight", "pooler.dense.bias",
                                                      "embeddings.mask_token")),
}
NAMES = tuple(SPECS)


def is_encoder(source: str) -> bool:
    return source in SPECS or source.startswith("timm:")


def need_timm(source: str):
    try:
        import timm
    except ImportError:
        raise DataError(f"--features {source} needs timm, an optional dependency: pip install timm") from None
    return timm


def resolve(kwargs: dict) -> dict:
    """The model card's kwargs with the named layers made classes."""
    import timm.layers
    named = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": nn.SiLU,
             "LayerNorm1e-12": functools.partial(nn.LayerNorm, eps=1e-12)}  # transformers' ViT default
    return {k: named.get(v, v) if isinstance(v, str) and k in ("mlp_layer", "act_layer", "norm_layer") else v
            for k, v in kwargs.items()}


def spec_of(source: str, timm) -> Spec:
    """The table's row, or for timm:ARCH one made from timm's own pretrained config (mean, std, input size)."""
    if source in SPECS:
        return SPECS[source]
    arch = source.split(":", 1)[1]
    if not timm.list_models(arch):
        raise DataError(f"--features {source}: timm {timm.__version__} has no model {arch!r} (timm.list_models())")
    cfg = timm.models.get_pretrained_cfg(arch)  # a local table: no download
    size = cfg.input_size[-1] if cfg else 224
    mean, std = (cfg.mean, cfg.std) if cfg else IMAGENET
    return Spec(arch, {"num_classes": 0}, tuple(mean), tuple(std), output="pooled", input_size=int(size))


def architecture(source: str, device="meta") -> tuple[nn.Module, Spec]:
    """(the encoder's network, without weights, on `device`; its spec)."""
    timm = need_timm(source)
    spec = spec_of(source, timm)
    with torch.device(device):
        net = timm.create_model(spec.arch, pretrained=False, **resolve(spec.kwargs))
    return net.eval(), spec


def hf_vit_to_timm(sd: dict) -> dict:
    """transformers' ViTModel state dict (Phikon's published file) -> timm's VisionTransformer names."""
    sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    out, n = {}, 0
    rename = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    per_layer = {"attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
                 "layernorm_before": "norm1", "layernorm_after": "norm2"}
    for k, v in sd.items():
        if k in rename:
            out[rename[k]] = v
        elif k.startswith("encoder.layer."):
            i, rest = k[len("encoder.layer."):].split(".", 1)
            n = max(n, int(i) + 1)
            stem, kind = rest.rsplit(".", 1)
            if stem.startswith("attention.attention."):
                continue  # query, key and value: fused below
            out[f"blocks.{i}.{per_layer.get(stem, stem)}.{kind}"] = v
        else:
            out[k] = v  # unknown: reported as unexpected by name
    for i in range(n):
        for kind in ("weight", "bias"):
            parts = [sd.get(f"encoder.layer.{i}.attention.attention.{q}.{kind}") for q in ("query", "key", "value")]
            if all(p is not None for p in parts):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    return out


def read_weights(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--encoder-weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"--encoder-weights {path}: unreadable weights ({type(e).__name__}: {e})") from None
    for wrapper in ("state_dict", "model"):  # a training checkpoint around the weights
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise DataError(f"--encoder-weights {path}: not a state dict of tensors")
    return sd


def check_fit(net: nn.Module, sd: dict, spec: Spec, path) -> dict:
    """The weights as the network names them; one line naming the file and the first key that does not fit."""
    if spec.keys == "hf-vit":
        sd = hf_vit_to_timm(sd)
    sd = {k: v for k, v in sd.items() if k not in spec.ignored}
    wanted = net.state_dict()
    missing = [k for k in wanted if k not in sd]
    unexpected = [k for k in sd if k not in wanted]
    if missing or unexpected:
        first = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise DataError(f"--encoder-weights {path}: does not fit {spec.arch} ({first}; {len(missing)} missing, "
                        f"{len(unexpected)} unexpected)")
    for k, v in wanted.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise DataError(f"--encoder-weights {path}: does not fit {spec.arch} (key {k!r}: shape "
                            f"{tuple(sd[k].shape)}, expected {tuple(v.shape)})")
    return sd


class Encoder(nn.Module):
    """model_input's batch (ImageNet-normalized) -> the encoder's features (n, d), float32."""

    def __init__(self, net: nn.Module, spec: Spec):
        super().__init__()
        self.net, self.spec = net, spec
        for name, values in (("in_mean", IMAGENET[0]), ("in_std", IMAGENET[1]), ("mean", spec.mean),
                             ("std", spec.std)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        x = x * self.in_std + self.in_mean  # back to [0, 1] RGB
        size = self.spec.input_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > size)
        x = (x - self.mean) / self.std
        if self.spec.output == "pooled":
            return self.net(x).float()
        tokens = self.net.forward_features(x)
        if self.spec.output == "cls+mean":
            return torch.cat([tokens[:, 0], tokens[:, self.net.num_prefix_tokens:].mean(1)], dim=-1).float()
        return tokens[:, 0].float()


def untrained(source: str, device="cpu") -> Encoder:
    """The encoder with timm's random initialization, built on `device`: for timing (tools/bench_patient.py, tools/gpu_check.py)
    without the weights file."""
    net, spec = architecture(source, device)
    return Encoder(net, spec).to(device).eval().requires_grad_(False)


def build(source: str, weights) -> Encoder:
    """The encoder `source` with the weights of the local file `weights`, on the CPU, frozen."""
    if weights is None:
        raise DataError(f"--features {source} needs --encoder-weights FILE (nothing is downloaded)")
    net, spec = architecture(source)
    sd = check_fit(net, read_weights(weights), spec, weights)
    net = net.to_empty(device="cpu")
    net.load_state_dict(sd, strict=True)
    return Encoder(net.eval(), spec).eval().requires_grad_(False)
