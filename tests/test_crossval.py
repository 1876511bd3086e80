"""evaluate.py --cv: K fold runs of one split, each evaluated, their out-of-fold test predictions pooled."""
import json
import shutil

import numpy as np
import pytest

import common
from helico import crossval, ledger, metrics
from helico.crossval import read_csv  # the one reader of the project's CSVs
import evaluate
import predict
import train
import train_patient
from conftest import flipped_diagnoses

# The smallest fold runs that train and evaluate: 32 px, no Macenko, 48 samples, one epoch.
FOLD_FLAGS = ["--device", "cpu", "--image-size", "32", "--batch-size", "16", "--weights", "none", "--workers", "0",
              "--seed", "0", "--limit-samples", "48", "--no-macenko", "--epochs", "1"]
K = 3


@pytest.fixture(scope="module")
def demo_root(small_demo_root):
    """K fold runs train and evaluate on it: the 12-patient demo (K test parts of 4 patients) serves."""
    return small_demo_root


@pytest.fixture(scope="module")
def cv_runs(demo_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("cv")
    for i in range(K):
        assert train.main(["--data-root", str(demo_root), "--runs-dir", str(runs), "--run-id", f"27-f{i}",
                           "--folds", str(K), "--fold", str(i), *FOLD_FLAGS]) == 0
        assert train_patient.main(["--checkpoint", str(runs / f"27-f{i}" / "best.pt"), "--device", "cpu",
                                   "--workers", "0", "--epochs", "3"]) == 0  # the fold-matched patient model
    folders = [str(runs / f"27-f{i}") for i in range(K)]
    assert evaluate.main(["--cv", *folders, "--device", "cpu", "--workers", "0", "--bootstrap", "50",
                          "--gradcam", "0"]) == 0
    return runs


def test_pooled_predictions_equal_each_folds_own_test_predictions(cv_runs):
    pooled = read_csv(cv_runs / "27-cv" / "predictions.csv")
    own = []
    for i in range(K):
        rows = read_csv(cv_runs / f"27-f{i}" / "eval" / "predictions.csv")
        own += [{"fold": str(i), **r} for r in rows if r["split"] == "test"]
    key = lambda r: (r["fold"], r["path"])
    assert sorted(pooled, key=key) == sorted(own, key=key) and own
    assert len({r["path"] for r in pooled}) == len(pooled)  # every patch scored by exactly one fold's model


def test_every_patient_is_tested_by_the_one_model_that_never_saw_it(cv_runs, demo_root):
    data = common.load_data(demo_root)
    pooled = read_csv(cv_runs / "27-cv" / "patients.csv")
    assert sorted(r["patient"] for r in pooled) == [p for p in data.cv_patients if p != "B22-47"]
    for r in pooled:
        split = json.loads((cv_runs / f"27-f{r['fold']}" / "split.json").read_text())
        assert r["patient"] in split["test"] and r["patient"] not in split["train"] + split["val"]


def test_pooled_metrics_recompute_from_the_pooled_rows_with_exact_patient_intervals(cv_runs):
    from sklearn import metrics as skm
    m = json.loads((cv_runs / "27-cv" / "metrics.json").read_text())
    rows = [r for r in read_csv(cv_runs / "27-cv" / "predictions.csv") if r["patch_eval"] == "1"
            and r["source"] == "annotated"]  # the headline set, as in each fold's own report
    y, pred = np.array([int(r["label"]) for r in rows]), np.array([int(r["prediction"]) for r in rows])
    assert m["patch"]["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["patch"]["pr_auc"] == pytest.approx(skm.average_precision_score(y, [float(r["score"]) for r in rows]))
    p = m["patient"]
    (tn, fp), (fn, tp) = p["confusion"]
    assert p["ci95"]["sensitivity"] == pytest.approx(list(crossval.metrics.clopper_pearson(tp, tp + fn)))
    per = m["per_fold"]["patient.accuracy"]
    assert len(per["values"]) == K and per["mean"] == pytest.approx(np.nanmean(per["values"]))
    report = (cv_runs / "27-cv" / "report.md").read_text()
    assert "+/-" in report and "Out-of-fold test predictions pooled" in report


def test_folds_whose_test_parts_overlap_or_miss_patients_are_refused(cv_runs, demo_root):
    data = common.load_data(demo_root)
    folds = [crossval.read_fold(cv_runs / f"27-f{i}") for i in range(K)]
    crossval.check_folds(folds, data.cv_patients)  # the real ones are fine
    folds[1].split["test"] = folds[1].split["test"] + folds[0].split["test"][:1]
    with pytest.raises(common.DataError, match="not one cross-validation: .*in the test parts of folds 0 and 1"):
        crossval.check_folds(folds, data.cv_patients)
    with pytest.raises(common.DataError, match="not one cross-validation"):
        crossval.check_folds(folds[:2], data.cv_patients)


def test_the_patient_models_decisions_of_every_fold_are_pooled_beside_the_rules(cv_runs):
    pooled = json.loads((cv_runs / "27-cv" / "metrics.json").read_text(), parse_constant=float)
    assert "patient_mil" in pooled and "patient_mil.accuracy" in pooled["per_fold"]
    confusion, n = np.zeros((2, 2), int), 0
    for i in range(K):
        own = json.loads((cv_runs / f"27-f{i}" / "eval" / "metrics.json").read_text(), parse_constant=float)
        if own["patient_mil"]["rule"]:  # a fold whose validation patients are one class has no threshold
            confusion += np.array(own["patient_mil"]["confusion"])
            n += own["patient_mil"]["n"]
    assert pooled["patient_mil"]["confusion"] == confusion.tolist() and pooled["patient_mil"]["n"] == n
    rows = read_csv(cv_runs / "27-cv" / "patients.csv")
    assert all(r["mil_prediction"] != "" for r in rows)
    assert "## Patients, patient model" in (cv_runs / "27-cv" / "report.md").read_text()


def test_the_cv_headline_auc_compares_pairs_within_a_fold_and_left_out_patients_are_named(cv_runs):
    pooled = json.loads((cv_runs / "27-cv" / "metrics.json").read_text(), parse_constant=float)
    rows = [r for r in read_csv(cv_runs / "27-cv" / "predictions.csv") if r["patch_eval"] == "1"
            and r["source"] == "annotated"]
    expected = metrics.stratified_roc_auc([int(r["label"]) for r in rows], [float(r["score"]) for r in rows],
                                          [r["fold"] for r in rows])
    got = pooled["patch"]["roc_auc_fold_stratified"]
    assert got == pytest.approx(expected) or (np.isnan(got) and np.isnan(expected))
    for level in ("patch", "patient"):  # the headline carries the pooled one's interval, or says why not
        m = pooled[level]
        assert "roc_auc_fold_stratified" in m.get("ci95", {}) or m.get("ci_note"), m
    patients = read_csv(cv_runs / "27-cv" / "patients.csv")
    left = {r["patient"] for r in patients if r["label"] == "-1" or r["prediction"] == "-1"}
    assert set(pooled["patient"]["excluded"]) == left
    assert pooled["patient"]["n"] + len(left) == len(patients)
    report = (cv_runs / "27-cv" / "report.md").read_text()
    assert "fold-stratified (pairs within a fold: the headline)" in report
    assert "hold the K fitted models fixed" in report
    if left:
        assert "Left out of the" in report and sorted(left)[0] in report


def test_the_ensemble_is_the_fold_models_vote_each_at_its_own_stored_decision(cv_runs, demo_root, tmp_path):
    runs = [str(cv_runs / f"27-f{i}") for i in range(K)]
    flags = ["--holdout", "--device", "cpu", "--workers", "0", "--bootstrap", "0", "--gradcam", "0"]
    assert evaluate.main(["--ensemble", *runs, "--out", str(tmp_path / "ens"), *flags]) == 0
    m = json.loads((tmp_path / "ens" / "metrics.json").read_text(), parse_constant=float)
    holdout = common.load_data(demo_root).holdout_patients
    assert m["k"] == K and len(m["folds"]) == K and m["holdout_patients"] == holdout
    assert m["decision"]["ensemble"] == "vote" and all(f["decision"]["stored_with_model"] for f in m["folds"])
    assert "patient_mil" in m["ensemble"] and all("patient_mil" in f for f in m["folds"])
    rows = read_csv(tmp_path / "ens" / "patients.csv")
    for r in rows:  # the call is the majority of the fold models' own calls (K = 3: never a tie)
        votes = r["votes"].split("; ")
        assert len(votes) == K and r["call"] == max(set(votes), key=votes.count)
    # the share each fold model and the ensemble flag, from the calls alone
    assert m["flagged"]["ensemble"]["positive"] == sum(r["call"] == "positive" for r in rows)
    assert [f["positive"] for f in m["flagged"]["folds"]] == [sum(r["votes"].split("; ")[i] == "positive"
                                                                  for r in rows) for i in range(K)]
    report = (tmp_path / "ens" / "report.md").read_text()
    assert "the ensemble of 3 fold models" in report and "Flagged HoldOut patients (no label read)" in report
    look = m["looks"]["holdout"]["look"]
    assert f"Look {look} at the HoldOut's labels by this ensemble's fold models" in report
    # the HoldOut's labels reach the metrics only: turned over, every score, probability and call stays
    flipped = flipped_diagnoses(demo_root, set(holdout), tmp_path / "flipped")
    assert evaluate.main(["--ensemble", *runs, "--out", str(tmp_path / "ens2"), "--data-root", str(flipped),
                          *flags]) == 0
    a, b = (read_csv(tmp_path / d / "patients.csv") for d in ("ens", "ens2"))
    keep = ("patient", "n_patches", "rule_score", "rule_call", "mil_probability", "mil_call", "call", "votes")
    assert [{k: r[k] for k in keep} for r in a] == [{k: r[k] for k in keep} for r in b]
    assert [r["label"] for r in a] != [r["label"] for r in b]
    m2 = json.loads((tmp_path / "ens2" / "metrics.json").read_text(), parse_constant=float)
    assert m2["flagged"] == m["flagged"]
    assert m2["looks"]["holdout"]["look"] == look + 1  # other labels: new numbers, a new look
    # predict.py --ensemble on the HoldOut folders copied without any label: the same scores and calls
    slides = tmp_path / "slides"
    shutil.copytree(demo_root / common.TREES["holdout"], slides)
    assert predict.main(["--ensemble", *runs, "--input", str(slides), "--out", str(tmp_path / "pred"),
                         "--evidence", "0", "--device", "cpu", "--workers", "0"]) == 0
    new = {r["patient"]: r for r in read_csv(tmp_path / "pred" / "patients.csv")}
    assert set(new) == {r["patient"] for r in a}
    for r in a:
        p = new[r["patient"]]
        assert abs(float(p["rule_score"]) - float(r["rule_score"])) <= 1e-6
        assert abs(float(p["mil_probability"]) - float(r["mil_probability"])) <= 1e-6
        assert (p["call"], p["votes"]) == (r["call"], r["votes"])


def test_an_ensemble_counts_and_lists_its_members_earlier_holdout_looks(cv_runs, tmp_path):
    runs = [cv_runs / f"27-f{i}" for i in range(K)]
    flags = ["--holdout", "--device", "cpu", "--workers", "0", "--bootstrap", "0", "--gradcam", "0"]
    for run in runs[:2]:  # two members looked at the HoldOut alone first
        assert evaluate.main(["--checkpoint", str(run / "best.pt"), *flags]) == 0
    where = cv_runs / ledger.NAME
    n = len(ledger.read(where))
    # --seed 1: not the evaluation an earlier test may have run (that one again would be a repeat of its look)
    assert evaluate.main(["--ensemble", *map(str, runs), "--out", str(tmp_path / "ens"), *flags, "--seed", "1"]) == 0
    m = json.loads((tmp_path / "ens" / "metrics.json").read_text(), parse_constant=float)
    looks = m["looks"]["holdout"]
    assert looks["look"] >= 3 and not looks["repeat_of"] and {str(r / "best.pt") for r in runs[:2]} <= {e.get("checkpoint")
                                                                             for e in looks["earlier"]}
    report = (tmp_path / "ens" / "report.md").read_text()
    assert str(runs[0] / "best.pt") in report and str(runs[1] / "best.pt") in report
    entries = ledger.read(where)
    assert len(entries) == n + 1  # the folds' eval/ were reused: only the ensemble's own line
    shas = [common.file_sha256(r / "best.pt") for r in runs]
    # the vote reads no fold's test part (each fold's decision came from its own validation part)
    assert entries[-1]["kind"] == "ensemble" and entries[-1]["sha256s"] == shas and "uses" not in entries[-1]


def test_a_fold_without_its_patient_model_is_named_in_the_terminal_and_the_report(cv_runs, tmp_path, capsys):
    runs = tmp_path / "runs"
    for i in range(K):  # the folds as they are, but fold 1 without its patient model
        shutil.copytree(cv_runs / f"27-f{i}", runs / f"27-f{i}", ignore=shutil.ignore_patterns(
            *(["patient", "eval", "eval-holdout"] if i == 1 else [])))
    folders = [str(runs / f"27-f{i}") for i in range(K)]
    assert evaluate.main(["--cv", *folders, "--device", "cpu", "--workers", "0", "--bootstrap", "0",
                          "--gradcam", "0"]) == 0
    err = capsys.readouterr().err
    assert f"{runs / '27-f1'}: no eval/ of this best.pt with these flags; evaluating it now" in err
    assert f"warning: {runs / '27-f1'}: no patient model" in err
    report = (runs / "27-cv" / "report.md").read_text()
    assert "**Patient model left out of the pooling**" in report and str(runs / "27-f1") in report
    assert evaluate.main(["--ensemble", *folders, "--holdout", "--device", "cpu", "--workers", "0", "--bootstrap",
                          "0", "--gradcam", "0"]) == 0
    assert f"warning: {runs / '27-f1'}: no patient model" in capsys.readouterr().err
    ensemble = json.loads((runs / "27-ensemble" / "metrics.json").read_text(), parse_constant=float)
    assert ensemble["patient_model_missing"] == [str(runs / "27-f1")] and "patient_mil" not in ensemble["ensemble"]
    assert "**No patient model in the ensemble**" in (runs / "27-ensemble" / "report.md").read_text()


def test_a_fold_without_folds_is_refused_without_none(demo_root, tmp_path, capsys):
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-id", "x", "--fold", "2",
                       *FOLD_FLAGS]) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "error: --fold 2: give the number of folds too (--folds K)"


def test_the_fold_stratified_auc_interval_is_the_pooled_ones_cluster_bootstrap_recomputed_with_sklearn():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    n = 40
    y = np.tile([0, 1], n // 2)
    fold = np.repeat([0, 1], n // 2)
    s = y + rng.normal(size=n) + 2.0 * fold  # fold 1's model scores everything higher
    patients = [f"P{i:02d}" for i in range(n)]  # cluster c is patient P{c:02d}
    out = {"roc_auc_fold_stratified": metrics.stratified_roc_auc(y, s, fold), "ci95": {}}
    crossval.stratified_interval(out, y, s, fold, patients, [], 200, seed=0)

    def stratified(idx):  # pairs within a fold only, each fold weighted by its pairs
        num = den = 0.0
        for k in (0, 1):
            sel = idx[fold[idx] == k]
            pos, neg = y[sel].sum(), (1 - y[sel]).sum()
            if pos and neg:
                num, den = num + roc_auc_score(y[sel], s[sel]) * pos * neg, den + pos * neg
        return num / den if den else np.nan
    draws = metrics.cluster_draws(n, 200, 0, stream=1)
    boot = np.array([stratified(d) for d in draws])
    jack = np.array([stratified(np.delete(np.arange(n), i)) for i in range(n)])
    expected = metrics.bca_interval(boot, stratified(np.arange(n)), jack)[:2]
    assert out["ci95"]["roc_auc_fold_stratified"] == pytest.approx(list(expected))
    assert out["roc_auc_fold_stratified"] == pytest.approx(stratified(np.arange(n)))
