"""The patient model: feature bags (bags.py), gated-attention MIL (mil.py), train_patient.py, and evaluate.py's report
of it beside the patient rule."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from scipy import stats

import evaluate
import train
import train_patient
import common
from helico import analysis, bags, metrics, mil, model
from conftest import flipped_diagnoses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest patch run with a stain reference: 32 px, Macenko on, 48 samples, one epoch.
PATCH_FLAGS = ["--device", "cpu", "--image-size", "32", "--batch-size", "16", "--weights", "none", "--workers", "0",
               "--seed", "0", "--limit-samples", "48", "--epochs", "1"]
PATIENT_FLAGS = ["--device", "cpu", "--workers", "0", "--mil-seeds", "2", "--epochs", "8"]


# ----------------------------------------------------------------------------------------------- the model alone
def synthetic_bags(n: int, seed: int, dim: int = 8):
    """Bags of 20-40 N(0, 1) patches; a positive bag has 1-3 patches shifted by +6 on feature 0 (the 'bacteria')."""
    g = np.random.default_rng(seed)
    out, labels, planted = [], [], []
    for i in range(n):
        x = g.normal(size=(g.integers(20, 40), dim))
        y = i % 2
        hot = np.zeros(len(x), bool)
        if y:
            hot[g.choice(len(x), g.integers(1, 4), replace=False)] = True
            x[hot, 0] += 6
        out.append(torch.tensor(x, dtype=torch.float32))
        labels.append(y)
        planted.append(hot)
    return out, labels, planted


def test_attention_pooling_ignores_patch_order_and_its_weights_sum_to_one():
    torch.manual_seed(0)
    net = mil.GatedAttentionMIL(8).eval()
    bag = torch.randn(30, 8)
    logit, a = net(bag)
    perm = torch.randperm(30)
    logit2, a2 = net(bag[perm])
    assert torch.allclose(logit, logit2, atol=1e-6) and torch.allclose(a[perm], a2)
    assert torch.softmax(a, 0).sum().item() == pytest.approx(1.0)
    assert a.shape == (30,) and logit.shape == ()


def test_fit_learns_a_planted_signal_attends_to_it_and_is_deterministic_by_seed():
    tb, ty, _ = synthetic_bags(30, 0)
    vb, vy, _ = synthetic_bags(12, 1)
    sb, sy, planted = synthetic_bags(20, 2)
    fits = [mil.fit(tb, ty, vb, vy, seed=s, seeds=1, epochs=10) for s in (0, 0, 1)]
    same, again, other = fits
    assert all(torch.equal(same["states"][0][k], again["states"][0][k]) for k in same["states"][0])
    assert same["records"] == again["records"]
    assert not all(torch.equal(same["states"][0][k], other["states"][0][k]) for k in same["states"][0])
    best = min(same["records"], key=lambda r: (r["val_loss"], r["epoch"]))
    assert same["epoch"] == best["epoch"]  # the lowest validation cross-entropy, the earlier epoch on a tie
    ckpt = mil.checkpoint(state=same["states"], config=same["config"], patch_checkpoint={}, split={}, features={},
                          bag_key="k", epoch=same["epoch"], val_loss=best["val_loss"])
    net = mil.from_checkpoint(ckpt)
    probs, hot_rank = [], []
    for b, hot in zip(sb, planted):
        p, a, _ = mil.predict(net, b)
        probs.append(p)
        if hot.any():
            hot_rank.append(metrics.roc_auc(hot.astype(int), a))
    assert metrics.roc_auc(np.array(sy), np.array(probs)) >= 0.95  # unseen bags
    assert np.mean(hot_rank) >= 0.9  # the attention falls on the planted patches


def test_fit_refuses_training_patients_of_one_class():
    tb, _, _ = synthetic_bags(6, 0)
    with pytest.raises(mil.DataError, match="all one class"):
        mil.fit(tb, [0] * 6, tb, [0, 1] * 3)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (3, 9), (7, 7), (12, 2), (1, 30)])
def test_exact_mcnemar_equals_scipys_two_sided_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    assert metrics.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_paired_comparison_counts_discordant_patients_and_pairs_the_bootstrap():
    rows = [{"patient": f"P{i}", "label": y, "n_patches": 5, "prediction": pr, "score": s, "mil_prediction": mp,
             "mil_probability": m}
            for i, (y, pr, s, mp, m) in enumerate([(1, 1, .9, 0, .2), (1, 0, .1, 1, .8), (1, 0, .2, 1, .7),
                                                   (0, 0, .1, 0, .1), (0, 1, .6, 0, .3)])]
    out = analysis.paired_comparison(rows, [r["patient"] for r in rows])
    assert (out["rule_only_correct"], out["model_only_correct"], out["patients"]) == (1, 3, 5)
    assert out["mcnemar_exact_p"] == pytest.approx(stats.binomtest(1, 4, 0.5).pvalue)
    y = [1, 1, 1, 0, 0]
    expected = metrics.roc_auc(y, [.2, .8, .7, .1, .3]) - metrics.roc_auc(y, [.9, .1, .2, .1, .6])
    assert out["roc_auc_difference"] == pytest.approx(expected)
    assert "ci95" not in out and "fewer than 10" in out["ci_note"]  # 3 + 2 patients: no interval


def test_the_paired_auc_difference_uses_the_same_patients_in_the_point_and_every_resample():
    """Patients the patient model cannot decide (no bag) are out of the point; they must be out of every resample
    too, for both scores: recomputed with scikit-learn on the drawn rows of the patients where both decide."""
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    n = 30
    y = np.r_[np.ones(n // 2, int), np.zeros(n // 2, int)]
    rule, mil = y + rng.normal(size=n), y + rng.normal(size=n)
    rows = [{"patient": f"P{i:02d}", "label": int(y[i]), "n_patches": 5, "score": float(rule[i]),
             "prediction": int(rule[i] > 0.5), "mil_probability": float(mil[i]),
             "mil_prediction": -1 if i in (0, 1, 20) else int(mil[i] > 0.5)} for i in range(n)]
    patients = [r["patient"] for r in rows]
    draws = analysis.part_draws(patients, [], 300, seed=0)
    out = analysis.paired_comparison(rows, patients, [], draws)
    both = np.array([r["mil_prediction"] >= 0 for r in rows])
    assert out["patients"] == both.sum() == n - 3
    assert out["roc_auc_difference"] == pytest.approx(roc_auc_score(y[both], mil[both]) -
                                                      roc_auc_score(y[both], rule[both]))
    deltas = []
    for d in draws:  # cluster c is patient P{c:02d}; only the patients where both decide
        idx = np.array([i for i in d if both[i]])
        if len(set(y[idx])) == 2:
            deltas.append(roc_auc_score(y[idx], mil[idx]) - roc_auc_score(y[idx], rule[idx]))
    assert out["ci95"] == pytest.approx(list(np.percentile(deltas, [2.5, 97.5])))


# ----------------------------------------------------------------------------------------------- on the demo
@pytest.fixture(scope="module")
def patch_run(small_demo_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("patient-runs")
    assert train.main(["--data-root", str(small_demo_root), "--runs-dir", str(runs), "--run-id", "p",
                       *PATCH_FLAGS]) == 0
    return runs / "p"


@pytest.fixture(scope="module")
def patient_run(patch_run):
    assert train_patient.main(["--checkpoint", str(patch_run / "best.pt"), *PATIENT_FLAGS]) == 0
    return patch_run / "patient"


def bag_folder(patient_run) -> "os.PathLike":
    return patient_run / mil.load_checkpoint(patient_run / "best.pt")["features"]["bags"]


def test_bag_features_are_the_patch_models_penultimate_outputs_for_the_same_pixels(patch_run, patient_run,
                                                                                   small_demo_root):
    ckpt = common.load_checkpoint(patch_run / "best.pt")
    net, normalizer = model.from_checkpoint(ckpt, "best.pt", None, torch.device("cpu"))
    assert normalizer is not None  # the run's Macenko is applied before the features
    key = mil.load_checkpoint(patient_run / "best.pt")["bag_key"]
    data = common.load_data(small_demo_root)
    patient = ckpt["split"]["test"][0]
    bag = bags.load(bag_folder(patient_run), patient, key)
    wanted = bags.patient_samples(data, [patient])[patient]
    assert bag.paths == [s.path for s, _ in wanted] and {"cropped", "annotated"} <= set(bag.roles)
    assert "annotated" not in {r for r, keep in zip(bag.roles, bag.rows()) if keep}  # windows: never in the bag
    images = torch.stack([common.PatchDataset(small_demo_root, [s for s, _ in wanted], 32)[i][0]
                          for i in range(len(wanted))])
    body, head = model.penultimate(net)
    with torch.no_grad():
        x = model.model_input(images, normalizer)
        expected = body(x)
        logits = net(x).reshape(-1)
    assert bag.features.dtype == torch.float16 and bag.features.shape == expected.shape == (len(wanted), 512)
    assert torch.allclose(bag.features.float(), expected, rtol=2e-3, atol=2e-3)
    assert torch.allclose(head(expected).reshape(-1), logits, atol=1e-4)  # the layer right before the logit


def test_flipping_test_and_holdout_diagnoses_leaves_the_patient_model_bitwise_unchanged(patch_run, patient_run,
                                                                                        small_demo_root, tmp_path):
    before = (patient_run / "best.pt").read_bytes()
    ckpt = common.load_checkpoint(patch_run / "best.pt")
    data = common.load_data(small_demo_root)
    hidden = set(ckpt["split"]["test"]) | set(data.holdout_patients)
    flipped = flipped_diagnoses(small_demo_root, hidden, tmp_path / "flipped")
    assert sum(a != b for a, b in zip((flipped / "PatientDiagnosis.csv").read_text().splitlines(),
                                      (small_demo_root / "PatientDiagnosis.csv").read_text().splitlines())) >= \
        len(hidden) - 1
    shutil.rmtree(bag_folder(patient_run))  # extracted again, under the flipped diagnoses
    assert train_patient.main(["--checkpoint", str(patch_run / "best.pt"), "--data-root", str(flipped),
                               *PATIENT_FLAGS]) == 0
    assert (patient_run / "best.pt").read_bytes() == before


def test_a_killed_extraction_resumes_at_the_first_patient_not_stored(patch_run, patient_run, tmp_path, capsys):
    run = tmp_path / "copy"
    run.mkdir()
    shutil.copy(patch_run / "best.pt", run / "best.pt")
    cmd = [sys.executable, os.path.join(ROOT, "train_patient.py"), "--checkpoint", str(run / "best.pt"),
           "--batch-size", "4", *PATIENT_FLAGS[:-2], "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(run.glob("patient/bags/*/*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("stopped by")]
    assert stopped == ["stopped by SIGTERM: the bags extracted so far are kept; run the same command again to resume"]
    kept = len(list(run.glob("patient/bags/*/*.pt")))
    assert 1 <= kept and not list(run.glob("patient/bags/*/.*.tmp"))  # whole files only
    capsys.readouterr()
    assert train_patient.main([str(a) for a in cmd[2:4]] + PATIENT_FLAGS) == 0  # again (default batch, no workers)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("features:"))
    assert f"{kept} reused" in line
    ours, theirs = run / "patient", patient_run
    key = mil.load_checkpoint(ours / "best.pt")["bag_key"]
    assert key == mil.load_checkpoint(theirs / "best.pt")["bag_key"]
    for f in sorted(bag_folder(theirs).glob("*.pt")):
        a, b = (bags.load(bag_folder(d), f.stem, key) for d in (ours, theirs))
        assert a.paths == b.paths and torch.allclose(a.features.float(), b.features.float(), atol=2e-3)


def test_evaluate_reports_the_patient_model_beside_the_rule_on_the_same_patients(patch_run, patient_run):
    assert evaluate.main(["--checkpoint", str(patch_run / "best.pt"), "--holdout", "--device", "cpu", "--workers",
                          "0", "--bootstrap", "20", "--gradcam", "0"]) == 0
    out = patch_run / "eval-holdout"
    m = json.loads((out / "metrics.json").read_text(), parse_constant=float)
    assert set(m["patient_mil"]) - {"attention", "calibration"} == set(m["patient"])
    assert m["patient_mil"]["rule"] == analysis.MIL_RULE and np.isfinite(m["patient_mil"]["threshold"])
    assert m["selection"]["patient_mil"]["threshold"] == m["patient_mil"]["threshold"]  # chosen on validation
    assert m["patient_mil"]["n"] == m["patient"]["n"]
    assert m["holdout"]["patient_mil"]["n"] == m["holdout"]["patient"]["n"]
    assert m["patient_mil"]["ci_method"]["accuracy"] == "exact binomial (Clopper-Pearson)"
    cmp = m["patient_vs_mil"]
    assert cmp["patients"] == m["patient"]["n"] and 0 <= cmp["mcnemar_exact_p"] <= 1
    assert m["patient_mil"]["attention"]["windows"] > 0
    with open(out / "patients.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test = [r for r in rows if r["split"] == "test" and r["prediction"] != "-1"]
    assert test and all(r["mil_probability"] and r["mil_prediction"] in ("0", "1") for r in test)
    t = m["patient_mil"]["threshold"]
    assert all(int(float(r["mil_probability"]) >= t) == int(r["mil_prediction"]) for r in test)
    report = (out / "report.md").read_text()
    assert "### Patient model beside the rule" in report and "exact McNemar" in report
    assert (out / "attention_gallery.png").stat().st_size > 1000


def test_a_patient_model_of_another_checkpoint_is_not_shown_and_the_report_says_why(patch_run, patient_run,
                                                                                      tmp_path):
    shutil.copytree(patient_run, tmp_path / "patient")
    ckpt = torch.load(patch_run / "best.pt", weights_only=True)
    ckpt["model"]["fc.bias"] += 1  # best.pt trained further: its features are not the bags' features any more
    torch.save(ckpt, tmp_path / "best.pt")
    out = tmp_path / "eval-other"
    assert evaluate.main(["--checkpoint", str(tmp_path / "best.pt"), "--device", "cpu", "--workers", "0",
                          "--bootstrap", "0", "--gradcam", "0", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text(), parse_constant=float)
    assert "patient_mil" not in m and "mil_probability" in (out / "patients.csv").read_text()
    assert "trained on the features of another checkpoint" in m["meta"]["patient_model_note"]
    assert "trained on the features of another checkpoint" in (out / "report.md").read_text()


def test_the_benchmark_times_mil_training_and_extraction_and_names_the_machine(patch_run, tmp_path, capsys):
    import bench_patient
    out = tmp_path / "bench.json"
    assert bench_patient.main(["--train-bags", "6", "--val-bags", "4", "--bag-size", "20", "--features", "16",
                               "--epochs", "2", "--mil-seeds", "1", "--checkpoint", str(patch_run / "best.pt"), "--device", "cpu",
                               "--workers", "0", "--patches", "40", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("machine: ") and "mil      6 training + 4 validation bags" in text and "img/s" in text
    mil_, extract = json.loads(out.read_text())
    assert mil_["epochs"] == 2 and mil_["seconds"] > 0 and extract["patches"] == 40 and extract["img_s"] > 0


def test_train_patient_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert train_patient.main(["--checkpoint", str(tmp_path / "best.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --checkpoint {tmp_path / 'best.pt'}: file not found"
    assert train_patient.main(["--checkpoint", str(tmp_path / "best.pt"), "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --epochs 0: must be >= 1"
