"""Binary classification metrics, operating thresholds and patient-cluster bootstrap intervals, in numpy.

Owns every number the project reports about scores: AP, ROC-AUC, the confusion matrix and the ratios read off it,
the F1 and Youden thresholds, PR/ROC curve points, and the bootstrap behind every 95% CI. A separate module (not
common.py) because train.py, evaluate.py and the figures all compute them and none of them owns the definitions.
Cross-checked against scikit-learn in tests/test_common.py. Nothing here imports the rest of the project.

    import metrics
    m = metrics.binary_metrics(labels, scores, threshold=0.5)     # pr_auc, roc_auc, recall, precision, f1, ...
    t, why = metrics.best_f1_threshold(labels, scores)             # train.py's operating threshold
    draws = metrics.patient_draws(len(patients), 1000, seed=0)    # shared by every model being compared

Undefined values (one class present, zero denominators) are NaN with a warning, never -1 or 0.
"""
from __future__ import annotations

import warnings

import numpy as np


# ----------------------------------------------------------------------------------------------- inputs
def _binary_inputs(y, s):
    y, s = np.asarray(y).ravel(), np.asarray(s, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y.astype(np.int64), s


def _one_class(y, name) -> bool:
    if y.size == 0 or y.min() == y.max():
        warnings.warn(f"{name} is undefined with only one class present: returning NaN", stacklevel=3)
        return True
    return False


def ranked(y, s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The score-sorting idiom behind AP, the F1 threshold and the curves: sort by score, highest first (stable),
    and at the last position of each distinct score return (that index, true positives so far, the score).
    Predicting positive at score >= thresholds[k] gives tps[k] true positives out of last[k] + 1 predictions."""
    order = np.argsort(-s, kind="mergesort")
    s = s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each distinct threshold
    return last, np.cumsum(y[order])[last], s[last]


# ----------------------------------------------------------------------------------------------- threshold-free
def average_precision(y, scores) -> float:
    """Step-wise AP = sum_n (R_n - R_{n-1}) P_n over distinct score thresholds (sklearn's definition)."""
    y, s = _binary_inputs(y, scores)
    if _one_class(y, "average precision"):
        return float("nan")
    last, tps, _ = ranked(y, s)
    precision, recall = tps / (last + 1), tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(y, scores) -> float:
    """Mann-Whitney U / (n_pos n_neg) with mid-ranks for ties (equals the trapezoidal ROC area)."""
    y, s = _binary_inputs(y, scores)
    if _one_class(y, "ROC-AUC"):
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    ranks = np.empty(s.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # average 1-based rank per tie group
    n_pos = y.sum()
    n_neg = y.size - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def curve_points(y, s) -> dict[str, np.ndarray]:
    """Recall, precision, FPR and TPR at every distinct score threshold (highest first)."""
    y, s = np.asarray(y, dtype=np.int64), np.asarray(s, dtype=np.float64)
    last, tps, _ = ranked(y, s)
    fps = (last + 1) - tps
    return {"recall": tps / max(tps[-1], 1), "precision": tps / (last + 1),
            "fpr": np.r_[0, fps / max(fps[-1], 1)], "tpr": np.r_[0, tps / max(tps[-1], 1)]}


# ----------------------------------------------------------------------------------------------- at a threshold
def confusion_matrix(y, pred) -> np.ndarray:
    """[[tn, fp], [fn, tp]] as integers."""
    y, p = np.asarray(y).astype(np.int64).ravel(), np.asarray(pred).astype(np.int64).ravel()
    return np.bincount(2 * y + p, minlength=4).reshape(2, 2)


def _ratio(num, den, name) -> float:
    if den == 0:
        warnings.warn(f"{name} is undefined (zero denominator): returning NaN", stacklevel=3)
        return float("nan")
    return float(num / den)


def precision(y, pred) -> float:
    (tn, fp), (fn, tp) = confusion_matrix(y, pred)
    return _ratio(tp, tp + fp, "precision")


def recall(y, pred) -> float:
    (tn, fp), (fn, tp) = confusion_matrix(y, pred)
    return _ratio(tp, tp + fn, "recall")


def f1(y, pred) -> float:
    (tn, fp), (fn, tp) = confusion_matrix(y, pred)
    return _ratio(2 * tp, 2 * tp + fp + fn, "F1")


def accuracy(y, pred) -> float:
    cm = confusion_matrix(y, pred)
    return _ratio(cm[0, 0] + cm[1, 1], cm.sum(), "accuracy")


def binary_metrics(y, scores, threshold: float = 0.5) -> dict:
    """Headline patch metrics at `threshold` (predict positive when score >= threshold)."""
    y, s = _binary_inputs(y, scores)
    pred = (s >= threshold).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaNs in the dict speak for themselves
        return {"pr_auc": average_precision(y, s), "roc_auc": roc_auc(y, s), "recall": recall(y, pred),
                "precision": precision(y, pred), "f1": f1(y, pred), "accuracy": accuracy(y, pred),
                "threshold": float(threshold), "confusion": confusion_matrix(y, pred).tolist(),
                "n": int(y.size), "positives": int(y.sum()), "dummy_accuracy": float(1 - y.mean()) if y.size else float("nan")}


def nan_reasons(m: dict, level: str) -> dict[str, str]:
    """Why each NaN metric is undefined, in words (a NaN is never silently -1 or 0)."""
    n, pos, many = m.get("n", 0), m.get("positives", 0), f"{level}es" if level == "patch" else f"{level}s"
    one_class = f"only one class among {n} {many} ({pos} positive)"
    why = {"pr_auc": one_class, "roc_auc": one_class, "recall": f"no positive {many}",
           "sensitivity": f"no infected {many}", "specificity": f"no negative {many}",
           "precision": f"no {level} predicted positive", "f1": f"no positive {many} and none predicted positive",
           "accuracy": f"no {many}"}
    return {k: why[k] for k, v in m.items() if k in why and isinstance(v, float) and np.isnan(v)}


def patch_metrics(y, s, threshold: float) -> dict:
    """binary_metrics plus the reason each undefined one is NaN."""
    m = binary_metrics(y, s, threshold)
    m["undefined"] = nan_reasons(m, "patch")
    return m


def patient_metrics(y, s, threshold: float) -> dict:
    """Accuracy, sensitivity (infected found), specificity (NEGATIVA cleared) and ROC-AUC of patient scores."""
    y, s = np.asarray(y, dtype=np.int64), np.asarray(s, dtype=np.float64)
    pred = (s >= threshold).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = {"accuracy": accuracy(y, pred), "sensitivity": recall(y, pred),
             "specificity": recall(1 - y, 1 - pred), "roc_auc": roc_auc(y, s) if y.size else float("nan"),
             "threshold": float(threshold), "confusion": confusion_matrix(y, pred).tolist(),
             "n": int(y.size), "positives": int(y.sum())}
    m["undefined"] = nan_reasons(m, "patient")
    return m


# ----------------------------------------------------------------------------------------------- thresholds
def best_f1_threshold(y, scores) -> tuple[float, str]:
    """The score threshold (predict positive when score >= it) with the highest F1 on these labels."""
    y, s = np.asarray(y), np.asarray(scores, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        return 0.5, "default 0.5: validation holds one class only"
    last, tp, thresholds = ranked(y, s)
    f1 = 2 * tp / (tp + (last + 1) + y.sum())  # 2tp / (2tp + fp + fn)
    return float(thresholds[int(np.argmax(f1))]), "max F1 on validation (positive when score >= threshold)"


def youden_threshold(y, s) -> tuple[float, float]:
    """Threshold maximising sensitivity + specificity - 1, among midpoints between distinct scores (ties: the
    lowest, i.e. the most sensitive: a missed infection costs more than a second look)."""
    u = np.unique(s)
    candidates = np.r_[u[0], (u[1:] + u[:-1]) / 2]
    best_t, best_j = float(candidates[0]), -np.inf
    for t in candidates:
        pred = s >= t
        j = pred[y == 1].mean() + (~pred[y == 0]).mean() - 1
        if j > best_j + 1e-12:
            best_t, best_j = float(t), float(j)
    return best_t, best_j


# ----------------------------------------------------------------------------------------------- bootstrap
def patient_draws(n_patients: int, resamples: int, seed: int, stream: int = 0) -> np.ndarray:
    """(resamples, n_patients) patient indices drawn with replacement; shared by every model being compared."""
    return np.random.default_rng([seed, stream]).integers(0, n_patients, size=(resamples, n_patients))


def groups_of(patients_of_rows: np.ndarray, patients: list[str]) -> list[np.ndarray]:
    """Row indices of each patient, in the order of `patients` (the bootstrap's resampling units)."""
    where = {p: i for i, p in enumerate(patients)}
    members: list[list[int]] = [[] for _ in patients]
    for row, p in enumerate(patients_of_rows):
        members[where[p]].append(row)
    return [np.asarray(m, dtype=np.int64) for m in members]


def bootstrap_values(groups: list[np.ndarray], draws: np.ndarray, metric_fn) -> dict[str, np.ndarray]:
    """metric_fn(row indices) for each resample, where a resample concatenates the drawn patients' rows."""
    out: dict[str, list] = {}
    for d in draws:
        idx = np.concatenate([groups[i] for i in d]) if len(d) else np.zeros(0, dtype=np.int64)
        for k, v in metric_fn(idx).items():
            out.setdefault(k, []).append(v)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def ci95(values: np.ndarray) -> list[float]:
    """Percentile interval over the resamples where the metric is defined ([NaN, NaN] if none is)."""
    finite = values[np.isfinite(values)]
    return [float(x) for x in np.percentile(finite, [2.5, 97.5])] if finite.size else [float("nan")] * 2
