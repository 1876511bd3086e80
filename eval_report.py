"""Everything evaluate.py writes: the eval folder swap, CSV/JSON files, figures, Grad-CAM grids, report.md.

A separate file only because evaluate.py (metrics, bootstrap, patient rule, CLI) and its outputs together would
pass the project's ~500-line limit; evaluate.py is the entry point, nothing here is a script.

    with eval_report.replaced_folder(out) as tmp:        # built beside `out`, swapped in whole on success
        eval_report.write_figures(tmp, val_pred, metrics, patient_rows)
        common.atomic_write_text(tmp / "report.md", eval_report.render_report(metrics, files, patient_rows))

Grad-CAM (Selvaraju et al. 2017) is done by hand with hooks: the target layer's activations A and the gradient
of the logit with respect to them give per-channel weights w_c = mean(dlogit/dA_c); the signed map is
sum_c w_c A_c. One departure: the displayed map is the signed map min-max scaled per patch, not ReLU(map)/max.
With a one-logit head, the ReLU map is blank wherever the net evidence is negative, which is every location of a
confidently negative patch (false negatives!) and, at small input sizes where layer4 is 2x2, often of positives
too; min-max scaling shows where the evidence for H. pylori is strongest relative to the rest of the patch.
heatmaps.npz keeps the signed maps at the layer's resolution (`<group>_signed`) for canonical ReLU maps.
Target layer: `layer4` for ResNets, otherwise the last module with a 4-D output larger than 1x1.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

import common
from common import DataError

OUT_MARKERS = ("metrics.json", "compare.json")  # an existing --out holding one of these may be replaced whole
GRADCAM_GROUPS = {"false_positives": "highest-scoring negatives", "false_negatives": "lowest-scoring positives",
                  "true_positives": "highest-scoring positives"}


# ----------------------------------------------------------------------------------------------- files
def check_out_folder(out: Path) -> None:
    """Refuse, before any work, an --out that is a file or a folder this script did not write."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).is_file() for m in OUT_MARKERS):
        raise DataError(f"--out {out}: a non-empty folder without {' or '.join(OUT_MARKERS)}; refusing to replace it")


@contextlib.contextmanager
def replaced_folder(out: Path):
    """A fresh temp folder beside `out`; on success it replaces `out` whole, so no stale file survives a re-run
    and a crash leaves the previous evaluation intact."""
    check_out_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        yield tmp
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plain(x):
    """json.dumps fallback for numpy scalars and tensors a checkpoint's val_metrics may hold."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def write_json(path, obj) -> None:
    # NaN stays NaN (Python's json reads it back): an undefined metric is never mistaken for a number
    common.atomic_write_text(path, json.dumps(obj, indent=2, default=_plain) + "\n")


def write_csv(path, header: list[str], rows) -> None:
    with common.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_predictions(path, pred, threshold: float) -> None:
    """One row per scored patch; score in full precision (repr) so metrics recomputed from it are exact."""
    header = ["path", "patient", "source", "label", "score", "prediction", "split", "patch_eval", "patient_eval"]
    write_csv(path, header,
              ([s.path, s.patient, s.source, s.label, repr(float(sc)), int(sc >= threshold), sp, int(pe), int(qe)]
               for s, sc, sp, pe, qe in zip(pred.samples, pred.score, pred.split, pred.patch_eval, pred.patient_eval)))


PATIENT_COLUMNS = ["patient", "split", "diagnosis", "label", "n_patches", "fraction_positive", "topk_mean", "score",
                   "prediction"]


def write_patients(path, rows: list[dict], rule: str | None) -> None:
    write_csv(path, [*PATIENT_COLUMNS, "rule"],
              ([repr(r[c]) if isinstance(r[c], float) else r[c] for c in PATIENT_COLUMNS] + [rule or ""] for r in rows))


# ----------------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # headless: cluster nodes have no display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> None:
    plt = _pyplot()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def curve_points(y, s) -> dict[str, np.ndarray]:
    """Recall, precision, FPR and TPR at every distinct score threshold (highest first)."""
    y, s = np.asarray(y, dtype=np.int64), np.asarray(s, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return {"recall": tps / max(tps[-1], 1), "precision": tps / (last + 1),
            "fpr": np.r_[0, fps / max(fps[-1], 1)], "tpr": np.r_[0, tps / max(tps[-1], 1)]}


def _two_classes(y) -> bool:
    return len(y) > 0 and 0 < np.sum(y) < len(y)


def write_figures(folder: Path, pred, metrics: dict, patient_rows: list[dict]) -> list[str]:
    """PR and ROC curves, score histograms per class, confusion matrices; returns paths relative to folder."""
    plt = _pyplot()
    patch = pred.patch_eval
    y, s, src = pred.label[patch], pred.score[patch], pred.source[patch]
    rows = [r for r in patient_rows if r.get("split", "val") == "val" and r["label"] >= 0 and np.isfinite(r["score"])]
    py, ps = np.array([r["label"] for r in rows]), np.array([r["score"] for r in rows])
    curves = {"patches, all": (y, s), "patches, annotated only": (y[src == "annotated"], s[src == "annotated"]),
              "patients": (py, ps)}
    fig_pr, ax_pr = plt.subplots(figsize=(5, 4.5))
    fig_roc, ax_roc = plt.subplots(figsize=(5, 4.5))
    for name, (cy, cs) in curves.items():
        if not _two_classes(cy):
            continue
        c = curve_points(cy, cs)
        if name != "patients":
            ax_pr.step(c["recall"], c["precision"], where="post",
                       label=f"{name} (AP {common.average_precision(cy, cs):.3f})")
        ax_roc.plot(c["fpr"], c["tpr"], drawstyle="steps-post", label=f"{name} (AUC {common.roc_auc(cy, cs):.3f})")
    if _two_classes(y):
        ax_pr.axhline(y.mean(), ls=":", c="grey", label=f"chance (prevalence {y.mean():.2f})")
    ax_roc.plot([0, 1], [0, 1], ls=":", c="grey", label="chance")
    for ax, xl, yl, title in ((ax_pr, "recall", "precision", "Precision-recall, validation"),
                              (ax_roc, "false positive rate", "true positive rate", "ROC, validation")):
        ax.set(xlabel=xl, ylabel=yl, title=title, xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(loc="lower left" if ax is ax_pr else "lower right", fontsize=8)
    _save(fig_pr, folder / "figures/pr_curve.png")
    _save(fig_roc, folder / "figures/roc_curve.png")
    _score_histograms(plt, folder, y, s, py, ps, metrics)
    _confusions(plt, folder, metrics)
    return ["figures/pr_curve.png", "figures/roc_curve.png", "figures/score_histograms.png",
            "figures/confusion_matrix.png"]


def _score_histograms(plt, folder, y, s, py, ps, metrics) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(0, 1, 41)
    for label, name in ((0, "negative"), (1, "positive")):
        axes[0].hist(s[y == label], bins=bins, alpha=0.6, label=f"{name} patches ({int((y == label).sum())})")
    axes[0].axvline(metrics["patch"]["threshold"], c="k", ls="--", label="threshold")
    axes[0].set(xlabel="patch score", ylabel="patches", title="Patch scores by label", yscale="log")
    rule = metrics["patient"]["rule"]
    for label, name in ((0, "NEGATIVA"), (1, "BAIXA/ALTA")):
        axes[1].hist(ps[py == label], bins=20, alpha=0.6, label=f"{name} ({int((py == label).sum())})")
    if rule:
        axes[1].axvline(metrics["patient"]["threshold"], c="k", ls="--", label="threshold")
    axes[1].set(xlabel=f"patient score ({rule or 'no rule'})", ylabel="patients", title="Patient scores by diagnosis")
    for ax in axes:
        ax.legend(fontsize=8)
    _save(fig, folder / "figures/score_histograms.png")


def _confusions(plt, folder, metrics) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, (level, names) in zip(axes, (("patch", ("negative", "positive")), ("patient", ("NEGATIVA", "infected")))):
        if level == "patient" and not metrics["patient"]["rule"]:
            ax.set(title="patient: no rule could be tuned", xticks=[], yticks=[])
            continue
        cm = np.asarray(metrics[level]["confusion"])
        ax.imshow(cm, cmap="Blues", vmin=0)
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=12, color="white" if v > cm.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=[f"pred {n}" for n in names], yticklabels=names,
               title=f"{level} at threshold {metrics[level]['threshold']:.3g}")
    _save(fig, folder / "figures/confusion_matrix.png")


def write_learning_curves(log_path: Path, out_png: Path) -> list[str]:
    """Loss and validation metrics per epoch from train.py's log.jsonl (unparsable lines are skipped)."""
    records = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            r = json.loads(line)
            if isinstance(r, dict) and "epoch" in r:
                records.append(r)
    if not records:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [r["epoch"] for r in records]
    for ax, keys in ((axes[0], ("train_loss", "val_loss")), (axes[1], ("pr_auc", "roc_auc", "recall", "precision"))):
        for k in keys:
            if any(k in r for r in records):
                ax.plot(epochs, [r.get(k, np.nan) for r in records], marker="o", label=k)
        ax.set(xlabel="epoch")
        ax.legend(fontsize=8)
    axes[0].set(title="Loss")
    axes[1].set(title="Validation metrics", ylim=(0, 1.02))
    _save(fig, out_png)
    return [out_png.name]


# ----------------------------------------------------------------------------------------------- Grad-CAM
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


def gradcam_layer(model, example):
    """The layer whose activations explain the logit: `layer4` for ResNets, else the last module (in forward order)
    whose output is 4-D with more than one spatial position, pooling layers excluded."""
    import torch
    if hasattr(model, "layer4"):
        return model.layer4
    pooling = (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d, torch.nn.AvgPool2d, torch.nn.MaxPool2d)
    fired = []
    hooks = [m.register_forward_hook(lambda mod, i, o: fired.append((mod, o))) for m in model.modules()
             if not isinstance(m, pooling)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    spatial = [m for m, o in fired if torch.is_tensor(o) and o.dim() == 4 and o.shape[-1] * o.shape[-2] > 1]
    if not spatial:
        raise DataError("Grad-CAM: the model has no layer with a spatial (4-D) output; pass --gradcam 0")
    return spatial[-1]


def gradcam(model, layer, x):
    """Grad-CAM of each image's logit: (maps (B, H, W) in [0, 1] at the input size, signed maps (B, h, w) at the
    layer's resolution). The displayed map is the signed map min-max scaled per image (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    saved = {}

    def keep(module, inputs, output):
        saved["act"] = output
        output.register_hook(lambda g: saved.__setitem__("grad", g))
    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x).reshape(-1)
            logits.sum().backward()  # eval-mode BatchNorm: each image's gradient is its own
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    act, grad = saved["act"].detach().float(), saved["grad"].detach().float()
    signed = (grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True)
    cam = F.interpolate(signed, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low, high = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
    return (cam - low) / (high - low).clamp_min(1e-12), signed[:, 0]


def write_gradcam(folder: Path, model, normalizer, root, picks: dict, image_size: int, device) -> list[str]:
    """One PNG grid per group (patch | heatmap overlay, captioned) and heatmaps.npz with the raw maps."""
    import torch
    plt = _pyplot()
    files, arrays = [], {}
    for name, items in picks.items():
        if not items:
            continue
        ds = common.PatchDataset(root, [s for s, _ in items], image_size=image_size)
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        x = common.imagenet_normalize(common.to_unit(images.to(device), normalizer))
        cams, signed = (a.cpu().numpy() for a in gradcam(model, gradcam_layer(model, x[:1]), x))
        arrays.update({name: cams.astype(np.float16), f"{name}_signed": signed.astype(np.float32),
                       f"{name}_paths": np.array([s.path for s, _ in items])})
        fig, axes = plt.subplots(len(items), 2, figsize=(5, 2.6 * len(items)), squeeze=False, layout="constrained")
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
        _save(fig, folder / f"{name}.png")
        files.append(f"{folder.name}/{name}.png")
    if arrays:
        with common.atomic_path(folder / "heatmaps.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        files.append(f"{folder.name}/heatmaps.npz")
    return files


# ----------------------------------------------------------------------------------------------- report.md
NAMES = {"pr_auc": "PR-AUC (average precision)", "roc_auc": "ROC-AUC", "recall": "recall", "precision": "precision",
         "f1": "F1", "accuracy": "accuracy", "sensitivity": "sensitivity (infected found)",
         "specificity": "specificity (NEGATIVA cleared)"}


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "NaN" if np.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def with_ci(m: dict, key: str) -> str:
    ci, v = m.get("ci95", {}).get(key), m.get(key)
    if isinstance(v, float) and np.isnan(v):
        return "NaN (undefined, see below)"
    return f"{fmt(v)} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else fmt(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]


def _undefined(metrics: dict, prefix: str = "") -> list[str]:
    """Every NaN metric in the nested dict with the reason it is undefined."""
    out = []
    for k, v in metrics.items():
        if k == "undefined":
            out += [f"- `{prefix}{m}`: {why}" for m, why in v.items()]
        elif isinstance(v, dict) and k not in ("meta", "candidates", "ci95"):
            out += _undefined(v, f"{prefix}{k}.")
    return out


def _header(metrics: dict) -> list[str]:
    meta = metrics["meta"]
    boot = meta["bootstrap"]
    lines = [f"# Evaluation of `{meta['checkpoint']}`", ""] + _table(["", ""], [
        ["architecture", f"{meta['arch']}, {meta['image_size']} px input"], ["epoch", meta.get("epoch")],
        ["data root", f"`{meta['data_root']}`"], ["stain normalization", meta["stain"] or "none"],
        ["patch threshold", f"{fmt(meta['patch_threshold'])} ({meta.get('threshold_rule') or 'chosen on validation'})"],
        ["validation patients", f"{len(meta['val_patients'])}: {', '.join(meta['val_patients'])}"],
        ["95% CIs", f"{boot['resamples']} patient-cluster bootstrap resamples, seed {boot['seed']}, percentile"
                    if boot["resamples"] else "none (--bootstrap 0)"],
        ["device", f"{meta['device']}, AMP {'on' if meta['amp'] else 'off'}"]])
    trained = meta.get("training_val_metrics") or {}
    if isinstance(trained, dict) and "pr_auc" in trained:
        lines += ["", f"Training logged validation PR-AUC {fmt(float(trained['pr_auc']))} for this checkpoint; this "
                      f"evaluation finds {fmt(metrics['patch']['pr_auc'])} (same patches and preprocessing: they "
                      f"should agree up to AMP rounding)."]
    return lines


def _patch_section(metrics: dict) -> list[str]:
    m, half = metrics["patch"], metrics["patch_at_0.5"]
    (tn, fp), (fn, tp) = m["confusion"]
    rows = [[NAMES[k], with_ci(m, k), with_ci(half, k) if k in ("recall", "precision", "f1", "accuracy")
             else "(threshold-free)"]
            for k in ("pr_auc", "roc_auc", "recall", "precision", "f1", "accuracy")]
    rows.append(["all-negative dummy accuracy", fmt(m["dummy_accuracy"]), fmt(half["dummy_accuracy"])])
    src = metrics.get("by_source", {})
    lines = ["", "## Patch level", "", "Validation patients' labelled patches, each window once (Aug copies excluded): "
             f"{m['n']} patches, {m['positives']} positive. Values with [95% CI].", ""]
    lines += _table(["metric", f"at threshold {fmt(m['threshold'])}", "at 0.5"], rows)
    lines += ["", f"Confusion at {fmt(m['threshold'])}: TN {tn}, FP {fp}, FN {fn}, TP {tp}.", "",
              "### By source", "", "Annotated: pathologist-reviewed windows (hard negatives and positives). "
              "Supplemental: Cropped patches of NEGATIVA patients (easy negatives, no positives at all).", ""]
    names = [k for k in ("annotated", "supplemental") if k in src]
    lines += _table(["metric", *names], [[NAMES[k], *[with_ci(src[s], k) for s in names]] for k in
                                         ("pr_auc", "roc_auc", "recall", "precision", "f1", "accuracy")] +
                    [["patches (positive)", *[f"{src[s]['n']} ({src[s]['positives']})" for s in names]]])
    return lines


def _patient_section(metrics: dict, patient_rows: list[dict]) -> list[str]:
    p = metrics["patient"]
    lines = ["", "## Patient level", "", "Each patient's score aggregates ALL its Cropped patches (HoldOut: all its "
             "patches): `fraction_positive` = share of patches scoring >= the patch threshold, `topk_mean` = mean of "
             f"the {p['top_k']} highest scores. Annotated windows are not used: they were picked knowing the "
             "diagnosis. Label: NEGATIVA = 0, BAIXA/ALTA = 1."]
    if p["rule"]:
        lines += ["", f"Rule chosen on the validation patients (best Youden's J, then ROC-AUC): **{p['rule']} >= "
                      f"{fmt(p['threshold'], 4)}**. **Validation patient numbers are optimistic**: rule and threshold "
                      "were tuned on these same patients. The HoldOut column (if any) applies them unchanged.", ""]
        lines += _table(["rule", "Youden's J", "ROC-AUC", "threshold"],
                        [[r, c["youden_j"], c["roc_auc"], c["threshold"]] for r, c in p["candidates"].items()])
    else:
        lines += ["", f"No patient rule: {p['reason']}."]
    cols = {"validation (tuned here)": p}
    if "holdout" in metrics:
        cols["HoldOut (rule applied as is)"] = metrics["holdout"]["patient"]
    lines += [""] + _table(["metric", *cols], [[NAMES[k], *[with_ci(c, k) for c in cols.values()]]
                                               for k in ("accuracy", "sensitivity", "specificity", "roc_auc")] +
                           [["patients (infected)", *[f"{c['n']} ({c['positives']})" for c in cols.values()]]])
    for name, c in cols.items():
        if c.get("excluded"):
            left_out = ", ".join(f"{k} ({v})" for k, v in c["excluded"].items())
            lines += ["", f"Left out of {name.split()[0]}: {left_out}"]
    lines += ["", "### Per patient", ""]
    lines += _table(PATIENT_COLUMNS, [[r[c] for c in PATIENT_COLUMNS] for r in patient_rows])
    return lines


def render_report(metrics: dict, files: list[str], patient_rows: list[dict]) -> str:
    lines = _header(metrics) + _patch_section(metrics) + _patient_section(metrics, patient_rows)
    undefined = _undefined({k: v for k, v in metrics.items() if k != "meta"})
    if undefined:
        lines += ["", "## Undefined metrics (NaN)", ""] + undefined
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in files if f.endswith(".png")
                                        and not f.startswith("gradcam")]
    cams = [f for f in files if f.startswith("gradcam")]
    if cams:
        lines += ["", "## Grad-CAM", "", "Where the evidence for H. pylori (the logit) is strongest within each patch "
                  "(layer4 for ResNets; signed Grad-CAM min-max scaled per patch, so red means 'most positive here', "
                  "not 'positive'), over the raw patch; the model saw the stain-normalized patch. Signed maps: "
                  "`gradcam/heatmaps.npz`.", ""]
        lines += [f"- [{Path(f).stem.replace('_', ' ')}]({f})" for f in cams if f.endswith(".png")]
    skipped = metrics["meta"]["skipped_images"]
    if skipped:
        lines += ["", f"## Skipped undecodable images ({len(skipped)})", ""] + [f"- `{p}`" for p in skipped[:50]]
    lines += ["", "## How to read this", "",
              "- CIs resample patients, not patches (patches of one patient are correlated); resamples where a metric "
              "is undefined are dropped (counted in metrics.json `bootstrap_undefined`).",
              "- The CIs hold the thresholds fixed: they do not include the variability of choosing them.",
              "- Patch metrics use the threshold stored in the checkpoint (chosen on these validation patches during "
              "training), so they too are somewhat optimistic; PR-AUC and ROC-AUC are threshold-free.",
              "- predictions.csv holds every score: recompute or re-aggregate anything from it."]
    return "\n".join(lines) + "\n"


def summary_lines(metrics: dict) -> list[str]:
    m, p = metrics["patch"], metrics["patient"]
    show = lambda d, keys: "  ".join(f"{k} {with_ci(d, k)}" for k in keys)
    lines = [f"patch   val, {m['n']} patches ({m['positives']} positive), threshold {fmt(m['threshold'])}: "
             + show(m, ("pr_auc", "roc_auc", "recall", "precision", "f1")),
             f"patient val, {p['n']} patients ({p['positives']} infected), rule {p['rule']} >= {fmt(p['threshold'])}"
             f" (tuned on them): " + show(p, ("accuracy", "sensitivity", "specificity", "roc_auc"))]
    if "holdout" in metrics:
        h = metrics["holdout"]["patient"]
        lines.append(f"patient HoldOut, {h['n']} patients ({h['positives']} infected), same rule, not re-tuned: "
                     + show(h, ("accuracy", "sensitivity", "specificity", "roc_auc")))
    return lines


def render_compare(table: dict) -> str:
    boot = table["bootstrap"]
    lines = [f"# Comparison against `{table['baseline']}`", "",
             f"On the {len(table['patients'])} validation patients all checkpoints share; deltas = model - baseline, "
             f"95% CI from {boot['resamples']} paired patient-bootstrap resamples (seed {boot['seed']}): the same "
             "patients drawn for every model. 'within noise' = the CI contains 0."]
    if not table["same_validation_patients"]:
        lines += ["", "**The checkpoints have different validation splits**: only the shared patients are compared, "
                      "and each model's stored threshold was chosen on its own split."]
    verdict = {True: "within noise", False: "beyond noise (CI excludes 0)", None: "undefined"}
    for i, model in enumerate(table["models"][1:], start=1):
        lines += ["", f"## {i}. `{model['checkpoint']}`", ""]
        lines += _table(["metric", "baseline", "this model", "delta [95% CI]", "verdict"],
                        [[d["metric"], d["baseline"], d["value"], f"{fmt(d['delta'])} [{fmt(d['ci95'][0])}, "
                          f"{fmt(d['ci95'][1])}]", verdict[d["within_noise"]]]
                         for d in table["deltas"] if d["model"] == i])
    return "\n".join(lines) + "\n"
