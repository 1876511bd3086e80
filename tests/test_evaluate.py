"""evaluate.py on the tiny trained demo run: every output parses, and every number is recomputed independently
(scikit-learn on predictions.csv / patients.csv, file counts on disk, the checkpoint's own validation metrics)."""
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

import common
import evaluate
from helico import analysis, eval_report, gradcam, metrics, model, packed_cache, staining
from helico.crossval import read_csv  # the one reader of the project's CSVs

FAST = ["--device", "cpu", "--workers", "0", "--bootstrap", "200", "--seed", "0"]
LEVELS = ("patch", "patch_at_0.5", "by_source.annotated", "by_source.supplemental", "patient", "selection.patient",
          "holdout.patient")


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def level(metrics: dict, dotted: str) -> dict:
    for key in dotted.split(".") if dotted != "patch_at_0.5" else [dotted]:
        metrics = metrics[key]
    return metrics


@pytest.fixture(scope="module")
def evaluation(tiny_run, tmp_path_factory):
    """One --holdout evaluation of the tiny run (into a temp --out: the session's run folder stays untouched)."""
    ckpt = tiny_run / "best.pt"
    before = sha256(ckpt)
    out = tmp_path_factory.mktemp("evaluation") / "eval"
    assert evaluate.main(["--checkpoint", str(ckpt), "--out", str(out), "--holdout", "--gradcam", "3", *FAST]) == 0
    return {"out": out, "ckpt": ckpt, "sha_before": before, "metrics": json.loads((out / "metrics.json").read_text()),
            "predictions": read_csv(out / "predictions.csv"), "patients": read_csv(out / "patients.csv")}


def patch_rows(evaluation, **where):
    return [r for r in evaluation["predictions"] if r["patch_eval"] == "1" and all(r[k] == v for k, v in where.items())]


# ----------------------------------------------------------------------------------------------- outputs
def test_every_output_file_exists_and_parses(evaluation):
    out = evaluation["out"]
    assert evaluation["metrics"]["patch"]["n"] == len(patch_rows(evaluation, split="test", source="annotated")) > 0
    assert evaluation["patients"] and evaluation["predictions"]
    groups = [g for g in gradcam.GRADCAM_GROUPS if g in np.load(out / "gradcam/heatmaps.npz").files]
    assert "true_positives" in groups  # the max-F1 threshold always keeps at least one true positive
    pngs = ["figures/pr_curve.png", "figures/roc_curve.png", "figures/score_histograms.png",
            "figures/confusion_matrix.png", "learning_curves.png", *[f"gradcam/{g}.png" for g in groups]]
    for name in pngs:
        with Image.open(out / name) as im:
            im.verify()
    report = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert set(pngs) <= set(links) and all((out / link).is_file() for link in links)
    assert [p.name for p in out.parent.iterdir()] == ["eval"]  # no temp folder left beside it


def test_the_report_gives_sensitivity_by_grade_predictive_values_and_calibration(evaluation):
    from sklearn.metrics import brier_score_loss
    m, out = evaluation["metrics"], evaluation["out"]
    rows = patch_rows(evaluation, split="test", source="annotated")
    y, s = [int(r["label"]) for r in rows], [float(r["score"]) for r in rows]
    assert m["patch"]["calibration"]["brier"] == pytest.approx(brier_score_loss(y, s))
    easy = patch_rows(evaluation, split="test", source="supplemental")  # Cropped of NEGATIVA: a rate per patient
    rates = {p: np.mean([float(r["score"]) >= m["patch"]["threshold"] for r in easy if r["patient"] == p])
             for p in {r["patient"] for r in easy}}
    assert m["cropped_negatives"]["per_patient"] == pytest.approx(rates)
    assert m["cropped_negatives"]["patches"] == len(easy)
    p = m["patient"]
    decided = [r for r in evaluation["patients"] if r["split"] == "test" and r["label"] != "-1"
               and r["prediction"] != "-1"]
    for grade in ("BAIXA", "ALTA"):
        mine = [r for r in decided if r["diagnosis"] == grade]
        g = p["by_grade"][grade]
        assert (g["n"], g["found"]) == (len(mine), sum(r["prediction"] == "1" for r in mine))
        assert g["ci95"] == list(metrics.clopper_pearson(g["found"], g["n"]))
    assert set(p["predictive_values"]) == {"0.05", "0.1", "0.3", "0.5"}
    (tn, fp), (fn, tp) = p["confusion"]
    for prev, v in p["predictive_values"].items():  # carried through the exact bounds at 97.5% each
        expected = metrics.predictive_values(tp, tp + fn, tn, tn + fp)[prev]
        assert (v["ppv_ci95"], v["npv_ci95"]) == (expected["ppv_ci95"], expected["npv_ci95"])
    report = (out / "report.md").read_text()
    v = p["predictive_values"]["0.05"]
    assert f"PPV {eval_report.fmt(v['ppv'])} [{eval_report.fmt(v['ppv_ci95'][0])}, " in report
    assert "Sensitivity by grade (exact binomial 95% CIs)" in report and "PPV / NPV at stated prevalences" in report
    assert "**The scores are not calibrated probabilities**" in report and "figures/reliability.png" in report
    assert "| stain normalization | macenko (ihc mode) |" in report  # the mode the checkpoint holds, not a constant
    survey = json.loads((evaluation["ckpt"].parent / "stain_survey.json").read_text())  # train.py's, in the report
    measured = sum(a is not None for a in survey["angles"].values())
    assert f"| DAB hue survey | {len(survey['far'])} of {measured} measured slides more than 4 degrees" in report
    assert all(slide in report for slide in survey["far"])
    with Image.open(out / "figures/reliability.png") as im:
        im.verify()


def test_report_shows_the_stain_strip_of_validation_positives_and_hard_negatives(evaluation, demo_root):
    with Image.open(evaluation["out"] / "stain_preview.png") as im:
        width, height = im.size  # 3 columns (original | as trained | canonical), 3 + 3 positives, 6 negatives
    rows = patch_rows(evaluation, split="val")
    positives, negatives = sum(r["label"] == "1" for r in rows), sum(r["label"] == "0" for r in rows)
    shown = min(positives, 6) + min(negatives, 6)
    assert width == 4 + 3 * (160 + 4) and height == 14 + shown * (160 + 14 + 4) + 4
    assert "](stain_preview.png)" in (evaluation["out"] / "report.md").read_text()


def test_predictions_cover_the_val_test_and_holdout_patches_once_byte_identical_copies_once(evaluation, demo_root):
    data = common.load_data(demo_root)
    meta = evaluation["metrics"]["meta"]
    patients = meta["val_patients"] + meta["test_patients"]
    assert meta["test_patients"] and not set(meta["val_patients"]) & set(meta["test_patients"])
    rows = evaluation["predictions"]
    assert len({r["path"] for r in rows}) == len(rows)
    for scored, expected in (({r["path"] for r in patch_rows(evaluation)}, common.select(data.labelled, patients)),
                             ({r["path"] for r in rows if r["patient_eval"] == "1"},
                              common.select(data.cropped, patients) + data.holdout)):
        assert scored <= {s.path for s in expected}
        counted = {sha256(demo_root / p) for p in scored}
        assert len(counted) == len(scored)  # no content counted twice ...
        assert all(sha256(demo_root / s.path) in counted for s in expected)  # ... and none left out
    assert any("B22-201" in p for p in meta["identical_not_counted"])  # the demo's copied patient
    assert all(r["prediction"] == str(int(float(r["score"]) >= evaluation["metrics"]["patch"]["threshold"]))
               for r in rows)


# ----------------------------------------------------------------------------------------------- patch metrics
@pytest.mark.parametrize("name, source", [("patch", "annotated"), ("patch_at_0.5", "annotated"),
                                          ("by_source.annotated", "annotated"), ("all_labelled", None)])
def test_patch_metrics_equal_sklearn_recomputed_from_predictions_csv(evaluation, name, source):
    m = level(evaluation["metrics"], name)
    rows = patch_rows(evaluation, split="test", **({"source": source} if source else {}))
    y = np.array([int(r["label"]) for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    pred = (s >= m["threshold"]).astype(int)
    assert m["n"] == len(rows) and m["positives"] == y.sum()
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=np.nan), nan_ok=True)
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["confusion"] == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()
    assert m["dummy_accuracy"] == pytest.approx(1 - y.mean())
    stored = float(torch.load(evaluation["ckpt"], weights_only=True)["threshold"])
    assert m["threshold"] == (0.5 if name == "patch_at_0.5" else stored)


def test_patch_metrics_reproduce_the_validation_metrics_logged_by_training(evaluation):
    # same windows and the same eval preprocessing (Macenko -> ImageNet normalization) as train.py's validation
    trained = torch.load(evaluation["ckpt"], weights_only=True)["val_metrics"]
    m = evaluation["metrics"]["selection"]["patch"]  # the validation part, byte-identical copies once in both
    for k in ("pr_auc", "roc_auc", "recall", "precision", "n", "positives"):
        assert m[k] == pytest.approx(float(trained[k]), abs=1e-6), k


def test_scores_follow_trainings_eval_preprocessing_with_the_stored_stain_reference(tiny_run, demo_root):
    import macenko_gpu
    data = common.load_data(demo_root)
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    reference = macenko_gpu.synthetic_ihc_tiles(1, 256, seed=3)[0]  # a tile with both stains, as the real one has
    ckpt["stain"] = macenko_gpu.MacenkoNormalizer().fit(reference).state_dict()
    net, normalizer = model.from_checkpoint(ckpt, "best.pt", None, torch.device("cpu"))
    samples, size = data.labelled[:6], ckpt["image_size"]
    scores, bad = evaluate.score_samples(net, normalizer, demo_root, samples, size, torch.device("cpu"), batch_size=4,
                                         workers=0)
    images = torch.stack([common.PatchDataset(demo_root, samples, size)[i][0] for i in range(len(samples))])
    with torch.no_grad():
        expected = torch.sigmoid(net(model.model_input(images, normalizer)).reshape(-1)).numpy()
        unstained = torch.sigmoid(net(model.model_input(images, None)).reshape(-1)).numpy()
    assert bad == [] and np.allclose(scores, expected, atol=1e-5)
    assert not np.allclose(scores, unstained, atol=1e-3)  # the stain reference really is applied


def test_undefined_metrics_are_nan_with_a_reason_never_minus_one(evaluation):
    supplemental = evaluation["metrics"]["by_source"]["supplemental"]
    assert supplemental["positives"] == 0  # Cropped patches of NEGATIVA patients only
    for k in ("pr_auc", "roc_auc", "recall"):
        assert math.isnan(supplemental[k]) and "positive" in supplemental["undefined"][k]

    def numbers(d):
        for v in d.values():
            yield from numbers(v) if isinstance(v, dict) else [v] if isinstance(v, float) else []
    assert -1.0 not in list(numbers({k: v for k, v in evaluation["metrics"].items() if k != "meta"}))
    assert "NaN (undefined" in (evaluation["out"] / "report.md").read_text()


# ----------------------------------------------------------------------------------------------- patient level
def test_patient_scores_aggregate_every_cropped_patch_on_disk(evaluation, demo_root):
    m = evaluation["metrics"]
    k, threshold = m["patient"]["top_k"], m["patch"]["threshold"]
    scores = {}
    for r in evaluation["predictions"]:
        if r["patient_eval"] == "1":
            scores.setdefault(r["patient"], []).append(float(r["score"]))
    identical = set(m["meta"]["identical_not_counted"])
    for row in evaluation["patients"]:
        tree = "CrossValidation/Cropped" if row["split"] in ("val", "test") else "HoldOut"
        on_disk = len([f for f in (demo_root / tree).glob(f"{row['patient']}_*/*.png")
                       if f.relative_to(demo_root).as_posix() not in identical])
        if on_disk == 0:  # B22-201: all its patches are byte-identical copies of B22-200's, counted there
            assert int(row["n_patches"]) == 0 and row["patient"] in m["patient"]["excluded"] | \
                m["selection"]["patient"]["excluded"]
            continue
        s = np.sort(scores[row["patient"]])
        assert int(row["n_patches"]) == len(s) == on_disk
        assert float(row["fraction_positive"]) == pytest.approx(np.mean(s >= threshold))
        assert float(row["topk_mean"]) == pytest.approx(s[-k:].mean())
        assert float(row["top_share_mean"]) == pytest.approx(s[-int(np.ceil(0.1 * len(s))):].mean())
        assert float(row["score"]) == float(row[m["patient"]["rule"]])


@pytest.mark.parametrize("split, name", [("test", "patient"), ("val", "selection.patient"),
                                         ("holdout", "holdout.patient")])
def test_patient_metrics_equal_sklearn_recomputed_from_patients_csv(evaluation, split, name):
    m = level(evaluation["metrics"], name)
    rows = [r for r in evaluation["patients"] if r["split"] == split and int(r["n_patches"]) > 0]
    y = np.array([int(r["label"]) for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    pred = (s >= m["threshold"]).astype(int)
    assert [int(r["prediction"]) for r in rows] == pred.tolist()
    assert m["n"] == len(rows) and m["positives"] == y.sum()
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, s))


def test_patient_rule_maximises_youden_j_on_validation_patients(evaluation):
    p = evaluation["metrics"]["selection"]["patient"]
    rows = [r for r in evaluation["patients"] if r["split"] == "val" and int(r["n_patches"]) > 0]
    y = np.array([int(r["label"]) for r in rows])
    best = {}
    for rule, cand in p["candidates"].items():
        fpr, tpr, _ = skm.roc_curve(y, [float(r[rule]) for r in rows])
        best[rule] = max(tpr - fpr)
        assert cand["youden_j"] == pytest.approx(best[rule])
    assert best[p["rule"]] == max(best.values())
    pred = np.array([float(r[p["rule"]]) >= p["threshold"] for r in rows])
    assert pred[y == 1].mean() - pred[y == 0].mean() == pytest.approx(best[p["rule"]])


def test_holdout_evaluation_never_changes_the_stored_thresholds(evaluation):
    m = evaluation["metrics"]
    assert sha256(evaluation["ckpt"]) == evaluation["sha_before"]
    assert m["patch"]["threshold"] == float(torch.load(evaluation["ckpt"], weights_only=True)["threshold"])
    val = m["selection"]["patient"]
    for applied in (m["holdout"]["patient"], m["patient"]):  # HoldOut and test: chosen on validation, not re-chosen
        assert (applied["rule"], applied["threshold"], applied["candidates"]) == (val["rule"], val["threshold"],
                                                                                  val["candidates"])


# ----------------------------------------------------------------------------------------------- bootstrap
def test_intervals_contain_the_point_estimates(evaluation):
    checked = 0
    for name in LEVELS:
        m = level(evaluation["metrics"], name)
        for k, (lo, hi) in m.get("ci95", {}).items():
            if not math.isnan(m[k]):
                assert lo - 1e-12 <= m[k] <= hi + 1e-12, (name, k, m[k], lo, hi)
                checked += 1
    assert checked >= 9  # at least the exact intervals of three patient proportions in test, val and HoldOut


@pytest.mark.parametrize("name", ["patient", "selection.patient", "holdout.patient"])
def test_no_patient_interval_is_narrower_than_the_exact_binomial_interval_of_its_counts(evaluation, name):
    m = level(evaluation["metrics"], name)
    (tn, fp), (fn, tp) = m["confusion"]
    for k, (hits, n) in {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
                         "accuracy": (tp + tn, tn + fp + fn + tp)}.items():
        lo, hi = m["ci95"][k]
        exact_lo, exact_hi = metrics.clopper_pearson(hits, n)
        assert lo <= exact_lo + 1e-12 and hi >= exact_hi - 1e-12, (k, hits, n, lo, hi)
        assert hi - lo > 0  # two patients never give a zero-width interval


def test_patch_intervals_with_fewer_than_ten_clusters_in_a_class_are_not_estimable(evaluation):
    m = evaluation["metrics"]["patch"]  # the tiny test part holds a handful of infected patients
    assert "ci95" not in m and "not estimable" in m["ci_note"]["pr_auc"] and "fewer than 10" in m["ci_note"]["pr_auc"]
    assert "(CI not estimable)" in (evaluation["out"] / "report.md").read_text()


def synthetic_predictions(n_patients=30, seed=0):
    """Labelled and Cropped rows of n patients (every other one infected, with positive windows); P0 and P1 are a
    duplicated pair."""
    rng = np.random.default_rng(seed)
    samples, patch, score = [], [], []
    for i in range(n_patients):
        infected = i % 2 == 1 or i == 0
        for k in range(6):
            label = int(infected and k < 2)
            samples.append(common.Sample(f"A/P{i}_0/{k}.png", f"P{i}", "annotated", label, k))
            patch.append(True)
            score.append(float(np.clip(rng.normal(0.3 + 0.4 * label, 0.2), 0, 1)))
        for k in range(5):
            samples.append(common.Sample(f"C/P{i}_0/{k}.png", f"P{i}", "supplemental", -1, 100 + k))
            patch.append(False)
            score.append(float(np.clip(rng.normal(0.3 + 0.3 * infected, 0.2), 0, 1)))
    patch = np.array(patch)
    pred = analysis.Predictions(samples, np.array(["test"] * len(samples)), patch, ~patch, np.array(score))
    diagnosis = {f"P{i}": "ALTA" if (i % 2 == 1 or i == 0) else "NEGATIVA" for i in range(n_patients)}
    return pred, [f"P{i}" for i in range(n_patients)], diagnosis


def test_cluster_bootstrap_cis_are_reproducible_with_the_seed_and_treat_a_duplicated_pair_as_one_cluster():
    pred, patients, diagnosis = synthetic_predictions()
    groups = [["P0", "P1"]]
    run = lambda seed: analysis.measure_part(pred, patients, diagnosis, 0.5, 3, groups,
                                        analysis.part_draws(patients, groups, 200, seed))
    (a, _, boot), (again, _, _) = run(0), run(0)
    for name in ("patch", "patch_at_0.5", "by_source.annotated", "patient"):
        np.testing.assert_equal(level(again, name)["ci95"], level(a, name)["ci95"])
    assert level(run(1)[0], "patch")["ci95"] != a["patch"]["ci95"]
    assert a["patch"]["ci_method"]["pr_auc"] == "patient-cluster bootstrap, BCa"
    assert a["patient"]["ci_method"]["sensitivity"].startswith("exact binomial")
    assert analysis.clusters(patients, groups)[1] == len(patients) - 1  # 30 patients, 29 clusters
    assert len(boot["patch.pr_auc"]) == 200


def test_compare_of_a_run_with_itself_gives_zero_deltas_within_noise(tiny_run, tmp_path):
    ckpt = str(tiny_run / "best.pt")
    out = tmp_path / "compare"
    assert evaluate.main(["--compare", ckpt, ckpt, "--out", str(out), "--gradcam", "0", *FAST]) == 0
    table = json.loads((out / "compare.json").read_text())
    assert len(table["deltas"]) == len(analysis.HEADLINE)
    for d in table["deltas"]:
        if math.isnan(d["value"]):
            continue
        assert d["delta"] == 0 and d["verdict"] != "different (CI excludes 0)", d  # NaN CI: < 10 clusters a class
        assert d["ci95"] == [0, 0] or all(math.isnan(v) for v in d["ci95"])
    assert table["part"] == "val"  # the default: models are chosen among on validation, never on test
    assert "One verdict, on the primary metric" in (out / "compare.md").read_text()


# ----------------------------------------------------------------------------------------------- Grad-CAM
def test_gradcam_heatmaps_have_the_patch_size_and_are_not_constant(evaluation):
    size = evaluation["metrics"]["meta"]["image_size"]
    saved = np.load(evaluation["out"] / "gradcam/heatmaps.npz")
    groups = [g for g in gradcam.GRADCAM_GROUPS if g in saved.files]
    assert "true_positives" in groups
    for g in groups:
        maps = saved[g].astype(np.float32)
        assert maps.shape == (len(saved[f"{g}_paths"]), size, size)
        assert all(m.max() - m.min() > 0.5 for m in maps)


def test_gradcam_finds_the_last_spatial_layer_of_a_model_without_layer4():
    torch.manual_seed(0)
    net = common.build_model("mobilenet_v3_small").eval()
    x = torch.randn(2, 3, 64, 64)
    layer, name, size, note = gradcam.gradcam_layer(net, x[:1])
    assert min(size) >= gradcam.MIN_MAP and "2x2" in note  # the deepest map (576, 2, 2) is too coarse at 64 px
    maps, signed = gradcam.gradcam(net, layer, x)
    assert maps.shape == (2, 64, 64) and signed.shape == (2, *size)
    assert all(float(m.max() - m.min()) > 0 for m in maps)
    assert all(p.grad is None for p in net.parameters())  # no gradient left behind


def test_gradcam_keeps_layer4_where_its_map_is_at_least_7x7():
    net = common.build_model("resnet18").eval()
    layer, name, size, note = gradcam.gradcam_layer(net, torch.randn(1, 3, 224, 224))
    assert (layer, name, size, note) == (net.layer4, "layer4", (7, 7), "")
    layer, name, size, note = gradcam.gradcam_layer(net, torch.randn(1, 3, 64, 64))
    assert (name, size) == ("layer2", (8, 8)) and "layer4 would give 2x2" in note


def test_report_states_the_gradcam_layer_and_map_resolution(evaluation):
    cam = evaluation["metrics"]["meta"]["gradcam"]
    assert cam == {"layer": "layer2", "map": [8, 8], "input": 64, "note": "layer4 would give 2x2, coarser than 7x7"}
    assert "layer `layer2`, a 8x8 map for a 64 px patch" in (evaluation["out"] / "report.md").read_text()


# ----------------------------------------------------------------------------------------------- disclosure
def test_report_leads_with_the_test_part_and_says_what_was_chosen_on_val(evaluation, tiny_run):
    report = (evaluation["out"] / "report.md").read_text()
    first = report.split("\n\n")[1]
    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    m = evaluation["metrics"]
    assert first.startswith(f"**Headline: the test part, {len(m['meta']['test_patients'])} patients nothing was chosen")
    assert f"best validation PR-AUC of {len(log)}: " + ", ".join(f"{r['pr_auc']:.3f}" for r in log) in first
    assert f"the patch threshold ({m['patch']['threshold']:.4f})" in first
    assert f"the patient rule ({m['selection']['patient']['rule']} >= " in first
    assert "## Selection set (validation part, optimistic)" in report and "threshold-free" not in report


def test_a_two_part_split_says_there_is_no_untouched_set_first(tiny_ckpt, tmp_path):
    split = {**tiny_ckpt["split"], "val": tiny_ckpt["split"]["val"] + tiny_ckpt["split"]["test"], "test": [],
             "untouched_test": False}
    torch.save({**tiny_ckpt, "split": split}, tmp_path / "best.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "best.pt"), "--gradcam", "0", *FAST]) == 0
    report = (tmp_path / "eval" / "report.md").read_text()
    assert report.split("\n\n")[1].startswith("**No untouched set: this run's split has two parts")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["meta"]["headline"] == "val"


def test_holdout_not_independent_of_crossvalidation_is_refused_with_exit_1(tiny_run, demo_root, tmp_path, capsys):
    root = tmp_path / "HelicoDataSet"
    shutil.copytree(demo_root, root, copy_function=os.link)
    shutil.copytree(root / "CrossValidation/Cropped/B22-14_0", root / "HoldOut/B22-998_0", copy_function=os.link)
    out = tmp_path / "eval"
    args = ["--checkpoint", str(tiny_run / "best.pt"), "--data-root", str(root), "--holdout", "--out", str(out), *FAST]
    assert evaluate.main([*args, "--workers", "2"]) == common.EXIT_LEAK  # as users run it, with DataLoader workers
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "B22-998: byte-identical image(s) with CrossValidation patient(s) B22-14" in err[0]
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- files
def test_a_rerun_replaces_the_eval_folder_whole_and_a_failed_one_keeps_it(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "stale.png").write_text("old")
    with pytest.raises(RuntimeError):
        with eval_report.replaced_folder(out) as tmp:
            (tmp / "metrics.json").write_text("{half}")
            raise RuntimeError("crash mid-way")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "stale.png"]
    with eval_report.replaced_folder(out) as tmp:
        (tmp / "metrics.json").write_text('{"new": 1}')
    assert [p.name for p in out.iterdir()] == ["metrics.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]


# ----------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny_ckpt(tiny_run):
    return torch.load(tiny_run / "best.pt", weights_only=True)


DELETE = object()


def broken(ckpt: dict, changes: dict) -> dict:
    """A copy of the checkpoint with keys replaced (or DELETEd); "val" replaces the split's validation list."""
    ckpt = {**ckpt, "split": dict(ckpt["split"])}
    for key, value in changes.items():
        target = ckpt["split"] if key == "val" else ckpt
        if value is DELETE:
            del target[key]
        else:
            target[key] = value
    return ckpt


BAD = {
    "missing file": (None, [], "file not found"),
    "not a checkpoint": (b"not a zip", [], "unreadable"),
    "lacking the stain reference": ({"stain": DELETE}, [], "missing stain"),
    "another architecture than --arch": ({}, ["--arch", "resnet50"], "not --arch resnet50"),
    "weights of another architecture": ({"arch": "resnet34"}, [], "do not fit a resnet34"),
    "data root lacking a patient of the split": ({"val": ["B22-999"]}, [], "lacks patient(s) of the split"),
    "empty split": ({"val": []}, [], "no validation patients"),
    "negative --bootstrap": ({}, ["--bootstrap", "-1"], "--bootstrap -1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(case, tiny_ckpt, tmp_path, capsys):
    content, flags, message = BAD[case]
    path = tmp_path / "best.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(broken(tiny_ckpt, content), path)
    assert evaluate.main(["--checkpoint", str(path), *FAST, *flags]) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "eval").exists()


def test_refuses_to_replace_an_out_folder_it_did_not_write(tiny_run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("precious")
    args = ["--checkpoint", str(tiny_run / "best.pt"), "--out", str(tmp_path), *FAST]
    assert evaluate.main(args) == common.EXIT_BAD_INPUT
    assert "refusing to replace it" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_compare_needs_two_checkpoints(tiny_run, capsys):
    assert evaluate.main(["--compare", str(tiny_run / "best.pt"), *FAST]) == common.EXIT_BAD_INPUT
    assert "at least two" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--checkpoint", "--compare"])
def test_a_run_folder_given_as_checkpoint_is_refused_naming_its_best_pt(tiny_run, tmp_path, capsys, flag):
    run = tmp_path / "runs" / "demo"  # `evaluate.py --checkpoint runs/demo`: the folder, where best.pt was meant
    run.mkdir(parents=True)
    shutil.copy(tiny_run / "best.pt", run / "best.pt")
    extra = [str(run / "best.pt")] if flag == "--compare" else []
    assert evaluate.main([flag, str(run), *extra, *FAST]) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag} {run}: a folder") and f"pass {run / 'best.pt'}" in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["best.pt", "demo", "runs"]  # no eval/ or compare/ written



# ----------------------------------------------------------------------------------------------- --cache
@pytest.fixture(scope="module")
def cached_evaluation(tiny_run, tmp_path_factory):
    """The evaluation fixture's run again, scored from a packed cache that this first --cache run builds."""
    where = tmp_path_factory.mktemp("cached")
    args = ["--checkpoint", str(tiny_run / "best.pt"), "--holdout", "--gradcam", "0", "--bootstrap", "0", *FAST]
    assert evaluate.main([*args, "--out", str(where / "eval"), "--cache", str(where / "cache")]) == 0
    return {"args": args, "where": where, "cache": where / "cache",
            "predictions": read_csv(where / "eval" / "predictions.csv")}


def scores_by_path(rows) -> dict[str, float]:
    return {r["path"]: float(r["score"]) for r in rows}


def test_cache_gives_the_same_scores_as_decoding_pngs(evaluation, cached_evaluation):
    png, cached = scores_by_path(evaluation["predictions"]), scores_by_path(cached_evaluation["predictions"])
    assert cached.keys() == png.keys()
    assert max(abs(cached[p] - png[p]) for p in png) <= 1e-6
    meta = json.loads((cached_evaluation["cache"] / "meta.json").read_text())
    assert meta["complete"] is True and meta["normalized"] is False  # plain: the checkpoint's stain is applied
    every_patch = {s.path for s in common.load_data(evaluation["metrics"]["meta"]["data_root"]).all_samples()}
    assert meta["count"] == len(every_patch) > len(png)  # the whole dataset, once: training reuses the same cache


def test_a_second_cached_evaluation_decodes_no_png(cached_evaluation, monkeypatch, tmp_path):
    def no_png(self, i):
        raise AssertionError(f"decoded {self.samples[i].path}")
    monkeypatch.setattr(common.PatchDataset, "__getitem__", no_png)
    out = tmp_path / "eval"
    argv = [*cached_evaluation["args"], "--out", str(out), "--cache", str(cached_evaluation["cache"])]
    assert evaluate.main(argv) == 0
    assert scores_by_path(read_csv(out / "predictions.csv")) == scores_by_path(cached_evaluation["predictions"])
    assert json.loads((out / "metrics.json").read_text())["meta"]["cache"] == str(cached_evaluation["cache"])


def test_cache_base_prepares_its_folder_once_and_scores_from_it(cached_evaluation, monkeypatch, tmp_path):
    # prepare() checks every patch file's size and mtime (a stat each, ~220k on the real data): once per evaluation
    calls, prepare = [], packed_cache.prepare
    monkeypatch.setattr(packed_cache, "prepare", lambda *a, **k: calls.append(a[0]) or prepare(*a, **k))
    out, base = tmp_path / "eval", tmp_path / "base"
    assert evaluate.main([*cached_evaluation["args"], "--out", str(out), "--cache-base", str(base)]) == 0
    config = torch.load(cached_evaluation["args"][1], weights_only=True)["config"]  # trained from PNGs, Macenko on
    folder = packed_cache.cache_folder(base, 64, config["macenko"], config["reference_patch"])
    assert calls == [folder]
    assert json.loads((out / "metrics.json").read_text())["meta"]["cache"] == str(folder)
    based, cached = scores_by_path(read_csv(out / "predictions.csv")), scores_by_path(cached_evaluation["predictions"])
    assert based.keys() == cached.keys() and max(abs(based[p] - cached[p]) for p in cached) <= 1e-6


def test_scores_streamed_from_the_host_equal_the_device_resident_ones(cached_evaluation, tmp_path):
    out = tmp_path / "eval"  # --resident-max-frac 0: the reading-thread fallback for a cache too big for the device
    argv = [*cached_evaluation["args"], "--out", str(out), "--cache", str(cached_evaluation["cache"]),
            "--resident-max-frac", "0"]
    assert evaluate.main(argv) == 0
    assert scores_by_path(read_csv(out / "predictions.csv")) == scores_by_path(cached_evaluation["predictions"])


def fitted_stain(reference):
    import macenko_gpu
    image = reference if torch.is_tensor(reference) else macenko_gpu.load_rgb(reference)
    return macenko_gpu.MacenkoNormalizer().fit(image).state_dict()


@pytest.fixture(scope="module")
def normalized_cache(demo_root, tiny_ckpt, tmp_path_factory):
    """A cache normalized to the demo's default stain reference, as train.py --cache-normalized writes it."""
    from helico import packed_cache
    out = tmp_path_factory.mktemp("normalized") / "cache"
    packed_cache.build_cache(common.load_data(demo_root), out, int(tiny_ckpt["image_size"]), workers=2,
                            normalized=True, reference=staining.DEFAULT_REFERENCE, device="cpu", progress=False)
    return out


def test_cache_normalized_to_the_checkpoints_stain_is_used_without_normalizing_again(
        normalized_cache, tiny_ckpt, demo_root, monkeypatch):
    import macenko_gpu
    ckpt = {**tiny_ckpt, "stain": fitted_stain(demo_root / staining.DEFAULT_REFERENCE)}
    net, normalizer = model.from_checkpoint(ckpt, "best.pt", None, torch.device("cpu"))
    samples, size = common.load_data(demo_root).labelled[:8], int(ckpt["image_size"])
    png, _ = evaluate.score_samples(net, normalizer, demo_root, samples, size, torch.device("cpu"), batch_size=4,
                                    workers=0)

    def normalized_twice(self, images):
        raise AssertionError("the cache's patches were normalized again")
    monkeypatch.setattr(macenko_gpu.MacenkoNormalizer, "normalize", normalized_twice)
    cached, bad = evaluate.score_samples(net, normalizer, demo_root, samples, size, torch.device("cpu"), batch_size=4,
                                         workers=0, cache=normalized_cache)
    assert bad == [] and np.allclose(cached, png, atol=1e-6)


@pytest.mark.parametrize("stain", ["another reference", "none"])
def test_cache_normalized_to_another_stain_is_refused_in_one_line(stain, normalized_cache, tiny_ckpt, tmp_path,
                                                                  capsys):
    import macenko_gpu
    other = fitted_stain(macenko_gpu.synthetic_ihc_tiles(1, 256, seed=3)[0]) if stain != "none" else None
    torch.save({**tiny_ckpt, "stain": other}, tmp_path / "best.pt")
    meta_before = (normalized_cache / "meta.json").read_text()
    argv = ["--checkpoint", str(tmp_path / "best.pt"), "--cache", str(normalized_cache), *FAST]
    assert evaluate.main(argv) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --cache {normalized_cache}: holds patches Macenko-normalized")
    assert ("another stain reference" if other else "without Macenko") in err[0]
    assert (normalized_cache / "meta.json").read_text() == meta_before  # never rebuilt
    assert not (tmp_path / "eval").exists()


def test_cache_of_another_image_size_is_refused_not_rebuilt(cached_evaluation, tiny_ckpt, tmp_path, capsys):
    torch.save({**tiny_ckpt, "image_size": 2 * int(tiny_ckpt["image_size"])}, tmp_path / "best.pt")
    argv = ["--checkpoint", str(tmp_path / "best.pt"), "--cache", str(cached_evaluation["cache"]), *FAST]
    assert evaluate.main(argv) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds 64px plain patches, but this run needs 128px plain patches" in err[0], err


def test_a_file_as_cache_is_exit_2_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "cache").write_text("not a folder")
    argv = ["--checkpoint", str(tiny_run / "best.pt"), "--out", str(tmp_path / "eval"), "--cache",
            str(tmp_path / "cache"), *FAST]
    assert evaluate.main(argv) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --cache {tmp_path / 'cache'}: not a directory (give a folder for the packed patch cache)"]


def test_the_patient_rule_candidates_do_not_grow_with_the_patch_count():
    # the case to guard: a NEGATIVA patient's scores, drawn from one distribution, in folders of 25 to 2,000 patches
    rng = np.random.default_rng(0)
    by_count = {}
    for n in (25, 100, 500, 2000):
        s = np.sort(rng.beta(1, 30, size=(200, n)), axis=1)
        by_count[n] = (np.mean([analysis.top_share_mean(row) for row in s]), np.mean(s[:, -10:].mean(axis=1)))
    share = [v[0] for v in by_count.values()]
    topk = [v[1] for v in by_count.values()]
    assert topk[-1] > 2 * topk[0]  # topk_mean: 0.06 at 25 patches, 0.19 at 2,000
    assert max(share) - min(share) < 0.15 * np.mean(share)  # top_share_mean: the same statistic at every size
    assert "topk_mean" not in analysis.RULES and set(analysis.RULES) == {"fraction_positive", "top_share_mean"}
