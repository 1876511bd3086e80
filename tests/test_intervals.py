"""metrics.py intervals: exact binomial intervals (against scipy's beta quantiles), clusters, the cluster bootstrap."""
import numpy as np
import pytest
from scipy import stats

from helico import metrics as intervals


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (2, 2), (0, 2), (4, 4), (3, 7), (5, 13), (50, 100), (1, 300)])
def test_clopper_pearson_equals_the_beta_quantiles(k, n):
    lo = stats.beta.ppf(0.025, k, n - k + 1) if k else 0.0
    hi = stats.beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    assert intervals.clopper_pearson(k, n) == pytest.approx((lo, hi), abs=1e-9)


def test_the_issue_s_zero_width_claims_get_their_exact_width():
    assert intervals.clopper_pearson(2, 2) == pytest.approx((0.158, 1.0), abs=1e-3)
    assert intervals.clopper_pearson(4, 4) == pytest.approx((0.398, 1.0), abs=1e-3)
    assert intervals.clopper_pearson(0, 2) == pytest.approx((0.0, 0.842), abs=1e-3)
    assert all(np.isnan(intervals.clopper_pearson(0, 0)))


def test_a_duplicated_patient_pair_is_one_cluster():
    patients = ["B22-1", "B22-200", "B22-201", "B22-201", "B22-2", "B22-200"]
    cluster = intervals.cluster_index(patients, [["B22-200", "B22-201"]])
    assert cluster[1] == cluster[2] == cluster[3] == cluster[5]
    assert len(set(cluster.tolist())) == 3


def test_a_duplicated_pair_is_resampled_together_in_every_bootstrap_draw():
    patients = np.array(["A", "B22-200", "B22-201", "C", "D"])
    cluster = intervals.cluster_index(patients, [["B22-200", "B22-201"]])
    draws = intervals.cluster_draws(cluster.max() + 1, 300, seed=0)
    counts = intervals.cluster_bootstrap(cluster, draws, lambda rows: {
        "200": float((patients[rows] == "B22-200").sum()), "201": float((patients[rows] == "B22-201").sum())})
    assert np.array_equal(counts["200"], counts["201"]) and counts["200"].max() >= 2


def test_identical_content_is_counted_once():
    assert intervals.first_of_identical(["a", None, "b", "a", None, "b"]).tolist() == [True, True, True, False, True,
                                                                                      False]


def test_fewer_than_ten_clusters_in_a_class_is_not_estimable():
    labels = np.array([1, 0, 0, 1, 0, 0] * 5)
    cluster = np.repeat(np.arange(15), 2)  # 15 clusters of 2 rows: 10 hold a positive, all 15 a negative
    ok, why = intervals.estimable(cluster, labels)
    assert ok and why == ""
    ok, why = intervals.estimable(cluster[:12], labels[:12])
    assert not ok and "fewer than 10" in why and "positive" in why


def test_percentile_interval_reports_the_share_of_undefined_resamples():
    values = np.r_[np.linspace(0, 1, 80), [np.nan] * 20]
    lo, hi, undefined = intervals.percentile_interval(values)
    assert undefined == pytest.approx(0.2) and lo == pytest.approx(np.percentile(np.linspace(0, 1, 80), 2.5))
    assert np.isnan(intervals.percentile_interval(np.array([np.nan, np.nan]))[0])


def test_bca_covers_a_skewed_cluster_statistic_better_than_the_percentile_interval():
    """Near the cluster floor the percentile interval under-covers. A patch-level rate over
    20 patient clusters of 20-60 patches whose own rates vary (Beta, mean 0.08): the share of 400 simulated studies
    whose 95% interval holds the true rate. Seeded: the same numbers on every machine."""
    rng = np.random.default_rng(0)
    hits = {"percentile": 0, "bca": 0}
    for _ in range(400):
        m = rng.integers(20, 60, 20)
        k = rng.binomial(m, rng.beta(0.4, 4.6, 20))
        draws = rng.integers(0, 20, (500, 20))
        boot = k[draws].sum(1) / m[draws].sum(1)
        jack = (k.sum() - k) / (m.sum() - m)  # leave one cluster out
        for name, (lo, hi, _) in (("percentile", intervals.percentile_interval(boot)),
                                  ("bca", intervals.bca_interval(boot, k.sum() / m.sum(), jack))):
            hits[name] += lo <= 0.08 <= hi
    percentile, bca = hits["percentile"] / 400, hits["bca"] / 400
    assert percentile < 0.93 and bca >= percentile + 0.015 and bca >= 0.91, (percentile, bca)


def test_bca_without_bias_or_skew_is_the_percentile_interval():
    values = np.linspace(-1, 1, 2001)  # symmetric around the point, a symmetric jackknife: z0 = 0, a = 0
    assert intervals.bca_interval(values, 0.0, np.array([-1.0, 0.0, 1.0])) == \
        pytest.approx(intervals.percentile_interval(values))
    assert intervals.bca_interval(values, 5.0, np.array([1.0, 2.0, 3.0])) == intervals.percentile_interval(values)
