"""metrics.py: every metric, threshold and curve cross-checked against scikit-learn."""
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from helico import metrics


def random_cases(n_cases=300, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        n = int(rng.integers(2, 80))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        scores = rng.integers(0, 6, n) / 5.0 if rng.random() < 0.5 else rng.random(n)  # half with heavy ties
        yield y, scores


def test_ranking_metrics_equal_sklearn_with_ties():
    for y, s in random_cases():
        assert abs(metrics.average_precision(y, s) - skm.average_precision_score(y, s)) < 1e-9
        assert abs(metrics.roc_auc(y, s) - skm.roc_auc_score(y, s)) < 1e-9


def test_threshold_metrics_equal_sklearn():
    for y, s in random_cases(seed=1):
        pred = (s >= 0.5).astype(int)
        assert metrics.confusion_matrix(y, pred).tolist() == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()
        for ours, ref in ((metrics.precision, skm.precision_score), (metrics.recall, skm.recall_score),
                          (metrics.f1, skm.f1_score)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a, b = ours(y, pred), ref(y, pred, zero_division=np.nan)
            assert (np.isnan(a) and np.isnan(b)) or abs(a - b) < 1e-9
        assert abs(metrics.accuracy(y, pred) - skm.accuracy_score(y, pred)) < 1e-9


def test_one_class_input_is_nan_with_a_warning_not_a_sentinel():
    for fn in (metrics.average_precision, metrics.roc_auc):
        with pytest.warns(UserWarning, match="only one class"):
            assert np.isnan(fn([0, 0, 0], [0.1, 0.5, 0.9]))


def test_binary_metrics_reports_the_accuracy_trap():
    y = np.r_[np.zeros(97), np.ones(3)]
    m = metrics.binary_metrics(y, np.zeros(100), threshold=0.5)
    assert m["accuracy"] == m["dummy_accuracy"] == 0.97 and m["recall"] == 0.0
    assert m["confusion"] == [[97, 0], [3, 0]] and np.isnan(m["precision"])


def test_curve_points_equal_sklearn_curves():
    for y, s in random_cases(seed=2):
        c = metrics.curve_points(y, s)
        precision, recall, _ = skm.precision_recall_curve(y, s)  # lowest threshold first, plus a (1, 0) end point
        np.testing.assert_allclose(c["precision"], precision[:-1][::-1], rtol=0, atol=1e-12)
        np.testing.assert_allclose(c["recall"], recall[:-1][::-1], rtol=0, atol=1e-12)
        fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(c["fpr"], fpr, rtol=0, atol=1e-12)
        np.testing.assert_allclose(c["tpr"], tpr, rtol=0, atol=1e-12)


def test_threshold_maximises_f1_on_validation():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.1).astype(int)
    s = np.round(np.clip(rng.normal(0.3 + 0.3 * y, 0.2), 0, 1), 2)  # rounded: ties included
    threshold, rule = metrics.best_f1_threshold(y, s)
    best = max(metrics.f1(y, (s >= t).astype(int)) for t in np.unique(s))
    assert metrics.f1(y, (s >= threshold).astype(int)) == pytest.approx(best) and "F1" in rule


def test_f1_by_threshold_equals_sklearn_f1_at_every_threshold():
    for y, s in random_cases(n_cases=60, seed=5):  # sklearn's f1_score costs ~1 ms a call: 60 cases, ~1,500 calls
        thresholds, f1 = metrics.f1_by_threshold(y, s)
        expected = [skm.f1_score(y, (s >= t).astype(int), zero_division=0) for t in thresholds]
        np.testing.assert_allclose(f1, expected, rtol=0, atol=1e-12)  # the old denominator had one tp too many


def test_stored_threshold_sits_midway_between_adjacent_distinct_scores():
    rng = np.random.default_rng(1)
    y = (rng.random(200) < 0.2).astype(int)
    s = np.round(np.clip(rng.normal(0.3 + 0.3 * y, 0.2), 0.01, 1), 3)
    threshold, _ = metrics.best_f1_threshold(y, s)
    u = np.unique(s)
    above, below = u[u >= threshold].min(), u[u < threshold].max()
    assert threshold == pytest.approx((above + below) / 2, abs=1e-15)
    assert threshold not in set(s.tolist())
    # nudging every score by less than half the gap (bf16 rounding, another batch size) changes no decision
    gap = (above - below) / 2
    for nudge in (-0.99 * gap, 0.99 * gap):
        assert ((s + nudge >= threshold) == (s >= threshold))[s == above].all()


def test_pr_step_curve_area_is_the_average_precision():
    for y, s in random_cases(seed=3):
        if 0 < y.sum() < y.size:
            r, p = metrics.pr_step_curve(y, s)
            area = float(np.sum(np.diff(r) * (p[1:] + p[:-1]) / 2))  # trapezoids of the drawn polyline
            assert area == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)


# ----------------------------------------------------------------------------------------------- calibration, CV AUC
def test_calibration_bins_and_brier_equal_sklearns():
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss
    rng = np.random.default_rng(3)
    p = rng.beta(0.6, 2.0, size=500)
    y = (rng.random(500) < p ** 0.7).astype(int)  # miscalibrated on purpose
    cal = metrics.calibration(y, p, bins=10)
    assert cal["brier"] == pytest.approx(brier_score_loss(y, p), rel=1e-12)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    assert np.allclose([b["observed"] for b in cal["bins"]], observed)
    assert np.allclose([b["mean_predicted"] for b in cal["bins"]], predicted)
    counts = np.array([b["n"] for b in cal["bins"]])
    assert cal["ece"] == pytest.approx(np.sum(counts / 500 * np.abs(predicted - observed)))
    assert metrics.calibration(np.ones(4), np.ones(4))["ece"] == 0  # 1.0 falls in the last bin, perfectly


def test_predictive_values_follow_a_population_of_that_prevalence():
    sens, spec = 0.86, 0.96
    pv = metrics.predictive_values(86, 100, 96, 100, (0.1, 0.5))
    for prev, n in ((0.1, 100_000), (0.5, 100_000)):
        pos, neg = n * prev, n * (1 - prev)
        tp, fn, tn, fp = sens * pos, (1 - sens) * pos, spec * neg, (1 - spec) * neg
        assert pv[f"{prev:g}"]["ppv"] == pytest.approx(tp / (tp + fp)) and \
            pv[f"{prev:g}"]["npv"] == pytest.approx(tn / (tn + fn))


@pytest.mark.parametrize("found,infected,cleared,negatives", [(2, 2, 3, 3), (5, 7, 2, 2), (0, 3, 4, 6), (40, 50,
                                                                                                  90, 100)])
def test_predictive_value_intervals_carry_scipys_exact_bounds_at_97_5_percent_each(found, infected, cleared,
                                                                                   negatives):
    from scipy import stats
    sens = stats.binomtest(found, infected).proportion_ci(confidence_level=0.975, method="exact")
    spec = stats.binomtest(cleared, negatives).proportion_ci(confidence_level=0.975, method="exact")
    for prev, v in metrics.predictive_values(found, infected, cleared, negatives).items():
        p = float(prev)
        ppv = lambda se, sp: se * p / (se * p + (1 - sp) * (1 - p))
        npv = lambda se, sp: sp * (1 - p) / (sp * (1 - p) + (1 - se) * p)
        assert v["ppv_ci95"] == pytest.approx([ppv(sens.low, spec.low), ppv(sens.high, spec.high)], abs=1e-9)
        assert v["npv_ci95"] == pytest.approx([npv(sens.low, spec.low), npv(sens.high, spec.high)], abs=1e-9)
        assert v["ppv_ci95"][0] <= v["ppv"] <= v["ppv_ci95"][1] and v["npv_ci95"][0] <= v["npv"] <= v["npv_ci95"][1]


def test_three_negatives_cleared_no_longer_print_a_bare_ppv_of_one():
    v = metrics.predictive_values(2, 2, 3, 3)["0.05"]
    assert v["ppv"] == 1.0 and v["ppv_ci95"][0] < 0.1 and v["ppv_ci95"][1] == 1.0


def test_fold_stratified_auc_compares_pairs_within_a_fold_only():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = y * 1.5 + rng.normal(size=400)
    assert metrics.stratified_roc_auc(y, s, np.zeros(400)) == pytest.approx(roc_auc_score(y, s))
    # five folds, each model its own logit offset: pooling mixes the scales, within-fold pairs do not
    fold = np.repeat(np.arange(5), 80)
    shifted = s + rng.normal(scale=1.0, size=5)[fold]
    per_fold = [roc_auc_score(y[fold == k], shifted[fold == k]) for k in range(5)]
    weights = [y[fold == k].sum() * (1 - y[fold == k]).sum() for k in range(5)]
    assert metrics.stratified_roc_auc(y, shifted, fold) == pytest.approx(np.average(per_fold, weights=weights))
    assert roc_auc_score(y, shifted) < metrics.stratified_roc_auc(y, shifted, fold)
    assert np.isnan(metrics.stratified_roc_auc([1, 1, 0], [0.5, 0.6, 0.1], [0, 0, 1]))  # no fold holds both
