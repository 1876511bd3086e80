"""Binary classification metrics, operating thresholds and confidence intervals, in numpy.

Owns every number the project reports about scores: AP, ROC-AUC, the confusion matrix and the ratios read off it,
the F1 and Youden thresholds, PR/ROC curve points, and the intervals behind every 95% CI. A separate module (not
common.py) because train.py, evaluate.py and the figures all compute them and none of them owns the definitions.
Cross-checked against scikit-learn (and scipy's beta quantiles) in tests/test_metrics.py and tests/test_intervals.py.
Nothing here imports the rest of the project.

    from helico import metrics
    m = metrics.binary_metrics(labels, scores, threshold=0.5)     # pr_auc, roc_auc, recall, precision, f1, ...
    t, why = metrics.best_f1_threshold(labels, scores)             # train.py's operating threshold
    lo, hi = metrics.clopper_pearson(4, 4)                         # 4/4 infected found: [0.398, 1.0], never [1, 1]
    cluster = metrics.cluster_index(patients_of_rows, [["B22-200", "B22-201"]])   # a duplicated pair: one cluster
    ok, why = metrics.estimable(cluster, labels)                   # < 10 clusters in a class: no interval, a reason
    draws = metrics.cluster_draws(cluster.max() + 1, 1000, seed=0) # shared by every model being compared
    values = metrics.cluster_bootstrap(cluster, draws, lambda rows: {"recall": ...})
    lo, hi, undefined = metrics.percentile_interval(values["recall"])

Undefined values (one class present, zero denominators) are NaN with a warning, never -1 or 0.

Why these intervals:
- Patient-level sensitivity, specificity and accuracy are proportions of a handful of patients. A percentile
  bootstrap of 2/2 gives [1, 1]; the exact (Clopper-Pearson) interval [0.16, 1] says what two patients can show.
- Patches of one patient are correlated, and patients whose folders share byte-identical images (one slide filed
  under two IDs) are not independent either: they are resampled together, as one cluster. A byte-identical patch
  is counted once (`first_of_identical`), so a copied slide does not weigh twice.
- With fewer than MIN_CLUSTERS clusters holding a class, a bootstrap interval is degenerate (it cannot vary more
  than those few clusters do): it is reported as not estimable instead, with the reason.
- Resamples in which a metric is undefined (one class drawn) are dropped from its percentiles; their share is
  reported beside the interval, because a large share means the interval describes only the lucky resamples.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

LEVEL = 0.95
MIN_CLUSTERS = 10  # per class: below this a cluster-bootstrap interval is not estimable


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


def stratified_roc_auc(y, scores, strata) -> float:
    """ROC-AUC over the positive-negative pairs within each stratum only (cross-validation: within a fold, so two
    fold models' score scales are never compared): sum over strata of AUC_k * pos_k * neg_k / sum of pos_k * neg_k.
    NaN when no stratum holds both classes."""
    y, s, strata = np.asarray(y), np.asarray(scores, dtype=np.float64), np.asarray(strata)
    num = den = 0.0
    for k in np.unique(strata):
        sel = strata == k
        pos, neg = int(y[sel].sum()), int(sel.sum() - y[sel].sum())
        if pos and neg:
            num += roc_auc(y[sel], s[sel]) * pos * neg
            den += pos * neg
    return num / den if den else float("nan")


def curve_points(y, s) -> dict[str, np.ndarray]:
    """Recall, precision, FPR and TPR at every distinct score threshold (highest first)."""
    y, s = np.asarray(y, dtype=np.int64), np.asarray(s, dtype=np.float64)
    last, tps, _ = ranked(y, s)
    fps = (last + 1) - tps
    return {"recall": tps / max(tps[-1], 1), "precision": tps / (last + 1),
            "fpr": np.r_[0, fps / max(fps[-1], 1)], "tpr": np.r_[0, tps / max(tps[-1], 1)]}


def pr_step_curve(y, s) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) vertices of the precision-recall curve drawn as the step function whose area is the AP:
    precision P_n over each recall interval (R_{n-1}, R_n], so np.trapezoid of the vertices equals
    average_precision (the vertical risers add no area)."""
    y, s = _binary_inputs(y, s)
    last, tps, _ = ranked(y, s)
    recall, precision = tps / max(tps[-1], 1), tps / (last + 1)
    before = np.r_[0.0, recall[:-1]]
    return np.column_stack([before, recall]).ravel(), np.repeat(precision, 2)


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


PREVALENCES = (0.05, 0.1, 0.3, 0.5)
JOINT_LEVEL = 0.975  # each of sensitivity and specificity at 97.5%: the pair holds 95% jointly (Bonferroni)


def bayes(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """(PPV, NPV) at `prevalence`; NaN where nobody is called positive (PPV) or negative (NPV)."""
    tp, fp = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    tn, fn = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    return tp / (tp + fp) if tp + fp > 0 else float("nan"), tn / (tn + fn) if tn + fn > 0 else float("nan")


def predictive_values(found: int, infected: int, cleared: int, negatives: int, prevalences=PREVALENCES) -> dict:
    """PPV and NPV at stated prevalences, by Bayes from sensitivity (found / infected) and specificity (cleared /
    negatives): a split's own infected share is not the clinic's, and PPV moves with it. Each with ppv_ci95 /
    npv_ci95: both rise with sensitivity and with specificity, so the exact (Clopper-Pearson) bounds of the two at
    97.5% each, low with low and high with high, bound them with 95% joint coverage."""
    sens, spec = found / infected, cleared / negatives
    (s_lo, s_hi), (c_lo, c_hi) = (clopper_pearson(found, infected, JOINT_LEVEL),
                                  clopper_pearson(cleared, negatives, JOINT_LEVEL))
    out = {}
    for p in prevalences:
        (ppv, npv), (ppv_lo, npv_lo), (ppv_hi, npv_hi) = (bayes(sens, spec, p), bayes(s_lo, c_lo, p),
                                                          bayes(s_hi, c_hi, p))
        out[f"{p:g}"] = {"ppv": ppv, "npv": npv, "ppv_ci95": [ppv_lo, ppv_hi], "npv_ci95": [npv_lo, npv_hi],
                         "ci_method": "exact bounds of sensitivity and specificity at 97.5% each (95% jointly)"}
    return out


def calibration(y, p, bins: int = 10) -> dict:
    """Brier score, expected calibration error over `bins` equal-width probability bins (sum over bins of
    n_bin / n * |mean predicted - observed share|; the last bin includes 1.0) and each bin's counts: the reliability
    diagram's points."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if y.size == 0:
        return {"brier": float("nan"), "ece": float("nan"), "bins": [], "n_bins": bins}
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            mean_p, share = float(p[sel].mean()), float(y[sel].mean())
            ece += sel.sum() / y.size * abs(mean_p - share)
            rows.append({"lo": b / bins, "hi": (b + 1) / bins, "n": int(sel.sum()), "mean_predicted": mean_p,
                         "observed": share})
    return {"brier": float(np.mean((p - y) ** 2)), "ece": float(ece), "bins": rows, "n_bins": bins}


# ----------------------------------------------------------------------------------------------- thresholds
def f1_by_threshold(y, scores) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, F1) for predicting positive at score >= each distinct score, highest first.
    F1 = 2tp / (2tp + fp + fn), and 2tp + fp + fn = (predicted positives) + (positives)."""
    y, s = _binary_inputs(y, scores)
    last, tp, thresholds = ranked(y, s)
    return thresholds, 2 * tp / ((last + 1) + y.sum())


def midway_below(thresholds: np.ndarray, k: int) -> float:
    """A threshold that predicts exactly what `score >= thresholds[k]` does on these scores, placed midway between
    thresholds[k] and the next lower distinct score (0 below the lowest): rounding a score by less than half that gap
    (bf16 on a GPU, another batch size) no longer flips the decision at the very score that chose it."""
    below = thresholds[k + 1] if k + 1 < len(thresholds) else 0.0
    return float((thresholds[k] + below) / 2)


def best_f1_threshold(y, scores) -> tuple[float, str]:
    """The threshold with the highest F1 on these labels (predict positive when score >= it), midway between the
    winning score and the next lower one."""
    y = np.asarray(y)
    if y.size == 0 or y.min() == y.max():
        return 0.5, "default 0.5: validation holds one class only"
    thresholds, f1 = f1_by_threshold(y, scores)
    return midway_below(thresholds, int(np.argmax(f1))), ("max F1 on validation, midway between adjacent distinct "
                                                          "scores (positive when score >= threshold)")


def youden_threshold(y, s) -> tuple[float, float]:
    """Threshold maximizing sensitivity + specificity - 1, among midpoints between distinct scores (ties: the
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


# ----------------------------------------------------------------------------------------------- exact binomial
def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact enough for any n a patient count reaches)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) *
            math.log1p(-p) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of b vs c discordant pairs: 2 P(X <= min(b, c)), X ~ Binomial(b + c, 1/2),
    capped at 1 (1 when there is no discordant pair)."""
    return 1.0 if b + c == 0 else min(1.0, 2 * _binom_cdf(min(b, c), b + c, 0.5))


def _solve(f, target: float) -> float:
    """p in [0, 1] with f(p) = target for f decreasing in p (bisection to ~1e-15)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact two-sided binomial interval for k successes in n trials (NaN, NaN for n = 0). Its coverage is at least
    `level` for every true proportion: conservative, never narrower than the data allow."""
    k, n = int(k), int(n)
    if n == 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} successes out of n = {n}")
    alpha = (1 - level) / 2
    lo = 0.0 if k == 0 else _solve(lambda p: _binom_cdf(k - 1, n, p), 1 - alpha)  # P(X >= k) = alpha
    hi = 1.0 if k == n else _solve(lambda p: _binom_cdf(k, n, p), alpha)          # P(X <= k) = alpha
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------- clusters
def cluster_index(patients, groups=()) -> np.ndarray:
    """Cluster number of each row (rows given by their patient): patients of one duplicate group share a number."""
    patients = [str(p) for p in patients]
    representative = {p: g[0] for g in groups for p in g}
    names = sorted({representative.get(p, p) for p in patients})
    number = {name: i for i, name in enumerate(names)}
    return np.array([number[representative.get(p, p)] for p in patients], dtype=np.int64)


def first_of_identical(keys) -> np.ndarray:
    """Boolean mask keeping the first row of each byte-identical content key (None: a unique file, always kept)."""
    seen, keep = set(), []
    for key in keys:
        keep.append(key is None or key not in seen)
        if key is not None:
            seen.add(key)
    return np.array(keep, dtype=bool)


def clusters_per_class(cluster: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """How many clusters hold at least one row of each class (0 and 1)."""
    cluster, labels = np.asarray(cluster), np.asarray(labels)
    return {c: int(np.unique(cluster[labels == c]).size) for c in (0, 1)}


def estimable(cluster: np.ndarray, labels: np.ndarray, min_clusters: int = MIN_CLUSTERS) -> tuple[bool, str]:
    """Whether a cluster-bootstrap interval means something here, and if not, why (in words)."""
    per = clusters_per_class(cluster, labels)
    short = [f"{per[c]} {'positive' if c else 'negative'}" for c in (1, 0) if per[c] < min_clusters]
    if short:
        return False, (f"not estimable: {' and '.join(short)} cluster(s) (patients; duplicated patients count once), "
                       f"fewer than {min_clusters}")
    return True, ""


# ----------------------------------------------------------------------------------------------- bootstrap
def cluster_draws(n_clusters: int, resamples: int, seed: int, stream: int = 0) -> np.ndarray:
    """(resamples, n_clusters) cluster indices drawn with replacement. Comparing models: use the same draws for
    every model (paired resampling)."""
    return np.random.default_rng([seed, stream]).integers(0, n_clusters, size=(resamples, n_clusters))


def rows_of_clusters(cluster: np.ndarray, n_clusters: int) -> list[np.ndarray]:
    cluster = np.asarray(cluster)
    order = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[order], np.arange(n_clusters + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(n_clusters)]


def cluster_bootstrap(cluster: np.ndarray, draws: np.ndarray, metric_fn) -> dict[str, np.ndarray]:
    """metric_fn(row indices) -> {name: value} for each resample, a resample being the rows of the drawn clusters
    (a cluster drawn twice contributes its rows twice)."""
    members = rows_of_clusters(cluster, draws.shape[1] if draws.ndim == 2 else 0)
    out: dict[str, list] = {}
    for d in draws:
        idx = np.concatenate([members[c] for c in d]) if len(d) else np.zeros(0, dtype=np.int64)
        for k, v in metric_fn(idx).items():
            out.setdefault(k, []).append(v)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float, float]:
    """(low, high, undefined share): the percentile interval over the resamples where the metric is defined, and the
    share of resamples where it was not (NaN, NaN, 1.0 when it never is)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    undefined = 1 - finite.size / values.size if values.size else float("nan")
    if not finite.size:
        return float("nan"), float("nan"), undefined
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi), float(undefined)


def jackknife(cluster: np.ndarray, n_clusters: int, metric_fn) -> dict[str, np.ndarray]:
    """metric_fn on the rows of all clusters but one, for each cluster left out: BCa's acceleration."""
    members = rows_of_clusters(cluster, n_clusters)
    out: dict[str, list] = {}
    for c in range(n_clusters):
        idx = np.concatenate([members[k] for k in range(n_clusters) if k != c]) if n_clusters > 1 else \
            np.zeros(0, dtype=np.int64)
        for k, v in metric_fn(idx).items():
            out.setdefault(k, []).append(v)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def bca_interval(values: np.ndarray, point: float, jack: np.ndarray, level: float = LEVEL
                 ) -> tuple[float, float, float]:
    """(low, high, undefined share): the bias-corrected and accelerated bootstrap interval (Efron 1987; Efron &
    Tibshirani 1993, ch. 14) over the resamples where the metric is defined. Bias z0 from the share of resamples
    below the point estimate (ties count half), acceleration from the jackknife over clusters. It corrects the
    percentile interval's under-coverage with few clusters and a skewed, bounded statistic; it falls back to the
    percentile interval when the correction is undefined (every resample on one side of the point, or a constant
    jackknife)."""
    from statistics import NormalDist
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    lo, hi, undefined = percentile_interval(values, level)
    jack = np.asarray(jack, dtype=np.float64)
    jack = jack[np.isfinite(jack)]
    if not finite.size or not np.isfinite(point) or jack.size < 3:
        return lo, hi, undefined
    below = (np.sum(finite < point) + 0.5 * np.sum(finite == point)) / finite.size
    if not 0 < below < 1:
        return lo, hi, undefined
    normal = NormalDist()
    z0 = normal.inv_cdf(below)
    d = jack.mean() - jack
    spread = np.sum(d ** 2)
    a = float(np.sum(d ** 3) / (6 * spread ** 1.5)) if spread > 0 else 0.0
    out = []
    for tail in ((1 - level) / 2, (1 + level) / 2):
        z = normal.inv_cdf(tail)
        shifted = z0 + (z0 + z) / (1 - a * (z0 + z))
        out.append(float(np.percentile(finite, 100 * normal.cdf(shifted))))
    return out[0], out[1], undefined
