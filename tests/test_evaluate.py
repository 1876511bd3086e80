"""evaluate.py on the tiny trained demo run: every output parses, and every number is recomputed independently
(scikit-learn on predictions.csv / patients.csv, file counts on disk, the checkpoint's own validation metrics)."""
import csv
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

import common
import eval_report
import evaluate
import gradcam
import metrics
import model

FAST = ["--device", "cpu", "--workers", "0", "--bootstrap", "200", "--seed", "0"]
LEVELS = ("patch", "patch_at_0.5", "by_source.annotated", "by_source.supplemental", "patient", "holdout.patient")


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
    assert evaluation["metrics"]["patch"]["n"] == len(patch_rows(evaluation)) > 0
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


def test_report_shows_the_stain_strip_of_validation_positives_and_hard_negatives(evaluation, demo_root):
    with Image.open(evaluation["out"] / "stain_preview.png") as im:
        width, height = im.size  # 3 columns (original | as trained | canonical), 3 + 3 positives, 6 negatives
    rows = patch_rows(evaluation, split="val")
    positives, negatives = sum(r["label"] == "1" for r in rows), sum(r["label"] == "0" for r in rows)
    shown = min(positives, 6) + min(negatives, 6)
    assert width == 4 + 3 * (160 + 4) and height == 14 + shown * (160 + 14 + 4) + 4
    assert "](stain_preview.png)" in (evaluation["out"] / "report.md").read_text()


def test_predictions_cover_the_validation_and_holdout_patches_once(evaluation, demo_root):
    data = common.load_data(demo_root)
    val = evaluation["metrics"]["meta"]["val_patients"]
    rows = evaluation["predictions"]
    assert len({r["path"] for r in rows}) == len(rows)
    assert {r["path"] for r in patch_rows(evaluation)} == {s.path for s in common.select(data.labelled, val)}
    aggregated = {r["path"] for r in rows if r["patient_eval"] == "1"}
    assert aggregated == {s.path for s in common.select(data.cropped, val) + data.holdout}
    assert all(r["prediction"] == str(int(float(r["score"]) >= evaluation["metrics"]["patch"]["threshold"]))
               for r in rows)


# ----------------------------------------------------------------------------------------------- patch metrics
@pytest.mark.parametrize("name, source", [("patch", None), ("patch_at_0.5", None),
                                          ("by_source.annotated", "annotated")])
def test_patch_metrics_equal_sklearn_recomputed_from_predictions_csv(evaluation, name, source):
    m = level(evaluation["metrics"], name)
    rows = patch_rows(evaluation, **({"source": source} if source else {}))
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
    m = evaluation["metrics"]["patch"]
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
    for row in evaluation["patients"]:
        tree = "CrossValidation/Cropped" if row["split"] == "val" else "HoldOut"
        on_disk = len(list((demo_root / tree).glob(f"{row['patient']}_*/*.png")))
        s = np.sort(scores[row["patient"]])
        assert int(row["n_patches"]) == len(s) == on_disk
        assert float(row["fraction_positive"]) == pytest.approx(np.mean(s >= threshold))
        assert float(row["topk_mean"]) == pytest.approx(s[-k:].mean())
        assert float(row["score"]) == float(row[m["patient"]["rule"]])


@pytest.mark.parametrize("split, name", [("val", "patient"), ("holdout", "holdout.patient")])
def test_patient_metrics_equal_sklearn_recomputed_from_patients_csv(evaluation, split, name):
    m = level(evaluation["metrics"], name)
    rows = [r for r in evaluation["patients"] if r["split"] == split]
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
    p = evaluation["metrics"]["patient"]
    rows = [r for r in evaluation["patients"] if r["split"] == "val"]
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
    holdout = m["holdout"]["patient"]
    assert (holdout["rule"], holdout["threshold"]) == (m["patient"]["rule"], m["patient"]["threshold"])
    assert holdout["candidates"] == m["patient"]["candidates"]  # chosen on validation, not re-chosen


# ----------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_cis_contain_the_point_estimates(evaluation):
    checked = 0
    for name in LEVELS:
        m = level(evaluation["metrics"], name)
        for k, (lo, hi) in m["ci95"].items():
            if not math.isnan(m[k]):
                assert lo - 1e-12 <= m[k] <= hi + 1e-12, (name, k, m[k], lo, hi)
                checked += 1
    assert checked >= 20


def predictions_from_csv(rows) -> evaluate.Predictions:
    samples = [common.Sample(r["path"], r["patient"], r["source"], int(r["label"]), 0) for r in rows]
    flag = lambda k: np.array([r[k] == "1" for r in rows])
    return evaluate.Predictions(samples, np.array([r["split"] for r in rows]), flag("patch_eval"),
                                flag("patient_eval"), np.array([float(r["score"]) for r in rows]))


def test_bootstrap_cis_are_reproducible_with_the_seed(evaluation, demo_root):
    m = evaluation["metrics"]
    val = m["meta"]["val_patients"]
    pred = predictions_from_csv([r for r in evaluation["predictions"] if r["split"] == "val"])
    analyse = lambda seed: evaluate.analyse(pred, val, common.read_diagnosis(demo_root), m["patch"]["threshold"],
                                            m["patient"]["top_k"], metrics.patient_draws(len(val), 200, seed))[0]
    again = analyse(0)
    for name in ("patch", "patch_at_0.5", "by_source.annotated", "patient"):
        np.testing.assert_equal(level(again, name)["ci95"], level(m, name)["ci95"])
    assert level(analyse(1), "patch")["ci95"] != m["patch"]["ci95"]


def test_compare_of_a_run_with_itself_gives_zero_deltas_within_noise(tiny_run, tmp_path):
    ckpt = str(tiny_run / "best.pt")
    out = tmp_path / "compare"
    assert evaluate.main(["--compare", ckpt, ckpt, "--out", str(out), "--gradcam", "0", *FAST]) == 0
    table = json.loads((out / "compare.json").read_text())
    assert len(table["deltas"]) == len(evaluate.HEADLINE)
    for d in table["deltas"]:
        if math.isnan(d["value"]):
            continue
        assert d["delta"] == 0 and d["ci95"] == [0, 0] and d["within_noise"] is True, d
    assert "within noise" in (out / "compare.md").read_text()


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
    net = model.build_model("mobilenet_v3_small").eval()
    x = torch.randn(2, 3, 64, 64)
    layer = gradcam.gradcam_layer(net, x[:1])
    assert layer in (net.features, net.features[-1])  # the same (576, 2, 2) output: the last spatial one
    maps, signed = gradcam.gradcam(net, layer, x)
    assert maps.shape == (2, 64, 64) and signed.shape == (2, 2, 2)
    assert all(float(m.max() - m.min()) > 0 for m in maps)
    assert all(p.grad is None for p in net.parameters())  # no gradient left behind


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
    import patch_cache
    out = tmp_path_factory.mktemp("normalized") / "cache"
    patch_cache.build_cache(common.load_data(demo_root), out, int(tiny_ckpt["image_size"]), workers=2,
                            normalized=True, reference=common.DEFAULT_REFERENCE, device="cpu", progress=False)
    return out


def test_cache_normalized_to_the_checkpoints_stain_is_used_without_normalizing_again(
        normalized_cache, tiny_ckpt, demo_root, monkeypatch):
    import macenko_gpu
    ckpt = {**tiny_ckpt, "stain": fitted_stain(demo_root / common.DEFAULT_REFERENCE)}
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
