"""Every look at test and HoldOut labels counted (the ledger, runs/holdout_ledger.jsonl), and nothing chosen there:
--compare chooses on validation with each model's own rule; choosing on test is recorded against every model."""
import json

import pytest
import torch

import common
import evaluate
import train
from helico import ledger

FLAGS = ["--device", "cpu", "--image-size", "32", "--batch-size", "16", "--weights", "none", "--workers", "0",
         "--seed", "0", "--limit-samples", "48", "--no-macenko", "--epochs", "1"]
FAST = ["--device", "cpu", "--workers", "0", "--bootstrap", "0", "--gradcam", "0"]


@pytest.fixture(scope="module")
def two_runs(demo_root, tmp_path_factory):
    """runs/a (trained) and runs/b (the same weights, one bias moved: another model) in one runs folder."""
    runs = tmp_path_factory.mktemp("looks") / "runs"
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(runs), "--run-id", "a", *FLAGS]) == 0
    (runs / "b").mkdir()
    ckpt = torch.load(runs / "a" / "best.pt", weights_only=True)
    ckpt["model"]["fc.bias"] -= 0.5
    torch.save(ckpt, runs / "b" / "best.pt")
    return runs


def metrics_of(folder):
    return json.loads((folder / "metrics.json").read_text(), parse_constant=float)


def test_each_look_is_counted_and_choosing_on_test_follows_every_compared_model(two_runs, tmp_path):
    a, b = two_runs / "a" / "best.pt", two_runs / "b" / "best.pt"
    where = two_runs / ledger.NAME
    assert evaluate.main(["--checkpoint", str(a), "--holdout", *FAST]) == 0
    first = metrics_of(two_runs / "a" / "eval-holdout")["meta"]["looks"]
    assert (first["test"]["look"], first["holdout"]["look"]) == (1, 1) and first["chosen_among"] == []
    holdout_report = (two_runs / "a" / "eval-holdout" / "metrics.json").read_text()
    assert evaluate.main(["--checkpoint", str(a), *FAST]) == 0  # the test part again, not the HoldOut
    assert (two_runs / "a" / "eval-holdout" / "metrics.json").read_text() == holdout_report  # eval/ beside it
    second = metrics_of(two_runs / "a" / "eval")["meta"]["looks"]
    assert second["test"]["look"] == 2 and "holdout" not in second
    entries = ledger.read(where)
    assert [e["parts"] for e in entries] == [["test", "holdout"], ["test"]]
    assert entries[0]["sha256"] == common.file_sha256(a) and "patient.accuracy" in entries[0]["headline"]["holdout"]
    # comparing on validation (the default) reads no test label: not in the ledger
    own = metrics_of(two_runs / "a" / "eval-holdout")["selection"]["patient"]  # a's rule, chosen on validation
    n = len(ledger.read(where))
    for part in ("val", "test"):
        out = tmp_path / f"cmp-{part}"
        assert evaluate.main(["--compare", str(a), str(b), "--compare-on", part, "--out", str(out), *FAST]) == 0
        table = json.loads((out / "compare.json").read_text(), parse_constant=float)
        assert table["part"] == part and table["rule_chosen_on"] == "each model's own validation part"
        assert (table["models"][0]["patient.rule"], table["models"][0]["patient.threshold"]) == \
            (own["rule"], own["threshold"])  # never re-chosen on the compared patients
        assert [d["role"] for d in table["deltas"]].count("primary") == 1
        assert all(d["verdict"] is None for d in table["deltas"] if d["role"] == "descriptive")
        assert "One verdict, on the primary metric declared before looking: `patch.pr_auc`" in \
            (out / "compare.md").read_text()
    # choosing between a and b on the test part: recorded once, against both
    assert len(ledger.read(where)) == n + 1 and ledger.read(where)[-1]["kind"] == "compare-test"
    assert "used to choose among 2 models" in (tmp_path / "cmp-test" / "compare.md").read_text()
    assert evaluate.main(["--checkpoint", str(b), "--holdout", *FAST]) == 0
    looks = metrics_of(two_runs / "b" / "eval-holdout")["meta"]["looks"]
    assert looks["test"]["look"] == 2  # the comparison was its first look at the test part
    assert {e["checkpoint"] for e in looks["test"]["other_models"]} == {str(a)} and \
        len(looks["test"]["other_models"]) == 2
    assert looks["holdout"]["look"] == 1 and len(looks["holdout"]["other_models"]) == 1
    assert len(looks["chosen_among"]) == 1 and looks["chosen_among"][0]["models"] == 2
    report = (two_runs / "b" / "eval-holdout" / "report.md").read_text()
    assert "**Look 2 at the test part's labels by this checkpoint**" in report
    assert "**The test part was used to choose among 2 models**" in report


def test_holdout_with_compare_advises_choosing_on_validation(two_runs, capsys):
    a = str(two_runs / "a" / "best.pt")
    assert evaluate.main(["--compare", a, a, "--holdout", *FAST]) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "choose on the validation part, then evaluate the chosen checkpoint once" in err


def test_ledger_lines_are_appended_whole_and_a_torn_line_is_skipped(tmp_path):
    where = tmp_path / ledger.NAME
    ledger.append(where, {"kind": "evaluate", "sha256": "x", "parts": ["test"]})
    with open(where, "a") as f:
        f.write('{"kind": "evalu')  # a line cut by a crash
    ledger.append(where, {"kind": "evaluate", "sha256": "y", "parts": ["holdout"]})
    assert [e["sha256"] for e in ledger.read(where)] == ["x", "y"]  # the torn line alone is skipped
    assert ledger.looks(ledger.read(where), "x", ["test"])["test"]["look"] == 2
