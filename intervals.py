"""Confidence intervals that claim no more certainty than the data holds: exact binomial intervals for patient
proportions and a cluster bootstrap for patch metrics, where the cluster is the independent unit. Pure numpy.

    import intervals
    lo, hi = intervals.clopper_pearson(4, 4)                       # 4/4 infected found: [0.398, 1.0], never [1, 1]
    cluster = intervals.cluster_index(patients_of_rows, [["B22-200", "B22-201"]])   # a duplicated pair: one cluster
    ok, why = intervals.estimable(cluster, labels)                 # < 10 clusters in a class: no interval, a reason
    draws = intervals.cluster_draws(cluster.max() + 1, 1000, seed=0)
    values = intervals.cluster_bootstrap(cluster, draws, lambda rows: {"recall": ...})
    lo, hi, undefined = intervals.percentile_interval(values["recall"])

Why these choices:
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

import numpy as np

LEVEL = 0.95
MIN_CLUSTERS = 10  # per class: below this a bootstrap interval is not estimable


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
