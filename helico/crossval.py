"""Cross-validation pooling for `evaluate.py --cv runs/27-f*`: out-of-fold test predictions of K fold runs.

    python evaluate.py --cv runs/27-f0 runs/27-f1 runs/27-f2 runs/27-f3 runs/27-f4      # -> runs/27-cv/

Before anything is scored, the runs are checked to be the folds 0..K-1 of one split whose test parts are disjoint
and cover every patient (but the stain reference's, always in train): check_runs. Each fold's own evaluation (its
test part scored by the one model that never saw it) is reused when current_eval finds it written for this very
best.pt with the same flags, else evaluate.py writes it; this module then pools the test rows of their
predictions.csv and patients.csv. Pooled metrics: patch decisions at each fold's own threshold and patient
decisions by each fold's own rule (both chosen on that fold's val), PR-AUC/ROC-AUC over the pooled scores (models
differ in calibration: read the per-fold values too) and the fold-stratified ROC-AUC, the headline; intervals as in
a single evaluation (exact binomial for patient proportions, patient-cluster bootstrap BCa for patches and for the
fold-stratified ROC-AUC, not estimable under 10 clusters a class). Beside them, each fold's own test metrics as
mean +/- sd over the folds.
"""
from __future__ import annotations

import csv
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import DataError
from helico import analysis, metrics, splits
from helico import eval_report
from helico.eval_report import fmt

PATIENT_KEYS = ("accuracy", "sensitivity", "specificity")  # the proportions, with exact intervals
STRATIFIED = "roc_auc_fold_stratified"  # the headline ranking metric: pairs within a fold only


@dataclass
class Fold:
    run: Path
    split: dict
    predictions: list[dict]  # eval/predictions.csv rows
    patients: list[dict]     # eval/patients.csv rows
    metrics: dict            # eval/metrics.json


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


EVAL_FILES = ("predictions.csv", "patients.csv", "metrics.json")
# The flags of a fold's own evaluation that change what is pooled (its scores, its patient scores and decisions)
REUSE_FLAGS = ("top_k", "top_share", "amp", "skip_bad_images")


def read_fold(run: Path, eval_dir: Path | None = None, flag: str = "--cv") -> Fold:
    """A fold run and its evaluation (`eval_dir`, default run/eval: the test part scored by this fold's model)."""
    run = Path(run)
    eval_dir = Path(eval_dir) if eval_dir else run / "eval"
    for need in (run / "split.json", *(eval_dir / f for f in EVAL_FILES)):
        if not need.is_file():
            raise DataError(f"{flag} {run}: missing {need.relative_to(run)}; evaluate it: python evaluate.py "
                            f"--checkpoint {run / 'best.pt'}")
    return Fold(run, splits.load_split(run / "split.json"), read_csv(eval_dir / "predictions.csv"),
                read_csv(eval_dir / "patients.csv"), json.loads((eval_dir / "metrics.json").read_text()))


def current_eval(run: Path, sha256: str, flags: dict) -> Path | None:
    """The run's eval/ (or eval-holdout/, which holds the same test part) written for this very best.pt (its
    digest) with the same number-changing flags, or None: then the fold is evaluated again."""
    for name in ("eval", "eval-holdout"):
        folder = Path(run) / name
        try:
            meta = json.loads((folder / "metrics.json").read_text())["meta"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        used = meta.get("evaluation") or {}
        if meta.get("sha256") == sha256 and all(used.get(k) == flags.get(k) for k in REUSE_FLAGS) and \
                all((folder / f).is_file() for f in EVAL_FILES):
            return folder
    return None


MESSAGE = 200  # an error line a reader takes in at once: the first problem, and how many more


def one_line(head: str, problems: list[str]) -> str:
    first = problems[0] if len(problems[0]) <= MESSAGE - len(head) else problems[0][:MESSAGE - len(head) - 3] + "..."
    return f"{head}: {first}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def check_runs(runs: list[Path], patients: list[str], flag: str = "--cv") -> list[dict]:
    """Before anything is scored: every run holds best.pt and split.json, was trained as a fold, and together they
    are the folds of one cross-validation. Returns their splits."""
    for run in runs:
        for need in ("best.pt", "split.json"):
            if not (run / need).is_file():
                raise DataError(f"{flag} {run}: no {need} (give the train.py run folders of the folds, runs/27-f*)")
    fold_splits = [splits.load_split(run / "split.json") for run in runs]
    plain = [str(r) for r, s in zip(runs, fold_splits) if s.get("fold") is None or s.get("folds") is None]
    if plain:
        raise DataError(one_line(f"{flag}: not folds of one cross-validation", [
            f"{', '.join(plain[:3])}{' ...' if len(plain) > 3 else ''} trained without --folds K --fold i"]))
    problems = splits.fold_problems(fold_splits, patients)
    if problems:
        raise DataError(one_line(f"{flag}: not one cross-validation", problems))
    return fold_splits


def default_out(runs: list[Path]) -> Path:
    """runs/27-f0 ... runs/27-f4 -> runs/27-cv (the common name without its -f<i> suffix)."""
    stems = {re.sub(r"-f\d+$", "", Path(r).name) for r in runs}
    stem = stems.pop() if len(stems) == 1 else "cv"
    return Path(runs[0]).parent / f"{stem}-cv"


def check_folds(folds: list[Fold], patients: list[str], flag: str = "--cv") -> None:
    problems = splits.fold_problems([f.split for f in folds], patients)
    for f in folds:
        evaluated = sorted(f.metrics.get("meta", {}).get("test_patients") or [])
        if evaluated != sorted(f.split["test"]):
            problems.append(f"{f.run}: its evaluation scored other test patients than its split.json's (evaluate it "
                            f"again: python evaluate.py --checkpoint {f.run / 'best.pt'})")
    if problems:
        raise DataError(one_line(f"{flag}: not one cross-validation", problems))


def pooled_rows(folds: list[Fold], part: str = "test") -> tuple[list[dict], list[dict]]:
    """The `part` rows of every fold's predictions.csv and patients.csv, with the fold number added."""
    preds = [{**r, "fold": f.split.get("fold")} for f in folds for r in f.predictions if r["split"] == part]
    pats = [{**r, "fold": f.split.get("fold")} for f in folds for r in f.patients if r["split"] == part]
    return preds, pats


def patch_summary(rows: list[dict], groups, resamples: int, seed: int) -> dict:
    """Pooled patch metrics (decisions at each fold's threshold) with cluster-bootstrap CIs where estimable."""
    rows = [r for r in rows if r["patch_eval"] == "1" and r["source"] == "annotated"]  # the headline set
    y = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    s = np.array([float(r["score"]) for r in rows])
    pred = np.array([int(r["prediction"]) for r in rows], dtype=np.int64)

    folds = np.array([r["fold"] for r in rows])

    def point(idx):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = metrics.binary_metrics(y[idx], s[idx])  # ranking metrics from the scores
            m.update({k: getattr(metrics, k)(y[idx], pred[idx]) for k in ("recall", "precision", "f1", "accuracy")})
            m[STRATIFIED] = metrics.stratified_roc_auc(y[idx], s[idx], folds[idx]) if len(idx) else float("nan")
        return {k: m[k] for k in (*analysis.PATCH_METRICS, STRATIFIED)}
    out = {**point(np.arange(y.size)), "n": int(y.size), "positives": int(y.sum()),
           "confusion": metrics.confusion_matrix(y, pred).tolist()}
    cluster = metrics.cluster_index([r["patient"] for r in rows], groups)
    ok, why = metrics.estimable(cluster, y)
    if not ok or not resamples or not y.size:
        out["ci_note"] = why or "no bootstrap (--bootstrap 0)"
        return out
    draws = metrics.cluster_draws(int(cluster.max()) + 1, resamples, seed)
    boot = metrics.cluster_bootstrap(cluster, draws, point)
    jack = metrics.jackknife(cluster, int(cluster.max()) + 1, point)
    cis = {k: metrics.bca_interval(boot[k], out[k], jack[k]) for k in (*analysis.PATCH_METRICS, STRATIFIED)}
    out["ci95"] = {k: [lo, hi] for k, (lo, hi, _) in cis.items()}
    out["bootstrap_undefined_share"] = {k: u for k, (_, _, u) in cis.items()}
    return out


def patient_summary(rows: list[dict], decision: str = "prediction", groups=(), resamples: int = 0,
                    seed: int = 0) -> dict:
    """Pooled patient decisions (`decision`: the rule's, or mil_prediction: the patient model's; each fold's own
    threshold) with exact binomial metrics, and the fold-stratified ROC-AUC of their scores with the patient-cluster
    bootstrap (BCa) interval of the patch level."""
    used = [r for r in rows if int(r["label"]) >= 0 and r.get(decision) not in (None, "") and int(r[decision]) >= 0]
    excluded = {r["patient"]: "no diagnosis" if int(r["label"]) < 0 else "no decision (no patches counted, or no "
                "rule)" for r in rows if r not in used}
    score = "mil_probability" if decision == "mil_prediction" else "score"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stratified = metrics.stratified_roc_auc([int(r["label"]) for r in used], [float(r[score]) for r in used],
                                                [r["fold"] for r in used]) if used else float("nan")
    rows = used
    y = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    p = np.array([int(r[decision]) for r in rows], dtype=np.int64)
    (tn, fp), (fn, tp) = metrics.confusion_matrix(y, p).tolist()
    counts = {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp), "accuracy": (tp + tn, y.size)}
    out = {**{k: k_ / n if n else float("nan") for k, (k_, n) in counts.items()},
           "ci95": {k: list(metrics.clopper_pearson(k_, n)) for k, (k_, n) in counts.items()},
           "ci_method": "exact binomial (Clopper-Pearson)", "n": int(y.size), "positives": int(y.sum()),
           "confusion": [[tn, fp], [fn, tp]], STRATIFIED: stratified, "excluded": excluded}
    stratified_interval(out, y, np.array([float(r[score]) for r in rows]), np.array([r["fold"] for r in rows]),
                        [r["patient"] for r in rows], groups, resamples, seed)
    return out


def stratified_interval(out: dict, y, s, folds, patients, groups, resamples: int, seed: int) -> None:
    """The fold-stratified ROC-AUC's patient-cluster bootstrap (BCa) interval into out["ci95"], or why none."""
    cluster = metrics.cluster_index(patients, groups)
    ok, why = metrics.estimable(cluster, y) if y.size else (False, "no patient")
    if not ok or not resamples:
        out["ci_note"] = why or "no bootstrap (--bootstrap 0)"
        return

    def point(idx):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {STRATIFIED: metrics.stratified_roc_auc(y[idx], s[idx], folds[idx]) if len(idx) else float("nan")}
    n = int(cluster.max()) + 1
    boot = metrics.cluster_bootstrap(cluster, metrics.cluster_draws(n, resamples, seed, stream=1), point)
    lo, hi, undefined = metrics.bca_interval(boot[STRATIFIED], out[STRATIFIED],
                                             metrics.jackknife(cluster, n, point)[STRATIFIED])
    out["ci95"][STRATIFIED] = [lo, hi]
    out["ci_method_" + STRATIFIED] = analysis.BOOTSTRAP_METHOD
    out["bootstrap_undefined_share"] = {STRATIFIED: undefined}


def per_fold(folds: list[Fold]) -> dict:
    """Each fold's own headline (test) metric: values, mean and sd (ddof 1) over the folds."""
    out = {}
    levels = [("patch", analysis.PATCH_METRICS), ("patient", analysis.PATIENT_METRICS)]
    if all("patient_mil" in f.metrics for f in folds):
        levels.append(("patient_mil", analysis.PATIENT_METRICS))
    for level, keys in levels:
        for k in keys:
            v = np.array([float(f.metrics.get(level, {}).get(k, float("nan"))) for f in folds])
            ok = v[np.isfinite(v)]
            out[f"{level}.{k}"] = {"values": v.tolist(), "mean": float(ok.mean()) if ok.size else float("nan"),
                                   "sd": float(ok.std(ddof=1)) if ok.size > 1 else float("nan")}
    return out


def without_model(folds: list[Fold]) -> list[str]:
    """The fold runs evaluated without their patient model (train_patient.py): the patient model is then pooled from
    none of them, and the report names them."""
    return [str(f.run) for f in folds if "patient_mil" not in f.metrics] if any("patient_mil" in f.metrics
                                                                                for f in folds) else []


def with_model(folds: list[Fold], pats: list[dict]) -> bool:
    """Every fold evaluated with its patient model (train_patient.py): then its decisions are pooled too."""
    return all("patient_mil" in f.metrics for f in folds) and all(r.get("mil_prediction") not in (None, "")
                                                                   for r in pats)


def summarize(folds: list[Fold], resamples: int, seed: int) -> tuple[dict, list[dict], list[dict]]:
    preds, pats = pooled_rows(folds)
    groups = [g for f in folds[:1] for g in f.split.get("duplicate_groups") or []]
    result = {"folds": [str(f.run) for f in folds], "k": len(folds),
              "patch": patch_summary(preds, groups, resamples, seed),
              "patient": patient_summary(pats, "prediction", groups, resamples, seed),
              "per_fold": per_fold(folds),
              **({"patient_mil": patient_summary(pats, "mil_prediction", groups, resamples, seed)}
                 if with_model(folds, pats) else {}),
              "patient_model_missing": without_model(folds),
              "patients_tested": sorted({r["patient"] for r in pats}),
              "bootstrap": {"resamples": resamples, "seed": seed, "unit": "patient cluster"}}
    return result, preds, pats


def render(result: dict) -> str:
    ci = lambda m, k: (f"{fmt(m[k])} [{fmt(m['ci95'][k][0])}, {fmt(m['ci95'][k][1])}]" if k in m.get("ci95", {})
                       else f"{fmt(m[k])} (CI {m.get('ci_note', 'none')})")
    pf = result["per_fold"]
    sd = lambda name: f"{fmt(pf[name]['mean'])} +/- {fmt(pf[name]['sd'])}"
    p, q = result["patch"], result["patient"]
    looked = eval_report.looks_lines(result.get("looks"), "these fold models")
    lines = [f"# Cross-validation over {result['k']} folds", "",
             f"Out-of-fold test predictions pooled: every patient scored by the one model that never saw it "
             f"({len(result['patients_tested'])} patients). Test parts checked disjoint and covering every patient "
             f"but the stain reference's. Decisions: each fold's own threshold and patient rule, chosen on its val.",
             *(["", " ".join(looked)] if looked else []), "",
             f"## Patients ({q['n']}, {q['positives']} infected), exact binomial 95% CIs", "",
             "| metric | pooled [95% CI] | per fold mean +/- sd |", "|---|---|---|"]
    lines += [f"| {k} | {ci(q, k)} | {sd('patient.' + k)} |" for k in PATIENT_KEYS]
    lines += [f"| roc_auc, fold-stratified (pairs within a fold; patient-cluster bootstrap BCa) | "
              f"{ci(q, STRATIFIED)} | {sd('patient.roc_auc')} |"]
    if q.get("excluded"):
        lines += ["", f"Left out of the {q['n']}: " + ", ".join(f"{k} ({v})" for k, v in q["excluded"].items())]
    if result.get("patient_model_missing"):
        lines += ["", "**Patient model left out of the pooling**: no patient model (train_patient.py) was evaluated "
                      "with " + ", ".join(f"`{r}`" for r in result["patient_model_missing"]) + "."]
    if "patient_mil" in result:
        m = result["patient_mil"]
        lines += ["", f"## Patients, patient model (train_patient.py, each fold's own; {m['n']} patients, "
                      f"{m['positives']} infected), exact binomial 95% CIs", "",
                  "| metric | pooled [95% CI] | per fold mean +/- sd |", "|---|---|---|"]
        lines += [f"| {k} | {ci(m, k)} | {sd('patient_mil.' + k)} |" for k in PATIENT_KEYS]
        lines += [f"| roc_auc, fold-stratified (pairs within a fold; patient-cluster bootstrap BCa) | "
                  f"{ci(m, STRATIFIED)} | {sd('patient_mil.roc_auc')} |"]
    lines += ["",
              f"## Patches ({p['n']}, {p['positives']} positive), patient-cluster bootstrap 95% CIs", "",
              "| metric | pooled [95% CI] | per fold mean +/- sd |", "|---|---|---|"]
    lines += [f"| roc_auc, fold-stratified (pairs within a fold: the headline) | {ci(p, STRATIFIED)} "
              f"| {sd('patch.roc_auc')} |"]
    lines += [f"| {k}{' (pooled across folds)' if k in ('pr_auc', 'roc_auc') else ''} | {ci(p, k)} | "
              f"{sd('patch.' + k)} |" for k in analysis.PATCH_METRICS]
    undefined = {k: v for k, v in p.get("bootstrap_undefined_share", {}).items() if v}
    if undefined:
        lines += ["", "Resamples where a metric was undefined (dropped from its interval): " +
                  ", ".join(f"{k} {100 * v:.1f}%" for k, v in undefined.items())]
    lines += ["", "Folds: " + ", ".join(f"`{r}`" for r in result["folds"]),
              "", "Pooled PR-AUC and ROC-AUC compare scores of different models, whose scales differ (one fold's "
              "model may score everything higher): read the fold-stratified ROC-AUC, which compares pairs within a "
              "fold only, and the per-fold PR-AUC mean. The intervals hold the K fitted models fixed: they do not "
              "include the variability of training them again."]
    return "\n".join(lines) + "\n"
