"""The decision: how a patient's scores become the project's call, chosen once on the validation part and stored
with the model. evaluate.py, the HoldOut ensemble's vote and predict.py all read it through load().

What is stored, and by whom:
- train.py (in best.pt, key "decision"): the patient rule (fraction_positive or top_share_mean) and its threshold,
  chosen by Youden's J on the validation patients' Cropped patches scored by the best epoch, the patch threshold
  behind fraction_positive (best.pt's own "threshold"), each validation patient's rule score, and MIN_PATCHES;
- train_patient.py (in patient/best.pt, key "decision"): the patient model's threshold (Youden's J on its validation
  probabilities) and which of the rule and the patient model gives the call, with the reason: the patient model
  only when its validation Youden's J is strictly higher than the rule's on the same patients (ties go to the rule,
  which needs no second model).

    d = decision.load(ckpt, mil_ckpt)                     # mil_ckpt: patient/best.pt's dict, or None
    c = decision.call(d, n_patches=412, rule_score=0.31, mil_probability=0.74)
    c.call, c.rule_call, c.mil_call, c.agree               # "positive" | "negative" | "no call: <reason>"

An ensemble of fold models decides by majority vote (vote()): each fold model calls at its own stored decision; the
mean of their scores only ranks (ROC-AUC). Plain Python and numpy: no torch, no files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from helico import analysis, metrics

# Fewer readable patches than this and a patient gets no call: a top-10% mean of a handful of patches is one patch,
# and a slide that lost most of its patches to unreadable files is not the slide the pathologist sent.
MIN_PATCHES = 10
POSITIVE, NEGATIVE, NO_CALL = "positive", "negative", "no call"
CHOSEN_ON = "the validation patients of the checkpoint's split"


@dataclass
class Decision:
    """One model's stored choice."""
    patch_threshold: float            # a patch is positive when its score >= this (fraction_positive counts them)
    rule: dict                        # analysis.choose_patient_rule's dict: rule, threshold, candidates, reason
    top_share: float                  # the top_share_mean rule's share
    model: dict | None = None         # the patient model's threshold (analysis.choose_mil_threshold's dict)
    call_by: str = "rule"             # rule | patient_model: which one gives the call
    reason: str = ""                  # why call_by
    min_patches: int = MIN_PATCHES
    stored: bool = True               # False: chosen at evaluation (a checkpoint written before choices were stored)
    validation_scores: dict = field(default_factory=dict)  # validation patient -> rule score (train_patient.py)

    def summary(self) -> dict:
        """What metrics.json and the reports say about the decision."""
        return {"patch_threshold": self.patch_threshold, "patient_rule": self.rule.get("rule"),
                "patient_threshold": self.rule.get("threshold"), "top_share": self.top_share,
                "patient_model_threshold": self.model.get("threshold") if self.model else None,
                "call_by": self.call_by, "reason": self.reason, "min_patches": self.min_patches,
                "chosen_on": CHOSEN_ON, "stored_with_model": self.stored}


class Call:
    """A patient's calls: the rule's, the patient model's (None without one) and the project's, and whether the two
    agree (None when either made no call)."""
    __slots__ = ("rule_call", "mil_call", "call", "agree")

    def __init__(self, rule_call: str, mil_call: str | None, call: str):
        self.rule_call, self.mil_call, self.call = rule_call, mil_call, call
        both = mil_call is not None and not rule_call.startswith(NO_CALL) and not mil_call.startswith(NO_CALL)
        self.agree = (rule_call == mil_call) if both else None

    def as_row(self) -> dict:
        return {"rule_call": self.rule_call, "mil_call": self.mil_call or "", "call": self.call,
                "agree": "" if self.agree is None else "yes" if self.agree else "no"}


# ----------------------------------------------------------------------------------------------- choosing
def stored_rule(rule: dict, rows: list[dict], top_share: float) -> dict:
    """What best.pt keeps under "decision": the rule, and each validation patient's rule score and label (what
    train_patient.py compares the patient model against, so it needs no patch scoring of its own)."""
    name = rule["rule"]
    return {"patient_rule": rule, "top_share": top_share, "min_patches": MIN_PATCHES, "chosen_on": CHOSEN_ON,
            "validation": {r["patient"]: {"score": r[name] if name else float("nan"), "label": r["label"],
                                          "n_patches": r["n_patches"]} for r in rows}}


def youden_at(y, s, threshold: float) -> float:
    """Youden's J of scores `s` at a fixed threshold (NaN with one class)."""
    m = metrics.patient_metrics(y, s, threshold)
    return float(m["sensitivity"] + m["specificity"] - 1)


def choose_model(stored: dict | None, probability: dict[str, float], labels: dict[str, int]) -> dict:
    """train_patient.py's choice, on the validation patients (`labels`: patient -> 0/1, those with a bag): the patient
    model's threshold (Youden's J on `probability`) and which of the rule (`stored`: best.pt's "decision", None for
    a checkpoint without one) and the model gives the call. Returns what patient/best.pt keeps under "decision"."""
    val = (stored or {}).get("validation") or {}
    rows = [{"patient": p, "label": y, "n_patches": 1, "mil_probability": float(probability.get(p, float("nan"))),
             "score": float(val.get(p, {}).get("score", float("nan")))} for p, y in sorted(labels.items())]
    model = analysis.choose_mil_threshold(rows)
    both = [r for r in rows if math.isfinite(r["score"]) and math.isfinite(r["mil_probability"])]
    y = [r["label"] for r in both]
    rule = (stored or {}).get("patient_rule") or {}
    j_rule = youden_at(y, [r["score"] for r in both], rule["threshold"]) if rule.get("rule") else float("nan")
    j_model = youden_at(y, [r["mil_probability"] for r in both], model["threshold"]) if model["rule"] else float("nan")
    if not rule.get("rule"):
        by, why = ("patient_model", "the patch checkpoint stores no patient rule") if model["rule"] else \
            ("rule", "neither has a validated threshold")
    else:
        by = "patient_model" if math.isfinite(j_model) and j_model > j_rule else "rule"
        why = (f"validation Youden's J on {len(both)} patients: rule {j_rule:.3f}, patient model {j_model:.3f}; the "
               f"patient model calls only when strictly better (a tie goes to the rule, which needs no second model)")
    return {"threshold": model, "call_by": by, "reason": why,
            "youden_j": {"rule": j_rule, "patient_model": j_model}, "chosen_on": CHOSEN_ON}


# ----------------------------------------------------------------------------------------------- reading
def load(ckpt: dict, mil_ckpt: dict | None = None, fallback_rule: dict | None = None) -> Decision:
    """The stored decision of a patch checkpoint and (when given) its patient model. A checkpoint written before
    choices were stored has none: `fallback_rule` (chosen by the caller on the validation part, as before) stands in,
    marked stored=False; without it the rule is None (no call for anyone, the reason says so)."""
    stored = ckpt.get("decision")
    if stored:
        rule, top_share = stored["patient_rule"], stored.get("top_share", analysis.TOP_SHARE)
        min_patches, validation, is_stored = stored.get("min_patches", MIN_PATCHES), stored.get("validation", {}), True
    else:
        rule = fallback_rule or {"rule": None, "threshold": float("nan"), "candidates": {},
                                 "reason": "the checkpoint stores no patient rule (written before rules were stored): "
                                           "evaluate it once with evaluate.py"}
        top_share, min_patches, validation, is_stored = analysis.TOP_SHARE, MIN_PATCHES, {}, False
    d = Decision(float(ckpt["threshold"]), rule, float(top_share), min_patches=int(min_patches), stored=is_stored,
                 validation_scores=validation, reason="no patient model: the rule calls")
    chosen = (mil_ckpt or {}).get("decision")
    if chosen:
        d.model, d.call_by, d.reason = chosen["threshold"], chosen["call_by"], chosen["reason"]
    elif mil_ckpt is not None:
        d.reason = "the patient model stores no threshold (trained before thresholds were stored): the rule calls"
    return d


# ----------------------------------------------------------------------------------------------- calling
def _one(value: float, threshold: float, what: str) -> str:
    if not math.isfinite(value) or not math.isfinite(threshold):
        return f"{NO_CALL}: no {what}"
    return POSITIVE if value >= threshold else NEGATIVE


def call(d: Decision, n_patches: int, rule_score: float, mil_probability: float | None = None,
         note: str = "") -> Call:
    """A patient's calls under decision `d`. Too few readable patches: no call from either, never a guess. `note`
    (e.g. a QC failure) forces no call with that reason."""
    if note or n_patches < d.min_patches:
        why = note or f"{n_patches} readable patches (fewer than {d.min_patches})"
        return Call(f"{NO_CALL}: {why}", None if d.model is None else f"{NO_CALL}: {why}", f"{NO_CALL}: {why}")
    rule_call = _one(rule_score, d.rule.get("threshold", float("nan")) if d.rule.get("rule") else float("nan"),
                     "patient rule (one-class validation)" if not d.rule.get("rule") else "rule score")
    mil_call = None if d.model is None else _one(
        float("nan") if mil_probability is None else mil_probability,
        d.model.get("threshold", float("nan")) if d.model.get("rule") else float("nan"), "patient-model probability")
    chosen = mil_call if d.call_by == "patient_model" and mil_call is not None else rule_call
    return Call(rule_call, mil_call, chosen)


def rule_score(row: dict, d: Decision) -> float:
    """The rule's score of an analysis.patient_scores row."""
    return row[d.rule["rule"]] if d.rule.get("rule") else float("nan")


def vote(calls: list[str]) -> str:
    """The majority of the fold models' calls; a model without a call abstains; a tie (or no call at all) is no
    call, never a coin flip."""
    pos = sum(c == POSITIVE for c in calls)
    neg = sum(c == NEGATIVE for c in calls)
    if pos == neg:
        return f"{NO_CALL}: the fold models split {pos}-{neg}" if pos else f"{NO_CALL}: no fold model made a call"
    return POSITIVE if pos > neg else NEGATIVE


def joined(fold_rows: list[list[dict]]) -> list[dict]:
    """An ensemble's patients, from each fold model's rows of the same patients in the same order (rule_score,
    mil_probability ("" without a patient model), rule_call, mil_call, call): the calls by majority vote, the scores
    as the folds' mean (to rank, never thresholded), and each fold's call in `votes`."""
    out = []
    for rows in zip(*fold_rows):
        mean = lambda k: float(np.mean([float(r[k]) for r in rows])) if all(r.get(k, "") != "" for r in rows) else ""
        rule_call, call_ = vote([r["rule_call"] for r in rows]), vote([r["call"] for r in rows])
        mil_call = vote([r["mil_call"] for r in rows]) if all(r.get("mil_call") for r in rows) else ""
        both = mil_call and not any(c.startswith(NO_CALL) for c in (rule_call, mil_call))
        out.append({**rows[0], "rule_score": mean("rule_score"), "mil_probability": mean("mil_probability"),
                    "rule_call": rule_call, "mil_call": mil_call, "call": call_,
                    "agree": ("yes" if rule_call == mil_call else "no") if both else "",
                    "votes": "; ".join(r["call"] for r in rows)})
    return out


def flagged_share(calls: list[str]) -> dict:
    """The share of patients called positive (no label read), and how many got no call."""
    n = len(calls)
    pos = sum(c == POSITIVE for c in calls)
    return {"patients": n, "positive": pos, "no_call": sum(c.startswith(NO_CALL) for c in calls),
            "flagged_share": pos / n if n else float("nan")}


def as_label(c: str) -> int:
    """1 positive, 0 negative, -1 no call: the prediction columns' coding."""
    return 1 if c == POSITIVE else 0 if c == NEGATIVE else -1


def platt(scores, labels) -> tuple[float, float]:
    """(a, b) of the logistic calibration p = sigmoid(a * logit(s) + b) fitted by Newton's method on one fold
    model's out-of-fold patient scores, lightly regularized so a separable fold stays finite."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 1e-6, 1 - 1e-6)
    y = np.asarray(labels, dtype=np.float64)
    x = np.stack([np.log(s / (1 - s)), np.ones_like(s)], axis=1)
    w = np.zeros(2)
    for _ in range(100):
        p = 1 / (1 + np.exp(-x @ w))
        grad = x.T @ (p - y) + 1e-2 * w
        hess = x.T @ (x * (p * (1 - p))[:, None]) + 1e-2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def calibrated(score: float, ab: tuple[float, float]) -> float:
    s = min(max(score, 1e-6), 1 - 1e-6)
    return float(1 / (1 + math.exp(-(ab[0] * math.log(s / (1 - s)) + ab[1]))))

