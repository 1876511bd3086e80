"""Every chart the project draws (learning curves, PR/ROC curves, score histograms, confusion matrices), saved
atomically as PNG with matplotlib's object API: no pyplot, so no global backend state, and it works headless.

    figures.plot_learning_curves(records, run_dir / "learning_curves.png")   # train.py, every epoch
    files = figures.write_figures(tmp, val_pred, metrics, patient_rows)    # evaluate.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import common
from helico import metrics


def subplots(*grid, figsize, layout=None, **kw):
    """(figure, axes) like pyplot.subplots, without pyplot."""
    # matplotlib is imported when a chart is drawn, not with train.py: its first import may build a font cache by
    # running fc-list, a child process during start-up that signal handling (and its tests) must not meet.
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, **kw)


def save(fig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


# ----------------------------------------------------------------------------------------------- training
def plot_learning_curves(records: list[dict], path, chosen: int | None = None) -> None:
    """Loss and validation metrics per epoch (train.py's log.jsonl records), with the dummy's PR-AUC when logged and
    the chosen epoch (the checkpoint's) marked."""
    fig, (loss, val) = subplots(1, 2, figsize=(10, 4))
    if chosen is not None:
        for ax in (loss, val):
            ax.axvline(chosen, ls=":", c="k", label=f"chosen epoch {chosen}")
    epochs = [r["epoch"] for r in records]
    for ax, keys in ((loss, ("train_loss", "val_loss")), (val, ("pr_auc", "roc_auc", "recall", "precision"))):
        for k in keys:
            if any(k in r for r in records):
                ax.plot(epochs, [r.get(k, np.nan) for r in records], "o-", label=k)
        ax.set(xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs, never "epoch 1.25"
    if "dummy_pr_auc" in records[-1]:
        val.axhline(records[-1]["dummy_pr_auc"], ls="--", c="gray", label="dummy PR-AUC (prevalence)")
    loss.set(title="loss (BCE, positive-weighted)")
    val.set(title="validation", ylim=(0, 1.02))
    for ax in (loss, val):
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


# ----------------------------------------------------------------------------------------------- evaluation
def _two_classes(y) -> bool:
    return len(y) > 0 and 0 < np.sum(y) < len(y)


def write_figures(folder: Path, pred, result: dict, patient_rows: list[dict], part: str = "val") -> list[str]:
    """PR and ROC curves, score histograms per class, confusion matrices of one split part (the report's headline);
    returns paths relative to folder."""
    patch = pred.patch_eval
    y, s, src = pred.label[patch], pred.score[patch], pred.source[patch]
    rows = [r for r in patient_rows if r.get("split", "val") == part and r["label"] >= 0 and np.isfinite(r["score"])]
    py, ps = np.array([r["label"] for r in rows]), np.array([r["score"] for r in rows])
    curves = {"patches, all": (y, s), "patches, annotated only": (y[src == "annotated"], s[src == "annotated"]),
              "patients": (py, ps)}
    mil_rows = [r for r in rows if np.isfinite(r.get("mil_probability", np.nan))]
    if mil_rows:  # the patient model, on the same patients as the rule
        curves["patients, patient model"] = (np.array([r["label"] for r in mil_rows]),
                                             np.array([r["mil_probability"] for r in mil_rows]))
    fig_pr, ax_pr = subplots(figsize=(5, 4.5))
    fig_roc, ax_roc = subplots(figsize=(5, 4.5))
    for name, (cy, cs) in curves.items():
        if not _two_classes(cy):
            continue
        c = metrics.curve_points(cy, cs)
        if not name.startswith("patients"):  # the step function whose area is the AP (metrics.pr_step_curve)
            ax_pr.plot(*metrics.pr_step_curve(cy, cs), label=f"{name} (AP {metrics.average_precision(cy, cs):.3f})")
        ax_roc.plot(c["fpr"], c["tpr"], drawstyle="steps-post", label=f"{name} (AUC {metrics.roc_auc(cy, cs):.3f})")
    if _two_classes(y):
        ax_pr.axhline(y.mean(), ls=":", c="gray", label=f"chance (prevalence {y.mean():.2f})")
    ax_roc.plot([0, 1], [0, 1], ls=":", c="gray", label="chance")
    name = {"val": "validation", "test": "test"}.get(part, part)
    for ax, xl, yl, title in ((ax_pr, "recall", "precision", f"Precision-recall, {name}"),
                              (ax_roc, "false positive rate", "true positive rate", f"ROC, {name}")):
        ax.set(xlabel=xl, ylabel=yl, title=title, xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(loc="lower left" if ax is ax_pr else "lower right", fontsize=8)
    save(fig_pr, folder / "figures/pr_curve.png")
    save(fig_roc, folder / "figures/roc_curve.png")
    _score_histograms(folder, y, s, py, ps, result)
    _confusions(folder, result)
    cal = {"patches": result["patch"]["calibration"]} if "calibration" in result.get("patch", {}) else {}
    if result.get("patient_mil", {}).get("calibration"):
        cal["patients, patient model"] = result["patient_mil"]["calibration"]
    reliability(folder / "figures/reliability.png", cal)
    return ["figures/pr_curve.png", "figures/roc_curve.png", "figures/score_histograms.png",
            "figures/confusion_matrix.png", "figures/reliability.png"]


def _score_histograms(folder, y, s, py, ps, result) -> None:
    fig, axes = subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(0, 1, 41)
    for label, name in ((0, "negative"), (1, "positive")):  # each class its own density: a few positives still show
        axes[0].hist(s[y == label], bins=bins, alpha=0.6, density=True,
                     label=f"{name} patches ({int((y == label).sum())})")
    axes[0].axvline(result["patch"]["threshold"], c="k", ls="--", label="threshold")
    axes[0].set(xlabel="patch score", ylabel="density (each class sums to 1)", title="Patch scores by label")
    rule = result["patient"]["rule"]
    for label, name in ((0, "NEGATIVA"), (1, "BAIXA/ALTA")):
        axes[1].hist(ps[py == label], bins=20, alpha=0.6, label=f"{name} ({int((py == label).sum())})")
    if rule:
        axes[1].axvline(result["patient"]["threshold"], c="k", ls="--", label="threshold")
    axes[1].set(xlabel=f"patient score ({rule or 'no rule'})", ylabel="patients", title="Patient scores by diagnosis")
    for ax in axes:
        ax.legend(fontsize=8)
    save(fig, folder / "figures/score_histograms.png")


def _confusions(folder, result) -> None:
    fig, axes = subplots(1, 2, figsize=(8, 3.6))
    for ax, (level, names) in zip(axes, (("patch", ("negative", "positive")), ("patient", ("NEGATIVA", "infected")))):
        if level == "patient" and not result["patient"]["rule"]:
            ax.set(title="patient: no rule could be tuned", xticks=[], yticks=[])
            continue
        cm = np.asarray(result[level]["confusion"])
        ax.imshow(cm, cmap="Blues", vmin=0)
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=12, color="white" if v > cm.max() / 2 else "black")
        rule = f"{result['patient']['rule']} >= " if level == "patient" else "score >= "
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=[f"pred {n}" for n in names], yticklabels=names,
               title=f"{level}: {rule}{result[level]['threshold']:.3g}")
    save(fig, folder / "figures/confusion_matrix.png")


def reliability(path, curves: dict) -> None:
    """Reliability diagram: per probability bin, mean predicted against observed share (metrics.calibration's bins),
    the diagonal being perfect calibration. curves: name -> calibration dict."""
    fig, ax = subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], ls=":", c="gray", label="calibrated")
    for name, cal in curves.items():
        b = cal["bins"]
        ax.plot([r["mean_predicted"] for r in b], [r["observed"] for r in b], "o-",
                label=f"{name} (Brier {cal['brier']:.3f}, ECE {cal['ece']:.3f})")
    ax.set(xlabel="mean predicted probability (bin)", ylabel="observed share positive", xlim=(0, 1), ylim=(0, 1.02),
           title="Reliability (uncalibrated scores)")
    ax.legend(fontsize=8)
    save(fig, path)


def attention_gallery(path, root, patients: list[tuple], image_size: int, per_patient: int = 6) -> None:
    """One strip per patient: its `per_patient` most attended bag patches (raw PNGs), each captioned with its
    attention weight (softmax over the bag). patients: (patient, diagnosis, probability, [(path, weight)] most
    attended first). Drawn as one mosaic image: one imshow, not one axes per patch."""
    from PIL import Image
    gap, label = 4, 14  # pixels between tiles, and above each strip for its caption
    rows = max(1, len(patients))
    mosaic = np.full((rows * (image_size + label + gap), per_patient * (image_size + gap), 3), 255, np.uint8)
    captions = []
    for i, (patient, dx, prob, ranked) in enumerate(patients):
        top = i * (image_size + label + gap) + label
        captions.append((0, top - 3, f"{patient} ({dx or '?'}), model p={prob:.2f}", 8))
        for j, (rel, weight) in enumerate(ranked[:per_patient]):
            with Image.open(Path(root) / rel) as im:
                tile = np.asarray(im.convert("RGB").resize((image_size, image_size)))
            left = j * (image_size + gap)
            mosaic[top:top + image_size, left:left + image_size] = tile
            captions.append((left + 2, top + image_size - 3, f"{weight:.2f}", 7))
    scale = max(1.0, 160 / image_size)  # small patches drawn larger
    fig, ax = subplots(figsize=(mosaic.shape[1] * scale / 100, mosaic.shape[0] * scale / 100 + 0.4))
    ax.imshow(mosaic, interpolation="nearest")
    for x, y, text, size in captions:
        ax.text(x, y, text, fontsize=size, color="white" if size == 7 else "black",
                backgroundcolor="black" if size == 7 else "none")
    ax.set_axis_off()
    ax.set_title("Most attended patches per patient (attention weight: its share of the bag)", fontsize=9)
    save(fig, path)
