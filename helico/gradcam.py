"""Grad-CAM of the one-logit classifier: which patches to explain, their maps, and the captioned PNG grids.

Grad-CAM (Selvaraju et al. 2017) is done by hand with hooks: the target layer's activations A and the gradient
of the logit with respect to them give per-channel weights w_c = mean(dlogit/dA_c); the signed map is
sum_c w_c A_c. One departure: the displayed map is the signed map min-max scaled per patch, not ReLU(map)/max.
With a one-logit head, the ReLU map is blank wherever the net evidence is negative, which is every location of a
confidently negative patch (false negatives!) and, at small input sizes where layer4 is 2x2, often of positives
too; min-max scaling shows where the evidence for H. pylori is strongest relative to the rest of the patch.
heatmaps.npz keeps the signed maps at the layer's resolution (`<group>_signed`) for canonical ReLU maps.
Target layer: the deepest module with a 4-D output larger than 1x1 (`layer4` for ResNets), unless its map is
coarser than 7x7 (layer4 is 2x2 at 64 px): then the last module whose map is at least 7x7 (layer2 at 64 px). The
layer and its map size go into the report.

    picks = gradcam.gradcam_picks(val_pred, threshold, n=8)      # top false positives, false negatives, true positives
    files = gradcam.write_gradcam(out / "gradcam", net, normalizer, data.root, picks, image_size, device)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import DataError
from helico import figures, model

GRADCAM_GROUPS = {"false_positives": "highest-scoring negatives", "false_negatives": "lowest-scoring positives",
                  "true_positives": "highest-scoring positives"}


def gradcam_picks(pred, threshold: float, n: int) -> dict[str, list[tuple]]:
    """(sample, score) of the most confident mistakes and hits among the validation patches."""
    idx = np.flatnonzero(pred.patch_eval)
    y, s = pred.label[idx], pred.score[idx]
    hit = s >= threshold
    groups = {"false_positives": (y == 0) & hit, "false_negatives": (y == 1) & ~hit, "true_positives": (y == 1) & hit}
    out = {}
    for name, mask in groups.items():
        chosen = idx[mask][np.argsort(s[mask] if name == "false_negatives" else -s[mask], kind="mergesort")][:n]
        out[name] = [(pred.samples[i], float(pred.score[i])) for i in chosen]
    return out


MIN_MAP = 7  # Grad-CAM maps coarser than 7x7 (ResNet layer4 below 224 px input) say little about where in a patch


def gradcam_layer(net, example) -> tuple:
    """(layer, its name, its map size (h, w), a note): the deepest module (in forward order) with a 4-D output of
    more than one position, pooling excluded (layer4 for ResNets); if its map is coarser than MIN_MAP x MIN_MAP,
    the last module whose map is at least that fine (layer2 at 64 px), since a 2x2 map cannot point at a bacterium."""
    pooling = (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d, torch.nn.AvgPool2d, torch.nn.MaxPool2d)
    names = {m: n for n, m in net.named_modules()}
    fired = []
    hooks = [m.register_forward_hook(lambda mod, i, o: fired.append((mod, o))) for m in net.modules()
             if not isinstance(m, pooling) and m is not net]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for h in hooks:
            h.remove()
    spatial = [(m, tuple(o.shape[-2:])) for m, o in fired if torch.is_tensor(o) and o.dim() == 4
               and o.shape[-1] * o.shape[-2] > 1]
    if not spatial:
        raise DataError("Grad-CAM: the model has no layer with a spatial (4-D) output; pass --gradcam 0")
    deepest, size = spatial[-1]
    if min(size) >= MIN_MAP:
        return deepest, names[deepest], size, ""
    fine = [(m, s) for m, s in spatial if min(s) >= MIN_MAP]
    if not fine:
        return deepest, names[deepest], size, f"every layer is coarser than {MIN_MAP}x{MIN_MAP} at this input size"
    layer, fine_size = fine[-1]
    return layer, names[layer], fine_size, (f"{names[deepest]} would give {size[0]}x{size[1]}, coarser than "
                                            f"{MIN_MAP}x{MIN_MAP}")


def gradcam(net, layer, x):
    """Grad-CAM of each image's logit: (maps (B, H, W) in [0, 1] at the input size, signed maps (B, h, w) at the
    layer's resolution). The displayed map is the signed map min-max scaled per image (see the module docstring)."""
    saved = {}

    def keep(module, inputs, output):
        saved["act"] = output
        output.register_hook(lambda g: saved.__setitem__("grad", g))
    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = net(x).reshape(-1)
            logits.sum().backward()  # eval-mode BatchNorm: each image's gradient is its own
    finally:
        handle.remove()
        net.zero_grad(set_to_none=True)
    act, grad = saved["act"].detach().float(), saved["grad"].detach().float()
    signed = (grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True)
    cam = F.interpolate(signed, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low, high = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
    return (cam - low) / (high - low).clamp_min(1e-12), signed[:, 0]


def write_gradcam(folder: Path, net, normalizer, root, picks: dict, image_size: int, device) -> tuple[list[str], dict]:
    """One PNG grid per group (patch | heatmap overlay, captioned) and heatmaps.npz with the raw maps; and the
    layer used ({"layer", "map", "input", "note"}) for the report."""
    files, arrays, used = [], {}, {}
    for name, items in picks.items():
        if not items:
            continue
        ds = common.PatchDataset(root, [s for s, _ in items], image_size=image_size)
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        x = model.model_input(images.to(device), normalizer)
        layer, layer_name, size, note = gradcam_layer(net, x[:1])
        used = {"layer": layer_name, "map": list(size), "input": image_size, "note": note}
        cams, signed = (a.cpu().numpy() for a in gradcam(net, layer, x))
        arrays.update({name: cams.astype(np.float16), f"{name}_signed": signed.astype(np.float32),
                       f"{name}_paths": np.array([s.path for s, _ in items])})
        fig, axes = figures.subplots(len(items), 2, figsize=(5, 2.6 * len(items)), squeeze=False, layout="constrained")
        for (sample, score), cam, img, (a, b) in zip(items, cams, images, axes):
            rgb = img.permute(1, 2, 0).numpy()
            a.imshow(rgb)
            b.imshow(rgb)
            b.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            a.set_title(f"{sample.patient}  {Path(sample.path).name}", fontsize=8)
            b.set_title(f"score {score:.3f}  ({sample.source})", fontsize=8)
            a.axis("off")
            b.axis("off")
        fig.suptitle(f"Grad-CAM, {name.replace('_', ' ')} ({GRADCAM_GROUPS[name]})", fontsize=10)
        figures.save(fig, folder / f"{name}.png")
        files.append(f"{folder.name}/{name}.png")
    if arrays:
        with common.atomic_path(folder / "heatmaps.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        files.append(f"{folder.name}/heatmaps.npz")
    return files, used
