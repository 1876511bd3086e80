"""What evaluate.py measures, from scored patches: which patches count towards what, the patient aggregation and
its rule, patch- and patient-level metrics with their intervals, and --compare's paired deltas.

    rows, identical = analysis.count_identical_once(analysis.evaluation_rows(data, {"val": val}),
                                                    identity.identical_files(data))
    # ... evaluate.py scores the rows into an analysis.Predictions ...
    result, patient_rows, boot = analysis.measure_part(pred, val, data.diagnosis, threshold, top_k, groups, draws)

- patches: the headline is the part's annotated windows (pathologist-reviewed positives and hard negatives, what
  train.py's validation chose the epoch and threshold on), each file once (Aug copies are not evaluated;
  byte-identical files count once), at the stored threshold and at 0.5; the Cropped patches of NEGATIVA patients
  (easy negatives) are reported as each NEGATIVA patient's false-positive rate, and by source;
- patients: all their Cropped (or HoldOut) patches aggregated two count-invariant ways (fraction above the patch
  threshold, mean of the top 10% of scores; the top-k mean is reported, not chosen: it grows with the patch count);
  the rule and threshold are chosen on validation (Youden's J) and applied unchanged to test and HoldOut;
- intervals: exact Clopper-Pearson for patient proportions, a patient-cluster bootstrap (a duplicate group is one
  cluster) for patch metrics and patient ROC-AUC, "not estimable" below metrics.MIN_CLUSTERS clusters in a class.

No torch and no files here: evaluate.py scores, eval_report.py and figures.py write; metrics.py defines the
metrics and the interval methods used here.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

import common
from helico import identity, metrics

PATCH_METRICS = ("pr_auc", "roc_auc", "recall", "precision", "f1", "accuracy")
THRESHOLD_METRICS = ("recall", "precision", "f1", "accuracy")
PATIENT_METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")
# The patient rule's candidates: statistics that do not grow with a patient's patch count, so a rule chosen on
# Cropped folders transfers to HoldOut folders of another size. topk_mean (the mean of a fixed k highest scores) does
# grow with the count (a negative patient: 0.061 / 0.103 / 0.148 / 0.186 at 25 / 100 / 500 / 2000 patches): it is
# still computed and written to patients.csv, but no longer chosen.
RULES = ("fraction_positive", "top_share_mean")
TOP_SHARE = 0.1  # top_share_mean: the mean of the highest ceil(TOP_SHARE * n) scores of a patient's n patches
INFECTED = ("BAIXA", "ALTA")


# ----------------------------------------------------------------------------------------------- which patches
@dataclass
class Predictions:
    """One row per scored patch (predictions.csv): the raw material of every metric, CI and re-aggregation."""
    samples: list
    split: np.ndarray         # val | test | holdout
    patch_eval: np.ndarray    # counted in patch-level metrics: a labelled window of a validation patient, once
    patient_eval: np.ndarray  # aggregated into its patient's score: a Cropped (or HoldOut) patch
    score: np.ndarray

    def subset(self, mask) -> "Predictions":
        return Predictions([s for s, k in zip(self.samples, mask) if k], self.split[mask], self.patch_eval[mask],
                           self.patient_eval[mask], self.score[mask])

    label = property(lambda self: np.array([s.label for s in self.samples], dtype=np.int64))
    patient = property(lambda self: np.array([s.patient for s in self.samples], dtype=object))
    source = property(lambda self: np.array([s.source for s in self.samples], dtype=object))


class Row(NamedTuple):
    """A patch to score and what it counts towards."""
    sample: common.Sample
    split: str            # val | test | holdout
    patch_eval: bool      # a labelled window of a val or test patient, once
    patient_eval: bool    # a Cropped (or HoldOut) patch, aggregated into its patient's score


def evaluation_rows(data: common.HelicoData, parts: dict[str, list[str]], holdout: list[str] = ()) -> list[Row]:
    """Each file once: a supplemental negative is both a labelled window and a Cropped patch of its patient.
    `parts`: split part -> patients, e.g. {"val": [...], "test": [...]}."""
    rows: dict[str, Row] = {}
    for part, patients in parts.items():
        for s in common.select(data.labelled, patients):
            rows[s.path] = Row(s, part, True, False)
        for s in common.select(data.cropped, patients):
            rows[s.path] = rows.get(s.path, Row(s, part, False, False))._replace(patient_eval=True)
    for s in common.select(data.holdout, holdout):
        rows[s.path] = Row(s, "holdout", False, True)
    return list(rows.values())


def count_identical_once(rows: list[Row], identical: dict[str, list[str]]) -> tuple[list[Row], list[str]]:
    """Rows without repeats of byte-identical content (`identical`: identity.identical_files): among the patch-level
    rows and, separately, among the patient-level rows, only the first file (by path) of each content counts
    (identity.first_copies, as train.py's validation), so a slide filed under two patient IDs (B22-200/B22-201) is not
    counted twice. Returns the rows kept and the paths no longer counted anywhere."""
    counts = {}
    for role in ("patch_eval", "patient_eval"):
        paths = [r.sample.path for r in rows if getattr(r, role)]
        counts[role] = {p for p, keep in zip(paths, identity.first_copies(paths, identical)) if keep}
    kept, dropped = [], []
    for r in rows:
        r = r._replace(patch_eval=r.sample.path in counts["patch_eval"],
                       patient_eval=r.sample.path in counts["patient_eval"])
        (kept if r.patch_eval or r.patient_eval else dropped).append(r)
    return kept, sorted(r.sample.path for r in dropped)


# ----------------------------------------------------------------------------------------------- patients
def top_share_mean(sorted_scores: np.ndarray, share: float = TOP_SHARE) -> float:
    """Mean of the highest ceil(share * n) of n ascending-sorted scores (at least one): count-invariant."""
    n = sorted_scores.size
    return float(sorted_scores[-max(1, int(np.ceil(share * n))):].mean()) if n else float("nan")


def patient_scores(pred: Predictions, patients: list[str], diagnosis: dict, patch_threshold: float, top_k: int,
                   top_share: float = TOP_SHARE):
    """One row per patient: the aggregate scores of its Cropped/HoldOut patches and its diagnosis label."""
    use = pred.patient_eval
    by_patient: dict[str, list[float]] = {}
    for p, s in zip(pred.patient[use], pred.score[use]):
        by_patient.setdefault(p, []).append(s)
    rows = []
    for p in patients:
        s = np.sort(np.asarray(by_patient.get(p, []), dtype=np.float64))
        dx = diagnosis.get(p)
        label = 1 if dx in INFECTED else 0 if dx == "NEGATIVA" else -1  # -1: not in PatientDiagnosis.csv
        rows.append({"patient": p, "diagnosis": dx or "", "label": label, "n_patches": int(s.size),
                     "fraction_positive": float(np.mean(s >= patch_threshold)) if s.size else float("nan"),
                     "topk_mean": float(s[-top_k:].mean()) if s.size else float("nan"),
                     "top_share_mean": top_share_mean(s, top_share)})
    return rows


def choose_patient_rule(rows: list[dict]) -> dict:
    """Pick the aggregation rule and its threshold on validation patients: best Youden's J, then ROC-AUC."""
    usable = [r for r in rows if r["label"] >= 0 and r["n_patches"] > 0]
    y = np.array([r["label"] for r in usable], dtype=np.int64)
    if y.size == 0 or y.min() == y.max():
        return {"rule": None, "threshold": float("nan"), "candidates": {},
                "reason": f"validation patients with Cropped patches and a diagnosis are all one class ({y.size} "
                          f"patients, {int(y.sum())} infected): no patient rule can be tuned"}
    cands = {}
    for rule in RULES:
        s = np.array([r[rule] for r in usable])
        t, j = metrics.youden_threshold(y, s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cands[rule] = {"threshold": t, "youden_j": j, "roc_auc": metrics.roc_auc(y, s)}
    rule = max(RULES, key=lambda r: (cands[r]["youden_j"], cands[r]["roc_auc"], -RULES.index(r)))
    return {"rule": rule, "threshold": cands[rule]["threshold"], "candidates": cands, "reason": ""}


# ----------------------------------------------------------------------------------------------- intervals
def clusters(patients: list[str], groups) -> tuple[dict[str, int], int]:
    """Cluster number of each patient (a duplicate group is one cluster) and the number of clusters."""
    c = metrics.cluster_index(patients, groups)
    return dict(zip(patients, c.tolist())), int(c.max()) + 1 if len(c) else 0


def part_draws(patients: list[str], groups, resamples: int, seed: int, stream: int = 0):
    """Cluster resamples of one part, shared by all its metrics (and by every model under --compare: paired)."""
    n = clusters(patients, groups)[1]
    return metrics.cluster_draws(n, resamples, seed, stream) if resamples and n else None


BOOTSTRAP_METHOD = "patient-cluster bootstrap, BCa"


def bootstrap_cis(point: dict, boot: dict[str, np.ndarray], keys, note: str, jack: dict | None = None) -> None:
    """BCa CIs (bias-corrected and accelerated: the jackknife over clusters in `jack`) and each one's share of
    undefined resamples from `boot`, or `note` saying why there are none. With 10 + 10 patient clusters the plain
    percentile interval covered 88% for a nominal 95% (tests/test_intervals.py's simulation)."""
    if boot:
        for k in keys:
            lo, hi, undefined = metrics.bca_interval(boot[k], point.get(k, float("nan")), (jack or {}).get(k, []))
            point.setdefault("ci95", {})[k] = [lo, hi]
            point.setdefault("ci_method", {})[k] = BOOTSTRAP_METHOD
            point.setdefault("bootstrap_undefined_share", {})[k] = undefined
    elif note:
        point.setdefault("ci_note", {}).update({k: note for k in keys})


def no_ci_reason(ok: bool, why: str, draws) -> str:
    return why if not ok else "" if draws is not None else "no bootstrap (--bootstrap 0)"


def patch_level(pred: Predictions, patients: list[str], threshold: float, groups, draws) -> tuple[dict, dict]:
    """Patch metrics at the stored threshold, at 0.5 and by source, with cluster-bootstrap CIs where estimable; and
    their raw bootstrap values (for --compare)."""
    patch = pred.patch_eval
    y, s, who, src = pred.label[patch], pred.score[patch], pred.patient[patch], pred.source[patch]
    cluster_of = clusters(patients, groups)[0]
    annotated = src == "annotated"  # the headline: pathologist-reviewed windows, what chose the epoch and threshold
    # (path in the metrics dict, which patches, threshold, metrics): ("by_source", "annotated") nests under by_source
    sets = [(("patch",), annotated, threshold, PATCH_METRICS), (("patch_at_0.5",), annotated, 0.5, THRESHOLD_METRICS),
            *((("by_source", k), src == k, threshold, PATCH_METRICS) for k in ("annotated", "supplemental")),
            (("all_labelled",), np.ones(len(y), bool), threshold, ())]  # descriptive: the old mix, no CI
    out, boot = {}, {}
    for name, mask, t, keys in sets:
        ym, sm = y[mask], s[mask]
        cm = np.array([cluster_of[p] for p in who[mask]], dtype=np.int64)
        ok, why = metrics.estimable(cm, ym) if keys else (False, "descriptive only (no interval)")

        def resampled(idx, ym=ym, sm=sm, t=t, keys=keys):
            return {k: v for k, v in metrics.binary_metrics(ym[idx], sm[idx], t).items() if k in keys}
        b = metrics.cluster_bootstrap(cm, draws, resampled) if ok and draws is not None else {}
        jack = metrics.jackknife(cm, int(cm.max()) + 1, resampled) if b else {}
        boot.update({".".join((*name, k)): v for k, v in b.items()})
        *parents, leaf = name
        parent = out
        for p in parents:
            parent = parent.setdefault(p, {})
        parent[leaf] = metrics.patch_metrics(ym, sm, t)
        bootstrap_cis(parent[leaf], b, keys, no_ci_reason(ok, why, draws), jack)
    out["patch"]["calibration"] = metrics.calibration(y[annotated], s[annotated])  # sigmoid scores as probabilities
    out["cropped_negatives"] = cropped_negatives(who[~annotated], s[~annotated], threshold)
    return out, boot


def cropped_negatives(patients, scores, threshold: float) -> dict:
    """The easy negatives (Cropped patches of NEGATIVA patients) as what they cost a pathologist: the share of each
    NEGATIVA patient's patches flagged at the threshold (its false-positive rate), summarized over those patients."""
    rates = {p: float(np.mean(scores[patients == p] >= threshold)) for p in sorted(set(patients.tolist()))}
    v = np.array(list(rates.values()))
    return {"patients": len(rates), "patches": int(len(scores)), "per_patient": rates,
            **({"mean": float(v.mean()), "median": float(np.median(v)), "max": float(v.max())} if v.size else {})}


def exact_cis(m: dict) -> None:
    """Clopper-Pearson intervals of the patient proportions, from their counts: never narrower than the data allow."""
    (tn, fp), (fn, tp) = m["confusion"]
    for k, (hits, n) in {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
                         "accuracy": (tp + tn, tn + fp + fn + tp)}.items():
        m.setdefault("ci95", {})[k] = list(metrics.clopper_pearson(hits, n))
        m.setdefault("ci_method", {})[k] = "exact binomial (Clopper-Pearson)"


def decide(rows: list[dict], score: str, prediction: str, rule: dict, patients: list[str], groups, draws,
           known: list[dict] | None = None) -> tuple[dict, dict]:
    """Write each row's decision (`prediction`: 1/0, -1 without a score) at the rule's threshold on `score`; metrics
    of the `known` rows (default: those with a diagnosis and patches) with CIs: exact for the proportions, a cluster
    bootstrap for ROC-AUC where estimable. Returns (metrics, raw bootstrap values)."""
    for r in rows:
        r[prediction] = int(r[score] >= rule["threshold"]) if np.isfinite(r[score]) else -1
    known = [r for r in rows if r["label"] >= 0 and r["n_patches"] > 0] if known is None else known
    y = np.array([r["label"] for r in known], dtype=np.int64)
    s = np.array([r[score] for r in known], dtype=np.float64)
    m = metrics.patient_metrics(y, s, rule["threshold"])
    b = {}
    if not rule["rule"]:  # no rule, no predictions: every metric is undefined, for the reason the rule gives
        m.update({k: float("nan") for k in PATIENT_METRICS}, undefined={k: rule["reason"] for k in PATIENT_METRICS})
        return m, b
    exact_cis(m)
    m["by_grade"] = by_grade(known, prediction)
    (tn, fp), (fn, tp) = m["confusion"]
    m["predictive_values"] = metrics.predictive_values(tp, tp + fn, tn, tn + fp) if tp + fn and tn + fp else {}
    cluster_of = clusters(patients, groups)[0]
    ck = np.array([cluster_of[r["patient"]] for r in known], dtype=np.int64)
    ok, why = metrics.estimable(ck, y)
    roc = lambda idx: {"roc_auc": metrics.patient_metrics(y[idx], s[idx], rule["threshold"])["roc_auc"]}
    jack = {}
    if ok and draws is not None:
        b = metrics.cluster_bootstrap(ck, draws, lambda idx: {k: v for k, v in metrics.patient_metrics(
            y[idx], s[idx], rule["threshold"]).items() if k in PATIENT_METRICS})
        jack = metrics.jackknife(ck, int(ck.max()) + 1, roc)
    bootstrap_cis(m, {k: v for k, v in b.items() if k == "roc_auc"}, ["roc_auc"], no_ci_reason(ok, why, draws), jack)
    return m, b


def by_grade(known: list[dict], prediction: str) -> dict:
    """Sensitivity per grade with its exact interval: BAIXA (few, scattered bacteria: the hard case) and ALTA."""
    out = {}
    for grade in INFECTED:
        rows = [r for r in known if r.get("diagnosis") == grade]
        found = sum(r[prediction] == 1 for r in rows)
        out[grade] = {"sensitivity": found / len(rows) if rows else float("nan"), "found": int(found),
                      "n": len(rows), "ci95": list(metrics.clopper_pearson(found, len(rows))),
                      "ci_method": "exact binomial (Clopper-Pearson)"}
    return out


def patch_counts(rows: list[dict]) -> dict:
    """Patches per patient over `rows` (min / median / max): what a count-dependent statistic would depend on."""
    counts = np.array([r["n_patches"] for r in rows])
    return {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())} \
        if counts.size else {}


def left_out(rows: list[dict], used: set) -> dict[str, str]:
    return {r["patient"]: "no diagnosis" if r["label"] < 0 else "no patches (or only byte-identical copies of "
            "another patient's)" for r in rows if r["patient"] not in used}


def patient_level(pred: Predictions, patients: list[str], diagnosis: dict, patch_threshold: float, top_k: int,
                  groups, draws, rule: dict | None, top_share: float = TOP_SHARE) -> tuple[dict, list[dict], dict]:
    """Patient scores, the rule (chosen here when `rule` is None), metrics with CIs (exact for the proportions, a
    cluster bootstrap for ROC-AUC where estimable), and raw bootstrap values (for --compare)."""
    rows = patient_scores(pred, patients, diagnosis, patch_threshold, top_k, top_share)
    rule = rule or choose_patient_rule(rows)
    for r in rows:
        r["score"] = r[rule["rule"]] if rule["rule"] else float("nan")
    m, b = decide(rows, "score", "prediction", rule, patients, groups, draws)
    used = {r["patient"] for r in rows if r["label"] >= 0 and r["n_patches"] > 0}
    m = {**m, **{k: rule[k] for k in ("rule", "candidates", "reason")}, "top_k": top_k, "top_share": top_share,
         "excluded": left_out(rows, used), "patch_counts": patch_counts([r for r in rows if r["patient"] in used])}
    return m, rows, {f"patient.{k}": v for k, v in b.items()}


# ----------------------------------------------------------------------------------------------- the patient model
MIL_RULE = "gated_attention_mil"


def choose_mil_threshold(rows: list[dict]) -> dict:
    """The patient model's threshold on its validation probabilities, as the rule's (Youden's J), on the patients the
    rule is measured on."""
    usable = [r for r in rows if r["label"] >= 0 and r["n_patches"] > 0 and np.isfinite(r["mil_probability"])]
    y = np.array([r["label"] for r in usable], dtype=np.int64)
    if y.size == 0 or y.min() == y.max():
        return {"rule": None, "threshold": float("nan"), "candidates": {},
                "reason": f"validation patients with a bag and a diagnosis are all one class ({y.size} patients, "
                          f"{int(y.sum())} infected): no threshold can be chosen"}
    s = np.array([r["mil_probability"] for r in usable])
    t, j = metrics.youden_threshold(y, s)
    return {"rule": MIL_RULE, "threshold": t, "candidates": {MIL_RULE: {"threshold": t, "youden_j": j,
                                                                        "roc_auc": metrics.roc_auc(y, s)}},
            "reason": ""}


def mil_level(rows: list[dict], probability: dict[str, float], patients: list[str], groups, draws,
              rule: dict | None, top_k: int) -> tuple[dict, dict]:
    """The patient model's metrics on the rows the rule was measured on (same patients, same intervals), its
    threshold chosen here when `rule` is None (validation). Adds mil_probability / mil_prediction to the rows."""
    for r in rows:  # the rule's patients: one whose patches all count for another (a byte-identical copy) has none
        r["mil_probability"] = float(probability.get(r["patient"], float("nan"))) if r["n_patches"] else float("nan")
    rule = rule or choose_mil_threshold(rows)
    known = [r for r in rows if r["label"] >= 0 and r["n_patches"] > 0 and np.isfinite(r["mil_probability"])]
    m, b = decide(rows, "mil_probability", "mil_prediction", rule, patients, groups, draws, known)
    m["calibration"] = {**metrics.calibration([r["label"] for r in known], [r["mil_probability"] for r in known], 5),
                        "n": len(known)}
    m = {**m, **{k: rule[k] for k in ("rule", "candidates", "reason")}, "top_k": top_k, "top_share": None,
         "excluded": left_out(rows, {r["patient"] for r in known}), "patch_counts": patch_counts(known)}
    return m, {f"patient_mil.{k}": v for k, v in b.items()}


def paired_comparison(rows: list[dict], patients: list[str], groups=(), draws=None) -> dict:
    """Rule vs patient model on the same patients: exact McNemar on the discordant decisions, and the paired
    patient-cluster bootstrap interval of the ROC-AUC difference (model - rule), the point and every resample on the
    patients where both decide (the same rows for both scores)."""
    both = [r for r in rows if r["label"] >= 0 and r["prediction"] >= 0 and r["mil_prediction"] >= 0]
    y = np.array([r["label"] for r in both], dtype=np.int64)
    rule_ok = np.array([r["prediction"] for r in both]) == y
    mil_ok = np.array([r["mil_prediction"] for r in both]) == y
    b, c = int((rule_ok & ~mil_ok).sum()), int((~rule_ok & mil_ok).sum())
    rule_s = np.array([r["score"] for r in both], dtype=np.float64)
    mil_s = np.array([r["mil_probability"] for r in both], dtype=np.float64)

    def delta(idx):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {"d": metrics.roc_auc(y[idx], mil_s[idx]) - metrics.roc_auc(y[idx], rule_s[idx])
                    if len(idx) else float("nan")}
    out = {"patients": len(both), "rule_only_correct": b, "model_only_correct": c,
           "mcnemar_exact_p": metrics.mcnemar_exact(b, c), "roc_auc_difference": float(delta(np.arange(y.size))["d"])}
    cluster_of = clusters(patients, groups)[0]
    ck = np.array([cluster_of[r["patient"]] for r in both], dtype=np.int64)
    ok, why = metrics.estimable(ck, y)
    if ok and draws is not None:
        lo, hi, undefined = metrics.percentile_interval(metrics.cluster_bootstrap(ck, draws, delta)["d"])
        out.update(ci95=[lo, hi], ci_method="paired patient-cluster bootstrap", bootstrap_undefined_share=undefined)
    else:
        out["ci_note"] = no_ci_reason(ok, why, draws) or "not estimable"
    return out


def attention_evidence(scores, presence, patients=None) -> dict:
    """Does the patient model attend where the bacteria are? ROC-AUC of the raw attention score of Annotated windows
    (which the model never reads) against their Presence label (1 vs -1), pooled over the part's patients, and
    within patients (`patients`: each window's; metrics.stratified_roc_auc): pooled, a patient whose windows all
    score high counts as attention on bacteria; within, only windows of one patient are compared."""
    y, s = np.asarray(presence, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auc = metrics.roc_auc(y, s) if y.size else float("nan")
    within = metrics.stratified_roc_auc(y, s, patients) if patients is not None and y.size else float("nan")
    mixed = len({p for p, yy in zip(patients, y) if yy == 1} & {p for p, yy in zip(patients, y) if yy == 0}) \
        if patients is not None else 0
    undefined = {} if np.isfinite(auc) else {"roc_auc": "the windows hold one class only (or none)"}
    if not np.isfinite(within):
        undefined["within_patient_roc_auc"] = "no patient has windows with and without bacteria"
    return {"roc_auc": auc, "within_patient_roc_auc": within, "patients_with_both": mixed, "windows": int(y.size),
            "positives": int(y.sum()), "undefined": undefined}


def measure_part(pred: Predictions, patients: list[str], diagnosis: dict, patch_threshold: float, top_k: int,
            groups=(), draws=None, rule: dict | None = None, mil_probability: dict | None = None,
            mil_rule: dict | None = None, top_share: float = TOP_SHARE) -> tuple[dict, list[dict], dict]:
    """Metrics dict, patient rows and raw bootstrap values ({"patch.pr_auc": array, ...}) of one set of patients.

    Validation (rule None): the patient rule is chosen here. Test and HoldOut: `rule` comes from validation. With
    the patient model's probabilities (patient -> probability): `patient_mil` beside `patient`, on the same patients
    and resamples, its threshold chosen on validation too (mil_rule None) and `patient_vs_mil`, the paired test."""
    out, boot = patch_level(pred, patients, patch_threshold, groups, draws) if pred.patch_eval.any() else ({}, {})
    out["patient"], rows, patient_boot = patient_level(pred, patients, diagnosis, patch_threshold, top_k, groups,
                                                       draws, rule, top_share)
    boot.update(patient_boot)
    if mil_probability is not None:
        out["patient_mil"], mil_boot = mil_level(rows, mil_probability, patients, groups, draws, mil_rule, top_k)
        boot.update(mil_boot)
        out["patient_vs_mil"] = paired_comparison(rows, patients, groups, draws)
    return out, rows, boot


# ----------------------------------------------------------------------------------------------- --compare
HEADLINE = [("patch", k) for k in PATCH_METRICS] + [("patient", k) for k in PATIENT_METRICS]


PRIMARY = "patch.pr_auc"  # --compare's one pre-declared verdict; the other deltas are descriptive


def compare_table(results: list[dict]) -> dict:
    """Headline values of each model, and each model's delta against the first with its paired bootstrap CI (none
    where the metric's interval is not estimable: fewer than 10 clusters in a class) and the share of resamples
    where the delta was undefined. Only PRIMARY gets a verdict: ten metrics tested at 95% each would find a
    'difference' by chance, and a CI containing 0 is no evidence of equivalence."""
    base = results[0]
    value = lambda r, level, k: r["metrics"].get(level, {}).get(k, float("nan"))
    models = [{"checkpoint": r["checkpoint"], **{f"{lv}.{k}": value(r, lv, k) for lv, k in HEADLINE},
               "patch.threshold": r["metrics"]["patch"]["threshold"], "patient.rule": r["metrics"]["patient"]["rule"],
               "patient.threshold": r["metrics"]["patient"]["threshold"]}
              for r in results]
    deltas = []
    for i, r in enumerate(results[1:], start=1):
        for lv, k in HEADLINE:
            name = f"{lv}.{k}"
            both = name in r["boot"] and name in base["boot"]
            nan3 = [float("nan")] * 3
            lo, hi, undefined = metrics.percentile_interval(r["boot"][name] - base["boot"][name]) if both else nan3
            primary = name == PRIMARY
            verdict = None if not (primary and np.isfinite([lo, hi]).all()) else \
                "no difference shown (CI contains 0)" if lo <= 0 <= hi else "different (CI excludes 0)"
            deltas.append({"model": i, "checkpoint": r["checkpoint"], "metric": name, "baseline": value(base, lv, k),
                           "value": value(r, lv, k), "delta": value(r, lv, k) - value(base, lv, k), "ci95": [lo, hi],
                           "undefined_share": undefined, "role": "primary" if primary else "descriptive",
                           "verdict": verdict})
    return {"baseline": base["checkpoint"], "models": models, "deltas": deltas, "primary": PRIMARY}
