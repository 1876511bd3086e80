"""The files evaluate.py writes, except figures and Grad-CAM: the eval folder swap, CSV/JSON, report.md, compare.md.

Nothing here is a script; figures.py draws the charts and gradcam.py the Grad-CAM grids that report.md links.

    with eval_report.replaced_folder(out) as tmp:        # built beside `out`, swapped in whole on success
        eval_report.write_predictions(tmp / "predictions.csv", pred, threshold)
        common.atomic_write_text(tmp / "report.md", eval_report.render_report(metrics, files, patient_rows))
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
