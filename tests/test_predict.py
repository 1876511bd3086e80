"""predict.py and the decision stored with the model (decision.py): new patients get the call evaluate.py gives."""
import base64
import io
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

import common
import evaluate
import predict
import train
import train_patient
from helico import decision, metrics
from helico.crossval import read_csv  # the one reader of the project's CSVs

# 32 px with Macenko (the stain check needs a reference), one epoch: a patch run and its patient model in seconds.
PATCH_FLAGS = ["--device", "cpu", "--image-size", "32", "--batch-size", "16", "--weights", "none", "--workers", "0",
               "--seed", "0", "--limit-samples", "48", "--epochs", "1"]
RUN = ["--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def run(small_demo_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("predict-runs")
    assert train.main(["--data-root", str(small_demo_root), "--runs-dir", str(runs), "--run-id", "p",
                       *PATCH_FLAGS]) == 0
    assert train_patient.main(["--checkpoint", str(runs / "p" / "best.pt"), *RUN, "--epochs", "3"]) == 0
    return runs / "p"


@pytest.fixture(scope="module")
def new_slides(small_demo_root, tmp_path_factory):
    """The HoldOut's patient folders copied elsewhere, without any CSV or workbook: unlabelled new slides."""
    where = tmp_path_factory.mktemp("new") / "slides"
    shutil.copytree(small_demo_root / common.TREES["holdout"], where)
    return where


@pytest.fixture(scope="module")
def predicted(run, new_slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("predicted") / "out"
    assert predict.main(["--checkpoint", str(run / "best.pt"), "--input", str(new_slides), "--out", str(out),
                         "--evidence", "2", *RUN]) == 0
    return out


def test_best_pt_is_slim_and_stores_the_rule_the_model_threshold_and_who_calls(run):
    best, last = (torch.load(run / n, weights_only=True) for n in ("best.pt", "last.pt"))
    assert (run / "best.pt").stat().st_size < (run / "last.pt").stat().st_size / 2
    assert "optimizer" not in best and "optimizer" in last
    assert best["decision"]["patient_rule"]["rule"] in ("fraction_positive", "top_share_mean")
    assert set(best["decision"]["validation"]) <= set(best["split"]["val"])  # chosen on validation only
    mil_decision = torch.load(run / "patient" / "best.pt", weights_only=True)["decision"]
    assert mil_decision["call_by"] in ("rule", "patient_model") and "Youden" in mil_decision["reason"]


def test_new_patients_get_the_scores_and_calls_evaluate_holdout_gives(run, predicted, tmp_path):
    assert evaluate.main(["--checkpoint", str(run / "best.pt"), "--holdout", "--out", str(tmp_path / "ev"),
                          "--bootstrap", "0", "--gradcam", "0", *RUN]) == 0
    ev = {r["patient"]: r for r in read_csv(tmp_path / "ev" / "patients.csv") if r["split"] == "holdout"}
    new = {r["patient"]: r for r in read_csv(predicted / "patients.csv")}
    assert set(new) == set(ev) and ev
    for p, r in new.items():
        assert abs(float(r["rule_score"]) - float(ev[p]["score"])) <= 1e-6
        assert abs(float(r["mil_probability"]) - float(ev[p]["mil_probability"])) <= 1e-6
        assert r["call"] == ev[p]["call"] and int(r["n_patches"]) == int(ev[p]["n_patches"])
    assert (tmp_path / "ev" / "report.html").is_file()  # evaluate.py writes the same page beside report.md


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_html_holds_every_patient_and_each_embedded_image_decodes(predicted):
    page = Images()
    page.feed((predicted / "report.html").read_text())
    patients = [r["patient"] for r in read_csv(predicted / "patients.csv")]
    text = " ".join(page.text)
    assert all(p in text for p in patients) and "not a diagnostic device" in text
    assert len(page.sources) == len(patients) == len(list((predicted / "evidence").glob("*.png")))
    for src in page.sources:  # self-contained: every image inline, none a path
        head, data = src.split(",", 1)
        assert head == "data:image/png;base64"
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    rows = read_csv(predicted / "patches.csv")
    assert rows and all(0 <= float(r["score"]) <= 1 for r in rows)


def test_a_corrupt_png_a_jpg_and_an_empty_patient_folder_are_named_and_the_run_goes_on(run, new_slides, tmp_path,
                                                                                      capsys):
    slides = tmp_path / "slides"
    first = sorted(new_slides.iterdir())[0]
    shutil.copytree(first, slides / first.name)
    (slides / first.name / "99999.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (32, 32)).save(slides / first.name / "scan.jpg")
    (slides / "B99-1_0").mkdir()
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(run / "best.pt"), "--input", str(slides), "--out",
                         str(tmp_path / "out"), "--evidence", "0", *RUN]) == 0
    err = capsys.readouterr().err
    assert "99999.png" in err and "scan.jpg" in err and "B99-1" in err
    rows = {r["patient"]: r for r in read_csv(tmp_path / "out" / "patients.csv")}
    assert rows["B99-1"]["call"].startswith("no call") and rows["B99-1"]["n_patches"] == "0"
    assert rows[common.patient_id(first.name)]["n_skipped"] == "2"


@pytest.mark.parametrize("case", ["missing checkpoint", "no png"])
def test_a_missing_checkpoint_or_an_input_without_png_is_one_line_exit_2(run, case, tmp_path, capsys):
    (tmp_path / "in" / "B1-1_0").mkdir(parents=True)
    (tmp_path / "in" / "B1-1_0" / "notes.txt").write_text("x")
    ckpt = tmp_path / "none.pt" if case == "missing checkpoint" else run / "best.pt"
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(tmp_path / "in"), *RUN]) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("none.pt" in err if case == "missing checkpoint" else "no PNG" in err)


# ----------------------------------------------------------------------------------------------- the decision alone
def test_too_few_readable_patches_is_no_call_never_a_guess():
    d = decision.Decision(0.5, {"rule": "top_share_mean", "threshold": 0.4}, 0.1)
    assert decision.call(d, 3, 0.99).call.startswith("no call: 3 readable patches")
    assert decision.call(d, 50, 0.41).call == "positive" and decision.call(d, 50, 0.39).call == "negative"


def test_the_patient_model_calls_only_when_stored_so():
    d = decision.Decision(0.5, {"rule": "top_share_mean", "threshold": 0.4}, 0.1,
                          model={"rule": "gated_attention_mil", "threshold": 0.7}, call_by="patient_model")
    c = decision.call(d, 50, 0.9, 0.2)
    assert (c.rule_call, c.mil_call, c.call, c.agree) == ("positive", "negative", "negative", False)


def test_a_split_vote_is_no_call():
    assert decision.vote(["positive", "negative"]).startswith("no call")
    assert decision.vote(["positive", "positive", "negative"]) == "positive"
    assert decision.vote(["negative", "no call: 2 readable patches", "no call: x"]) == "negative"


def test_the_votes_operating_point_holds_where_the_means_moves_under_planted_fold_offsets():
    """Five fold models that agree but for one whose scores run 3 units high: each at its own validation threshold,
    their vote keeps one model's sensitivity and specificity; the mean of their scores at the pooled out-of-fold
    threshold (the scale mix crossval refuses for ROC-AUC) trades specificity for sensitivity."""
    rng = np.random.default_rng(0)
    offsets = [0.0, 0.0, 0.0, 0.0, 3.0]

    def patients(n):
        y = rng.integers(0, 2, n)
        return y, rng.normal(1.5 * y, 1.0)
    scored = lambda z, k: z + offsets[k] + rng.normal(0, 0.3, z.size)
    val = [patients(100) for _ in offsets]
    val_scores = [scored(z, k) for k, (_, z) in enumerate(val)]
    own = [metrics.youden_threshold(y, s)[0] for (y, _), s in zip(val, val_scores)]
    pooled = metrics.youden_threshold(np.concatenate([y for y, _ in val]), np.concatenate(val_scores))[0]
    y, z = patients(2000)
    s = np.stack([scored(z, k) for k in range(len(offsets))])
    point = lambda pred: np.array([pred[y == 1].mean(), (~pred[y == 0]).mean()])  # sensitivity, specificity
    single = np.mean([point(s[k] >= own[k]) for k in range(len(offsets))], axis=0)
    votes = [decision.vote(["positive" if s[k, i] >= own[k] else "negative" for k in range(len(offsets))])
             for i in range(y.size)]
    vote = point(np.array([v == "positive" for v in votes]))
    mean = point(s.mean(0) >= pooled)
    assert np.abs(vote - single).max() < 0.06
    assert single[1] - mean[1] > 0.1 and mean[0] - single[0] > 0.1


def test_ctrl_c_while_writing_keeps_the_earlier_output_whole(run, new_slides, predicted, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(predicted, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(*args, **kwargs):  # the signal lands after the CSVs and evidence are in the temp folder
        raise KeyboardInterrupt("SIGINT")
    monkeypatch.setattr(predict.html_report, "page", interrupted)
    assert predict.main(["--checkpoint", str(run / "best.pt"), "--input", str(new_slides), "--out", str(out),
                         "--evidence", "0", *RUN]) == 130
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left beside it


def test_platt_calibration_agrees_with_scikit_learns_logistic_regression_on_the_logit():
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, 2000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
    s = 1 / (1 + np.exp(-(z / 2 + 0.3)))  # a fold model whose scores are squeezed and shifted
    a, b = decision.platt(s, y)
    ref = LogisticRegression(C=1e6).fit(np.log(s / (1 - s))[:, None], y)
    assert a == pytest.approx(ref.coef_[0, 0], abs=0.02) and b == pytest.approx(ref.intercept_[0], abs=0.02)
    assert decision.calibrated(0.5, (a, b)) == pytest.approx(1 / (1 + np.exp(-b)))


def test_the_patient_model_gets_the_call_only_when_strictly_better_on_validation():
    labels = {"a": 1, "b": 1, "c": 0, "d": 0}
    rule = {"rule": "top_share_mean", "threshold": 0.5, "candidates": {}, "reason": ""}
    stored = {"patient_rule": rule, "validation": {"a": {"score": 0.9}, "b": {"score": 0.4}, "c": {"score": 0.1},
                                                   "d": {"score": 0.2}}}  # the rule misses b: J 0.5
    better = decision.choose_model(stored, {"a": 0.8, "b": 0.7, "c": 0.3, "d": 0.2}, labels)  # J 1.0
    assert better["call_by"] == "patient_model" and better["youden_j"]["rule"] == pytest.approx(0.5)
    tied = decision.choose_model(stored, {"a": 0.8, "b": 0.3, "c": 0.4, "d": 0.2}, labels)  # J 0.5 at best
    assert tied["call_by"] == "rule" and tied["youden_j"]["patient_model"] == pytest.approx(0.5)


def test_one_folder_of_pngs_is_one_patient_scored_as_in_the_folder_of_folders(run, new_slides, predicted, tmp_path):
    folder = sorted(new_slides.iterdir())[0]
    assert predict.main(["--checkpoint", str(run / "best.pt"), "--input", str(folder), "--out", str(tmp_path / "one"),
                         "--evidence", "0", *RUN]) == 0
    [row] = read_csv(tmp_path / "one" / "patients.csv")
    whole = {r["patient"]: r for r in read_csv(predicted / "patients.csv")}[common.patient_id(folder.name)]
    assert row["patient"] == whole["patient"] and row["call"] == whole["call"]
    assert abs(float(row["rule_score"]) - float(whole["rule_score"])) <= 1e-6
