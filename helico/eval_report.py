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
from helico.analysis import PATCH_METRICS, PATIENT_METRICS
from common import DataError

OUT_MARKERS = ("metrics.json", "compare.json")  # an existing --out holding one of these may be replaced whole


# ----------------------------------------------------------------------------------------------- files
def check_out_folder(out: Path, markers=OUT_MARKERS) -> None:
    """Refuse, before any work, an --out that is a file or a folder this script did not write (one holding none of
    `markers`)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).is_file() for m in markers):
        raise DataError(f"--out {out}: a non-empty folder without {' or '.join(markers)}; refusing to replace it")


@contextlib.contextmanager
def replaced_folder(out: Path, markers=OUT_MARKERS):
    """A fresh temp folder beside `out`; on success it replaces `out` whole, so no stale file survives a re-run
    and a crash leaves the previous evaluation intact. A full or failing disk while it is filled (a figure, a CSV,
    the report) is one EnvironmentFault naming `out`, not the temp folder it removes."""
    check_out_folder(out, markers)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        yield tmp
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, common.EnvironmentFault) as e:  # a failed write names out's folder, never the temp one
        if isinstance(e, OSError) and e.errno not in common.FAULTS and not (e.errno in common.REFUSED and
                                                                            common.write_failure(e, out)):
            raise
        reason = e.reason if isinstance(e, common.EnvironmentFault) else \
            common.FAULTS.get(e.errno) or (e.strerror or str(e)).lower()
        raise common.disk_fault(out.parent, reason, f"{out.name}/") from None
    finally:
        if tmp is not None:
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


PREDICTION_COLUMNS = ["path", "patient", "source", "label", "score", "prediction", "split", "patch_eval",
                      "patient_eval"]  # predictions.csv, read back by crossval.py


def write_predictions(path, pred, threshold: float) -> None:
    """One row per scored patch; score in full precision (repr) so metrics recomputed from it are exact."""
    write_csv(path, PREDICTION_COLUMNS,
              ([s.path, s.patient, s.source, s.label, repr(float(sc)), int(sc >= threshold), sp, int(pe), int(qe)]
               for s, sc, sp, pe, qe in zip(pred.samples, pred.score, pred.split, pred.patch_eval, pred.patient_eval)))


PATIENT_COLUMNS = ["patient", "split", "diagnosis", "label", "n_patches", "fraction_positive", "topk_mean",
                   "top_share_mean", "score", "prediction", "mil_probability", "mil_prediction", "call", "agree"]
# mil_*: empty without a patient model; call: the project's (decision.py): positive, negative or "no call: why"


def cell(v):
    return repr(v) if isinstance(v, float) else "" if v is None else v


def write_patients(path, rows: list[dict], rule: str | None) -> None:
    write_csv(path, [*PATIENT_COLUMNS, "rule"],
              ([cell(r.get(c)) for c in PATIENT_COLUMNS] + [rule or ""] for r in rows))


# ----------------------------------------------------------------------------------------------- report.md
NAMES = {"pr_auc": "PR-AUC (average precision)", "roc_auc": "ROC-AUC", "recall": "recall", "precision": "precision",
         "f1": "F1", "accuracy": "accuracy", "sensitivity": "sensitivity (infected found)",
         "specificity": "specificity (NEGATIVA cleared)"}


ECE_MIN_PATIENTS = 30  # the patient model's ECE below this many patients: a few per bin, noise


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "NaN" if np.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def with_ci(m: dict, key: str) -> str:
    """`0.812 [0.700, 0.900]`; `0.812 (CI not estimable)` where the interval would claim what the data cannot hold."""
    ci, v = m.get("ci95", {}).get(key), m.get(key)
    if isinstance(v, float) and np.isnan(v):
        return "NaN (undefined, see below)"
    if ci:
        return f"{fmt(v)} [{fmt(ci[0])}, {fmt(ci[1])}]"
    return f"{fmt(v)} (CI not estimable)" if key in m.get("ci_note", {}) else fmt(v)


def _interval_notes(m: dict, where: str) -> list[str]:
    """Why some intervals are missing, and the share of resamples in which a metric was undefined."""
    lines = []
    notes = {}
    for k, why in m.get("ci_note", {}).items():
        notes.setdefault(why, []).append(k)
    lines += [f"- {where}: no CI for {', '.join(ks)}: {why}." for why, ks in notes.items()]
    shares = {k: v for k, v in m.get("bootstrap_undefined_share", {}).items() if v}
    if shares:
        lines.append(f"- {where}: resamples in which a metric was undefined (dropped from its interval): "
                     + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()) + ".")
    return lines


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]


def _undefined(metrics: dict, prefix: str = "") -> list[str]:
    """Every NaN metric in the nested dict with the reason it is undefined."""
    out = []
    for k, v in metrics.items():
        if k == "undefined":
            out += [f"- `{prefix}{m}`: {why}" for m, why in v.items()]
        elif isinstance(v, dict) and k not in ("meta", "candidates", "ci95", "ci_note", "ci_method",
                                                  "bootstrap_undefined_share"):
            out += _undefined(v, f"{prefix}{k}.")
    return out


PART = {"test": "test part (untouched)", "val": "validation part"}


def disclosure(metrics: dict) -> list[str]:
    """The first lines of the report: which part the headline numbers come from and what was chosen on val."""
    meta = metrics["meta"]
    sel = meta.get("selection") or {}
    values = [v for v in sel.get("pr_auc_by_epoch") or [] if v is not None]
    epoch = (f"the epoch ({meta.get('epoch')}, best validation PR-AUC of {sel.get('epochs')}: "
             f"{', '.join(fmt(float(v)) for v in values)})" if values else f"the epoch ({meta.get('epoch')})")
    rule = (f"the patient rule ({sel['patient_rule']} >= {fmt(sel['patient_threshold'], 4)})"
            if sel.get("patient_rule") else "the patient rule (none could be tuned)")
    chosen = (f"Chosen on the {len(meta['val_patients'])} validation patients: {epoch}, the patch threshold "
              f"({fmt(meta['patch_threshold'], 4)}), {rule}.")
    if meta.get("headline") == "test":
        return [f"**Headline: the test part, {len(meta['test_patients'])} patients nothing was chosen on.** {chosen} "
                f"Validation numbers are reported below as the selection set (optimistic)."]
    return [f"**No untouched set: this run's split has two parts (train/val).** Every number below comes from the "
            f"patients that chose the model, so all of them are optimistic. {chosen}"]


PART_NAMES = {"test": "test part", "holdout": "HoldOut"}


def looks_lines(looks: dict | None, by: str = "this checkpoint") -> list[str]:
    """How often the labels behind these numbers have been looked at (the ledger, runs/holdout_ledger.jsonl): this
    look's number or the look it repeats, the earlier ones, damaged lines, the other models' looks, other uses."""
    if not looks:
        return []
    lines = []
    for part in ("test", "holdout"):
        if part not in looks:
            continue
        lk = looks[part]
        counted = [e for e in lk["earlier"] if not e.get("repeat")]
        earlier = ", ".join(f"{e.get('time', '?')}" + (f" `{e['checkpoint']}`" if by != "this checkpoint" and
                                                        e.get("checkpoint") else f" ({e.get('kind')})"
                                                        if e.get("kind") != "evaluate" else "")
                            for e in counted[-5:]) + (" ..." if len(counted) > 5 else "")
        if lk.get("repeat_of"):
            line = (f"**Look {lk['look']} at the {PART_NAMES[part]}'s labels by {by}, seen again**: the same "
                    f"checkpoint, flags and data as look {lk['repeat_of']}, recorded as a repeat and not counted.")
        else:
            line = f"**Look {lk['look']} at the {PART_NAMES[part]}'s labels by {by}**" + (
                f" (earlier: {earlier})." if earlier else " (the first).")
        if lk.get("unknown_origin"):
            damaged = lk["unknown_origin"]
            line += (f" {len(damaged)} of them of unknown origin: damaged ledger line(s) "
                     f"{', '.join(map(str, damaged[:10]))}{' ...' if len(damaged) > 10 else ''}, counted as looks.")
        counted_others = [e for e in lk["other_models"] if not e.get("repeat_of")]
        others = sorted({e.get("checkpoint") or ", ".join(e.get("checkpoints") or []) for e in counted_others})
        if others:
            line += (f" Other models looked at it {len(counted_others)} time(s): "
                     + ", ".join(f"`{o}`" for o in others[:5]) + (" ..." if len(others) > 5 else "") + ".")
        used = lk.get("used_by") or []
        if used:
            line += (f" Its labels were also read against {by} by {len(used)} other evaluation(s) ("
                     + ", ".join(sorted({e.get("kind", "?") for e in used})) + ", e.g. the ensemble's out-of-fold "
                     "thresholds).")
        lines.append(line)
    for c in looks.get("chosen_among", []):
        lines.append(f"**The test part was used to choose among {c['models']} models** ({c['time']}, evaluate.py "
                     f"--compare --compare-on test): its test numbers are no longer untouched.")
    if lines:
        lines.append(f"Every look is a line of `{looks.get('ledger')}`: the more looks, the less each is worth.")
    return lines


def hue_line(survey: dict) -> str:
    """train.py's survey of each slide's DAB hue against the stain reference's, in one table cell."""
    angles = survey["angles"]
    measured = [a for a in angles.values() if a is not None]
    far = ", ".join(f"{s} ({angles[s]:.1f} deg)" for s in survey["far"][:10]) + (" ..." if len(survey["far"]) > 10
                                                                                  else "")
    return (f"{len(survey['far'])} of {len(measured)} measured slides more than {survey['threshold_deg']:g} degrees "
            f"from the reference's DAB{': ' + far if far else ''} (their DAB amount changes under the ihc mode); "
            f"{len(angles) - len(measured)} slides show too little DAB to measure")


def _header(metrics: dict) -> list[str]:
    meta = metrics["meta"]
    boot = meta["bootstrap"]
    looked = looks_lines(meta.get("looks"))
    lines = [f"# Evaluation of `{meta['checkpoint']}`", "", *disclosure(metrics), "",
             *([" ".join(looked), ""] if looked else [])] + _table(["", ""], [
        ["architecture", f"{meta['arch']}, {meta['image_size']} px input"], ["epoch", meta.get("epoch")],
        ["data root", f"`{meta['data_root']}`"], ["stain normalization", meta["stain"] or "none"],
        *([["DAB hue survey", hue_line(meta["stain_survey"])]] if meta.get("stain_survey") else []),
        ["patch threshold", f"{fmt(meta['patch_threshold'])} ({meta.get('threshold_rule') or 'chosen on validation'})"],
        ["validation patients", f"{len(meta['val_patients'])}: {', '.join(meta['val_patients'])}"],
        ["test patients", f"{len(meta.get('test_patients') or [])}: {', '.join(meta.get('test_patients') or [])}"
                          if meta.get("test_patients") else "none: no untouched set"],
        ["95% CIs", "patient proportions: exact binomial (Clopper-Pearson); patch metrics and patient ROC-AUC: "
                    + (f"{boot['resamples']} patient-cluster bootstrap resamples (duplicated patients one cluster), "
                       f"seed {boot['seed']}, BCa; not estimable with fewer than "
                       f"{boot.get('min_clusters', 10)} clusters in a class" if boot["resamples"]
                       else "none (--bootstrap 0)")],
        ["device", f"{meta['device']}, AMP {'on' if meta['amp'] else 'off'}"]])
    trained = meta.get("training_val_metrics") or {}
    val_patch = (metrics.get("selection") or metrics).get("patch", {})
    if isinstance(trained, dict) and "pr_auc" in trained and "pr_auc" in val_patch:
        lines += ["", f"Training logged validation PR-AUC {fmt(float(trained['pr_auc']))} for this checkpoint; this "
                      f"evaluation finds {fmt(val_patch['pr_auc'])} on the validation part (same patches and "
                      f"preprocessing, byte-identical copies counted once: they should agree up to AMP rounding)."]
    if meta.get("identical_not_counted"):
        lines += ["", f"{len(meta['identical_not_counted'])} patch file(s) byte-identical to another counted file "
                      f"are counted once (e.g. `{meta['identical_not_counted'][0]}`); metrics.json lists them."]
    return lines


def _patch_section(metrics: dict) -> list[str]:
    m, half = metrics["patch"], metrics["patch_at_0.5"]
    part = PART[metrics["meta"].get("headline", "val")]
    (tn, fp), (fn, tp) = m["confusion"]
    rows = [[NAMES[k], with_ci(m, k), with_ci(half, k) if k in ("recall", "precision", "f1", "accuracy")
             else "(does not use one)"]
            for k in PATCH_METRICS]
    rows.append(["all-negative dummy accuracy", fmt(m["dummy_accuracy"]), fmt(half["dummy_accuracy"])])
    src = metrics.get("by_source", {})
    lines = ["", f"## Patch level, {part}", "", "Annotated windows, each once (Aug copies excluded): "
             f"{m['n']} patches, {m['positives']} positive. Values with [95% CI]. These pathologist-reviewed positives "
             "and hard negatives are the headline set, and the set whose validation part chose the epoch and the "
             "threshold; the easy negatives (Cropped patches of NEGATIVA patients) follow as a false-positive rate "
             "per patient.", ""]
    lines += _table(["metric", f"at threshold {fmt(m['threshold'])}", "at 0.5"], rows)
    lines += ["", f"Confusion at {fmt(m['threshold'])}: TN {tn}, FP {fp}, FN {fn}, TP {tp}.", "",
              "### By source", "", "Annotated: pathologist-reviewed windows (hard negatives and positives). "
              "Supplemental: Cropped patches of NEGATIVA patients (easy negatives, no positives at all).", ""]
    names = [k for k in ("annotated", "supplemental") if k in src]
    lines += _table(["metric", *names], [[NAMES[k], *[with_ci(src[s], k) for s in names]] for k in
                                         PATCH_METRICS] +
                    [["patches (positive)", *[f"{src[s]['n']} ({src[s]['positives']})" for s in names]]])
    neg = metrics.get("cropped_negatives") or {}
    if neg.get("patients"):
        lines += ["", f"Easy negatives: the {neg['patches']} Cropped patches of the {neg['patients']} NEGATIVA patients "
                      f"flagged at {fmt(m['threshold'])}: per patient, mean {100 * neg['mean']:.1f}%, median "
                      f"{100 * neg['median']:.1f}%, worst {100 * neg['max']:.1f}% of its patches (each flagged patch is "
                      "one a pathologist would look at for nothing)."]
    if "all_labelled" in metrics:
        a = metrics["all_labelled"]
        lines += ["", f"Annotated windows and easy negatives mixed (the headline before; easy negatives lift it): "
                      f"accuracy {with_ci(a, 'accuracy')}, PR-AUC {with_ci(a, 'pr_auc')} on {a['n']} patches."]
    notes = _interval_notes(m, "patch") + _interval_notes(half, "patch at 0.5") + \
        [n for s in names for n in _interval_notes(src[s], s)]
    cal = m.get("calibration")
    if cal:
        notes += [f"Calibration of the patch scores: Brier {fmt(cal['brier'])}, ECE {fmt(cal['ece'])} "
                  f"({cal['n_bins']} equal-width bins; `figures/reliability.png`). **The scores are not calibrated "
                  "probabilities**: training weights positives (pos_weight, n_negative / n_positive by default), which "
                  "shifts the logits, so the 'at 0.5' column is not a calibrated operating point; the threshold was "
                  "chosen on validation for F1."]
    return lines + ([""] + notes if notes else [])


def _grade_and_prevalence(cols: dict) -> list[str]:
    """Sensitivity per grade (BAIXA: few scattered bacteria, the hard case; ALTA) and PPV/NPV at stated
    prevalences, for each column of the patient table."""
    shown = {name: c for name, c in cols.items() if c.get("by_grade")}
    if not shown:
        return []
    cell = lambda g: (f"{g['found']}/{g['n']} = {fmt(g['sensitivity'])} [{fmt(g['ci95'][0])}, {fmt(g['ci95'][1])}]"
                      if g["n"] else "no patient")
    lines = ["", "Sensitivity by grade (exact binomial 95% CIs):", ""]
    lines += _table(["grade", *shown], [[grade, *[cell(c["by_grade"][grade]) for c in shown.values()]]
                                        for grade in ("BAIXA", "ALTA")])
    prevs = next(iter(shown.values())).get("predictive_values") or {}
    if prevs:
        lines += ["", "PPV / NPV at stated prevalences of infection (Bayes, from each column's sensitivity and "
                      "specificity; a split's own infected share is not the clinic's), [95% CI] from the exact "
                      "bounds of sensitivity and specificity at 97.5% each (the pair holds 95% jointly):", ""]
        lines += _table(["prevalence", *shown], [[prev, *[
            predictive_cell(c["predictive_values"][prev]) if prev in c.get("predictive_values", {}) else "-"
            for c in shown.values()]] for prev in prevs])
    return lines


def predictive_cell(v: dict) -> str:
    """`PPV 0.500 [0.014, 1.000] / NPV 0.990 [0.950, 1.000]`: a predictive value is never shown bare."""
    ci = lambda k: f" [{fmt(v[k + '_ci95'][0])}, {fmt(v[k + '_ci95'][1])}]" if k + "_ci95" in v else ""
    return f"PPV {fmt(v['ppv'])}{ci('ppv')} / NPV {fmt(v['npv'])}{ci('npv')}"


def _below_chance(cols: dict) -> list[str]:
    low = [f"{name} ({fmt(c['roc_auc'])})" for name, c in cols.items()
           if isinstance(c.get("roc_auc"), float) and c["roc_auc"] < 0.5]
    return ["", f"**ROC-AUC below 0.5** in {', '.join(low)}: the scores rank these patients the wrong way round. On "
                "a handful of patients that can be chance (see the intervals), but it is not a result to pass over: "
                "look at the per-patient rows below."] if low else []


def _patient_section(metrics: dict, patient_rows: list[dict]) -> list[str]:
    p, headline = metrics["patient"], metrics["meta"].get("headline", "val")
    lines = ["", "## Patient level", "", "Each patient's score aggregates ALL its Cropped patches (HoldOut: all its "
             "patches): `fraction_positive` = share of patches scoring >= the patch threshold, `top_share_mean` = "
             f"mean of the highest {100 * (p.get('top_share') or 0):g}% of scores (at least one): both are the same "
             "for a patient of 25 or 2,000 patches, so a rule chosen on Cropped folders transfers to HoldOut "
             f"folders of another size. `topk_mean` (mean of the {p['top_k']} highest scores) is listed but not chosen: it grows "
             "with the patch count. Annotated windows are not used: they were picked knowing the "
             "diagnosis. Label: NEGATIVA = 0, BAIXA/ALTA = 1."]
    if p["rule"]:
        lines += ["", f"Rule chosen on the validation patients (best Youden's J, then ROC-AUC): **{p['rule']} >= "
                      f"{fmt(p['threshold'], 4)}**. **Validation patient numbers are optimistic**: rule and threshold "
                      "were tuned on these same patients. The test and HoldOut columns apply them unchanged.", ""]
        chosen_on = metrics["selection"]["patient"] if headline == "test" else p
        lines += _table(["rule", "Youden's J (val)", "ROC-AUC (val)", "threshold"],
                        [[r, c["youden_j"], c["roc_auc"], c["threshold"]] for r, c in chosen_on["candidates"].items()])
    else:
        lines += ["", f"No patient rule: {p['reason']}."]
    cols = {"test (rule applied as is)": p, "validation (selection set, optimistic)": metrics["selection"]["patient"]} \
        if headline == "test" else {"validation (tuned here; no untouched set)": p}
    if "holdout" in metrics:
        cols["HoldOut (rule applied as is)"] = metrics["holdout"]["patient"]
    lines += [""] + _table(["metric", *cols], [[NAMES[k], *[with_ci(c, k) for c in cols.values()]]
                                               for k in PATIENT_METRICS] +
                           [["patients (infected)", *[f"{c['n']} ({c['positives']})" for c in cols.values()]]])
    lines += [""] + [n for name, c in cols.items() for n in _interval_notes(c, name.split()[0])]
    lines += _grade_and_prevalence(cols) + _below_chance(cols)
    counts = {name: c["patch_counts"] for name, c in cols.items() if c.get("patch_counts")}
    if counts:
        lines += ["", "Patches per patient (min / median / max): " + "; ".join(
            f"{name.split()[0]} {c['min']} / {fmt(c['median'], 0)} / {c['max']}" for name, c in counts.items()) + "."]
    for name, c in cols.items():
        if c.get("excluded"):
            left_out = ", ".join(f"{k} ({v})" for k, v in c["excluded"].items())
            lines += ["", f"Left out of {name.split()[0]}: {left_out}"]
    lines += _patient_model_section(metrics, cols)
    lines += ["", "### Per patient", ""]
    shown = [c for c in PATIENT_COLUMNS if any(c in r for r in patient_rows)]
    lines += _table(shown, [[r.get(c) for c in shown] for r in patient_rows])
    return lines


def _patient_model_section(metrics: dict, rule_cols: dict) -> list[str]:
    """The patient model beside the rule, on the same patients, and the paired test between them."""
    meta = metrics["meta"]
    if "patient_mil" not in metrics:
        note = meta.get("patient_model_note")
        return ["", f"Patient model: {note}."] if note else []
    q = metrics["patient_mil"]
    model = meta["patient_model"]
    feats = model["features"]
    lines = ["", "### Patient model beside the rule", "",
             f"`{model['checkpoint']}` (train_patient.py): gated-attention MIL over each patient's bag of "
             f"{feats['source']} features ({feats['network'][:12]}, {feats['image_size']} px, stain "
             f"{feats['stain'] or 'none'}) of the same Cropped (HoldOut) patches the rule aggregates; trained on the "
             f"training patients, epoch {model['epoch']} chosen by {model['selection']} on the validation patients. "
             "Its threshold is chosen on the validation patients by Youden's J, as the rule's, and applied unchanged."]
    lines += _features_lines(model.get("features_json"), feats)
    if not q["rule"]:
        return lines + ["", f"No threshold for the patient model: {q['reason']}."]
    lines += ["", f"Threshold: **probability >= {fmt(q['threshold'], 4)}**.", ""]
    model_of = {"test": q, "HoldOut": metrics.get("holdout", {}).get("patient_mil"),
                "validation": metrics["selection"].get("patient_mil") if "selection" in metrics else q}
    sides = {}
    for name, c in rule_cols.items():  # "test (rule applied as is)": c -> test: rule | test: model
        part = name.split()[0]
        sides[f"{part}: rule"] = c
        if model_of.get(part):
            sides[f"{part}: model"] = model_of[part]
    lines += _table(["metric", *sides], [[NAMES[k], *[with_ci(c, k) for c in sides.values()]]
                                         for k in PATIENT_METRICS] +
                    [["patients (infected)", *[f"{c['n']} ({c['positives']})" for c in sides.values()]]])
    lines += _grade_and_prevalence({k: v for k, v in sides.items() if k.endswith("model")})
    lines += _below_chance({k: v for k, v in sides.items() if k.endswith("model")})
    cal = q.get("calibration")
    if cal:
        lines += ["", f"The model's probabilities on these patients: Brier {fmt(cal['brier'])}, "
                      f"{ece_text(cal, cal.get('n', q.get('n')))}; trained with "
                      "positives weighted, so not calibrated either. The rule's score is a share of patches or a "
                      "mean of patch scores: not a probability at all."]
    for where, cmp in ((meta.get("headline", "val"), metrics.get("patient_vs_mil")),
                       ("HoldOut", metrics.get("holdout", {}).get("patient_vs_mil"))):
        if not cmp:
            continue
        ci = (f"[{fmt(cmp['ci95'][0])}, {fmt(cmp['ci95'][1])}] ({cmp['ci_method']})" if "ci95" in cmp
              else f"(CI {cmp['ci_note']})")
        lines += ["", f"Paired on the {cmp['patients']} {PART.get(where, where)} patients: the rule alone right on "
                      f"{cmp['rule_only_correct']}, the model alone right on {cmp['model_only_correct']}: exact "
                      "McNemar "
                      f"p = {fmt(cmp['mcnemar_exact_p'])}; ROC-AUC difference (model - rule) "
                      f"{fmt(cmp['roc_auc_difference'])} {ci}."]
    att = q.get("attention")
    if att:
        lines += ["", f"Attention as evidence: on the {att['windows']} Annotated windows of these patients "
                      f"({att['positives']} with bacteria), windows the model never reads, the ROC-AUC of its raw "
                      f"attention score against Presence is {fmt(att['roc_auc'])} pooled, "
                      f"{fmt(att.get('within_patient_roc_auc'))} within patients (windows of one patient compared "
                      f"only with each other; {att.get('patients_with_both', '-')} patients have windows of both "
                      "kinds) (0.5: it looks anywhere; 1: it looks where the bacteria are). The most attended "
                      "patches: `attention_gallery.png`."]
    return lines


def ece_text(cal: dict, n) -> str:
    """The patient model's ECE with its n, or why it is not shown (fewer than ECE_MIN_PATIENTS patients)."""
    if n is not None and n >= ECE_MIN_PATIENTS:
        return f"ECE {fmt(cal['ece'])} ({cal['n_bins']} bins, n = {n} patients)"
    return (f"ECE not shown (n = {n} patients, below {ECE_MIN_PATIENTS}: its {cal['n_bins']} bins would hold a few "
            "patients each)")


def _features_lines(info: dict | None, feats: dict) -> list[str]:
    """features.json beside the patient model: what its training bags held, and the shift it measured."""
    seen = (info or feats).get("seen_in_training")
    total = (info or feats).get("training_bag_patches")
    if seen is None:
        return ["", "Training bags: not recorded (a patient model from before features.json); retrain it with "
                    "train_patient.py to know whether they held patches the encoder trained on."]
    lines = ["", f"Training bags (`features.json`): {total} patches, **{seen} of them training examples of the "
                 "encoder**" + (" (--allow-seen-patches): the patient model could tell training NEGATIVA patients by "
                                "the encoder's memory of their patches, which no validation, test or HoldOut patient "
                                "offers; read its numbers as optimistic." if seen else ".")]
    shift = (info or {}).get("patient_model_negatives")
    if shift:
        lines[-1] += (f" Mean patient-model probability of NEGATIVA patients: training "
                      f"{fmt(shift['train']['mean_probability'])} ({shift['train']['patients']}), validation "
                      f"{fmt(shift['val']['mean_probability'])} ({shift['val']['patients']}).")
    loss = (info or {}).get("patch_model_negatives_loss")
    if loss:
        lines[-1] += (f" The patch model's loss on NEGATIVA bag patches: training {fmt(loss['train']['loss'])}, "
                      f"validation {fmt(loss['val']['loss'])}.")
    return lines


def _selection_section(metrics: dict) -> list[str]:
    """The validation part's patch metrics: the patients that chose epoch, threshold and rule (optimistic)."""
    sel = metrics.get("selection")
    if not sel or "patch" not in sel:
        return []
    m = sel["patch"]
    lines = ["", "## Selection set (validation part, optimistic)", "", f"The {m['n']} labelled patches ({m['positives']} "
             "positive) of the patients that chose the epoch, the threshold and the patient rule: their numbers are "
             "biased upwards, PR-AUC and ROC-AUC included (the epoch was picked for its validation PR-AUC).", ""]
    lines += _table(["metric", f"at threshold {fmt(m['threshold'])}"],
                    [[NAMES[k], with_ci(m, k)] for k in PATCH_METRICS])
    notes = _interval_notes(m, "validation patch")
    return lines + ([""] + notes if notes else [])


def render_report(metrics: dict, files: list[str], patient_rows: list[dict]) -> str:
    lines = _header(metrics) + _patch_section(metrics) + _selection_section(metrics) + \
        _patient_section(metrics, patient_rows)
    d = metrics["meta"].get("decision")
    if d:  # the project's call (patients.csv `call`), as stored with the model
        lines += ["", "## The call", "", f"patients.csv's `call` comes from the **"
                  f"{'patient model' if d['call_by'] == 'patient_model' else 'patient rule'}** ({d['reason']}); a "
                  f"patient with fewer than {d['min_patches']} readable patches gets no call. "
                  + ("The rule, the thresholds and this choice were made on the validation part and stored with the "
                     "model, before any test or HoldOut patient was seen." if d["stored_with_model"] else
                     "This checkpoint stores no decision: the rule was chosen on the validation part here.")]
    undefined = _undefined({k: v for k, v in metrics.items() if k != "meta"})
    if undefined:
        lines += ["", "## Undefined metrics (NaN)", ""] + undefined
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in files if f.endswith(".png")
                                        and not f.startswith("gradcam")]
    cams = [f for f in files if f.startswith("gradcam")]
    if cams:
        cam = metrics["meta"].get("gradcam") or {}
        where = (f"layer `{cam['layer']}`, a {cam['map'][0]}x{cam['map'][1]} map for a {cam['input']} px patch"
                 + (f" ({cam['note']})" if cam.get("note") else "")) if cam else "the deepest spatial layer"
        lines += ["", "## Grad-CAM", "", f"Where the evidence for H. pylori (the logit) is strongest within each patch "
                  f"of the {PART[metrics['meta'].get('headline', 'val')]} ({where}; signed Grad-CAM upsampled and "
                  "min-max scaled per patch, so red means 'most positive here', not 'positive', and nothing finer than "
                  "one map cell is resolved), over the raw patch; the model saw the stain-normalized patch. Signed "
                  "maps: `gradcam/heatmaps.npz`.", ""]
        lines += [f"- [{Path(f).stem.replace('_', ' ')}]({f})" for f in cams if f.endswith(".png")]
    skipped = metrics["meta"]["skipped_images"]
    if skipped:
        lines += ["", f"## Skipped undecodable images ({len(skipped)})", ""] + [f"- `{p}`" for p in skipped[:50]]
    lines += ["", "## How to read this", "",
              "- Patient proportions carry exact binomial intervals of their counts. Patch CIs resample patient "
              "clusters, not patches (patches of one patient are correlated; patients sharing byte-identical images "
              "are one cluster); with fewer than 10 clusters in a class no interval is given. Resamples where a "
              "metric is undefined are dropped, and their share is listed above.",
              "- The CIs hold the thresholds fixed: they do not include the variability of choosing them.",
              "- The patch threshold, the patient rule and the epoch were chosen on the validation part: its numbers "
              "(PR-AUC and ROC-AUC too, since the epoch was picked for them) are optimistic. Only the test part "
              "(and the HoldOut) measure a model nothing was tuned on.",
              "- predictions.csv holds every score: recompute or re-aggregate anything from it."]
    return "\n".join(lines) + "\n"


def summary_lines(metrics: dict) -> list[str]:
    m, p = metrics["patch"], metrics["patient"]
    part = metrics["meta"].get("headline", "val")
    looks = metrics["meta"].get("looks") or {}
    show = lambda d, keys: "  ".join(f"{k} {with_ci(d, k)}" for k in keys)
    how = "untouched" if part == "test" else "tuned on them, NO UNTOUCHED SET"
    lines = [f"patch   {part}, {m['n']} patches ({m['positives']} positive), threshold {fmt(m['threshold'])}: "
             + show(m, ("pr_auc", "roc_auc", "recall", "precision", "f1")),
             f"patient {part}, {p['n']} patients ({p['positives']} infected), rule {p['rule']} >= {fmt(p['threshold'])}"
             f" ({how}): " + show(p, PATIENT_METRICS)]
    if "selection" in metrics:
        v, q = metrics["selection"].get("patch", {}), metrics["selection"]["patient"]
        lines.append(f"selection set (val, optimistic): patch PR-AUC {with_ci(v, 'pr_auc')}, patient accuracy "
                     f"{with_ci(q, 'accuracy')} on {q['n']} patients")
    q = metrics.get("patient_mil")
    if q and q["rule"]:
        c = metrics["patient_vs_mil"]
        lines.append(f"patient model {part}, {q['n']} patients, probability >= {fmt(q['threshold'])} (chosen on val): "
                     + show(q, PATIENT_METRICS)
                     + f"; vs rule: McNemar p {fmt(c['mcnemar_exact_p'])}, ROC-AUC difference "
                       f"{fmt(c['roc_auc_difference'])}")
    if "holdout" in metrics:
        h = metrics["holdout"]["patient"]
        lines.append(f"patient HoldOut, {h['n']} patients ({h['positives']} infected), same rule, not re-tuned: "
                     + show(h, PATIENT_METRICS))
        hq = metrics["holdout"].get("patient_mil")
        if hq and hq["rule"]:
            lines.append("patient model HoldOut, same threshold: "
                         + show(hq, PATIENT_METRICS))
    if looks:
        lines.append("looks: " + "; ".join(f"{PART_NAMES[k]}: look {v['look']} by this checkpoint"
                                           + (" (seen again: a repeat, not counted)" if v.get("repeat_of") else "")
                                           + f", {len(v['other_models'])} by other models" for k, v in looks.items()
                                           if k in PART_NAMES)
                     + "".join(f"; test part used to choose among {c['models']} models" for c in
                               looks.get("chosen_among", [])) + f" ({looks.get('ledger')})")
    return lines


def render_compare(table: dict) -> str:
    boot, part = table["bootstrap"], table.get("part", "val")
    lines = [f"# Comparison against `{table['baseline']}`", "",
             f"On the {len(table['patients'])} {PART.get(part, part)} patients all checkpoints share, each model with "
             f"its own threshold and patient rule, chosen on its own validation part. Deltas = model - baseline, 95% "
             f"CI from {boot['resamples']} paired patient-cluster bootstrap resamples (seed {boot['seed']}): the same "
             "clusters drawn for every model (none where fewer than 10 clusters hold a class), with the share of "
             "resamples where the delta was undefined (dropped from the CI).", "",
             f"**One verdict, on the primary metric declared before looking: `{table.get('primary')}`** (the patch "
             "PR-AUC). The other rows are descriptive: ten metrics tested at 95% each would show some 'difference' by "
             "chance, and a CI that contains 0 shows no difference, not that the models are equivalent."]
    if part == "val":
        lines += ["", "The validation part also chose each model's epoch, threshold and rule: every number here is "
                      "optimistic, for every model alike. Choose here; then evaluate the chosen checkpoint once."]
    else:
        lines += ["", f"**The test part was used to choose among {len(table['models'])} models.** The ledger "
                      f"(`{table.get('ledger')}`) records it, and every compared model's later report says so: its "
                      "test numbers are no longer untouched."]
    if not table["same_validation_patients"]:
        lines += ["", "**The checkpoints have different validation splits**: only the shared patients are compared, "
                      "and each model's threshold and rule were chosen on its own validation part."]
    for i, model in enumerate(table["models"][1:], start=1):
        lines += ["", f"## {i}. `{model['checkpoint']}`", ""]
        lines += _table(["metric", "role", "baseline", "this model", "delta [95% CI]", "undefined resamples",
                         "verdict"],
                        [[d["metric"], d["role"], d["baseline"], d["value"], f"{fmt(d['delta'])} "
                          f"[{fmt(d['ci95'][0])}, {fmt(d['ci95'][1])}]",
                          f"{100 * d['undefined_share']:.1f}%" if np.isfinite(d["undefined_share"]) else "-",
                          d["verdict"] or ("-" if d["role"] == "descriptive" else "undefined (no CI)")]
                         for d in table["deltas"] if d["model"] == i])
    return "\n".join(lines) + "\n"


def render_ensemble(table: dict) -> str:
    """evaluate.py --ensemble's report: the fold models' vote on the HoldOut beside each fold model alone."""
    ens, flagged = table["ensemble"], table["flagged"]
    lines = [f"# HoldOut: the ensemble of {table['k']} fold models", "",
             f"The ensemble's call: the {table['decision']['how']}. A tie is no call. The mean of the fold models' "
             "scores ranks the patients (ROC-AUC) only. Each fold model's thresholds were chosen on its own "
             "validation part and stored with it, never on the HoldOut. The HoldOut labels reach the metrics only.", "",
             " ".join(looks_lines(table["looks"], "this ensemble's fold models")), "",
             "Declare this one HoldOut model before looking; each fold model's own HoldOut numbers below are for "
             "reading the spread, not for choosing.", ""]
    if table.get("patient_model_missing"):
        lines += ["**No patient model in the ensemble**: "
                  + ", ".join(f"`{r}`" for r in table["patient_model_missing"]) + " has none (train_patient.py "
                  "--checkpoint RUN/best.pt), so the ensemble's call is the patient rule's vote.", ""]
    cols = {"ensemble: call": ens["call"], "ensemble: rule": ens["patient"]}
    if "patient_mil" in ens:
        cols["ensemble: model"] = ens["patient_mil"]
    for f in table["folds"]:
        cols[f"fold {f['fold']}: rule"] = f["patient"]
        if "patient_mil" in f:
            cols[f"fold {f['fold']}: model"] = f["patient_mil"]
    lines += _table(["metric", *cols], [[NAMES[k], *[with_ci(c, k) for c in cols.values()]]
                                        for k in PATIENT_METRICS] +
                    [["patients (infected)", *[f"{c['n']} ({c['positives']})" for c in cols.values()]]])
    lines += _grade_and_prevalence({k: v for k, v in cols.items() if k.startswith("ensemble")})
    lines += _below_chance(cols)
    share = lambda f: f"{f['positive']} of {f['patients']} ({fmt(f['flagged_share'])}), {f['no_call']} no call"
    lines += ["", "## Flagged HoldOut patients (no label read)", "",
              *_table(["model", "called positive", "call by", "patient rule", "model threshold"],
                      [["ensemble", share(flagged["ensemble"]), table["decision"]["ensemble"], "", ""]] +
                      [[f"fold {f['fold']}", share(f["flagged"]), f["decision"]["call_by"],
                        f"{f['decision']['patient_rule']} >= {fmt(f['decision']['patient_threshold'], 4)}",
                        fmt(f["decision"]["patient_model_threshold"], 4)] for f in table["folds"]])]
    lines += ["", "Fold runs: " + ", ".join(f"`{r}`" for r in table["runs"])]
    return "\n".join(lines) + "\n"
