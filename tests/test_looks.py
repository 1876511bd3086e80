"""Every look at test and HoldOut labels counted once (the ledger, runs/holdout_ledger.jsonl), and nothing chosen
there: --compare chooses on validation with each model's own rule; choosing on test is recorded against every model;
the same evaluation again is a repeat; a damaged ledger raises the count, never lowers it or stops a command."""
import errno
import json
import shutil

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
    shutil.copy(runs / "a" / "split.json", runs / "b" / "split.json")
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
    # the same checkpoint, flags and data: the test numbers seen again, a repeat of look 1, not look 2
    assert (second["test"]["look"], second["test"]["repeat_of"]) == (1, 1) and "holdout" not in second
    assert "seen again**: the same checkpoint, flags and data as look 1" in \
        (two_runs / "a" / "eval" / "report.md").read_text()
    entries = ledger.read(where)
    assert [e["parts"] for e in entries] == [["test", "holdout"], ["test"]]
    assert "repeat_of" not in entries[0] and entries[1]["repeat_of"] == {"test": 1}
    other_flags = {"test": "another key: --top-share 0.2, say"}
    assert ledger.looks(entries, [entries[0]["sha256"]], ["test"], other_flags)["test"]["look"] == 2
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


def test_ledger_lines_are_appended_whole_and_a_torn_line_counts_as_a_look_of_unknown_origin(tmp_path, capsys):
    where = tmp_path / ledger.NAME
    ledger.append(where, {"kind": "evaluate", "sha256": "x", "parts": ["test"]})
    with open(where, "a") as f:
        f.write('{"kind": "evalu')  # a line cut by a crash
    ledger.append(where, {"kind": "evaluate", "sha256": "y", "parts": ["holdout"]})
    entries = ledger.read(where)
    assert [e.get("sha256", e["kind"]) for e in entries] == ["x", "unknown", "y"]  # the new line stays whole
    assert f"{where} line 2: damaged" in capsys.readouterr().err
    assert ledger.looks(entries, "x", ["test"])["test"]["look"] == 3  # x's own, and one that may have been x's


def test_a_damaged_ledger_is_named_counted_and_never_stops_an_evaluation(two_runs, tmp_path, capsys, monkeypatch):
    """A damaged middle line and bytes that are not UTF-8: a warning naming each line, each counted as a look of
    unknown origin, exit 0; an evaluation that fails on a full disk before showing a number records nothing."""
    runs = tmp_path / "runs"
    (runs / "c").mkdir(parents=True)
    shutil.copy(two_runs / "a" / "best.pt", runs / "c" / "best.pt")
    c, where = runs / "c" / "best.pt", runs / ledger.NAME
    look = {"kind": "evaluate", "sha256": common.file_sha256(c), "parts": ["test"]}
    where.write_bytes(b"\n".join([json.dumps(look).encode(), b'{"kind": "evaluate", "sha2', json.dumps(look).encode(),
                                   b"\xff\xfe not utf-8"]))
    assert evaluate.main(["--checkpoint", str(c), *FAST]) == 0
    err = capsys.readouterr().err
    assert f"{where} line 2: damaged" in err and f"{where} line 4: damaged" in err
    looks = metrics_of(runs / "c" / "eval")["meta"]["looks"]["test"]
    assert looks["look"] == 5 and looks["unknown_origin"] == [2, 4]  # 2 readable + 2 damaged before this one
    assert "damaged ledger line(s) 2, 4" in (runs / "c" / "eval" / "report.md").read_text()
    lines = where.read_bytes().split(b"\n")
    assert len(ledger.read(where)) == 5 and lines[-1] == b"" and json.loads(lines[-2])["sha256"] == look["sha256"]
    assert evaluate.main(["--checkpoint", str(c), *FAST]) == 0  # the same command again: one look, one repeat
    again = metrics_of(runs / "c" / "eval")["meta"]["looks"]["test"]
    assert (again["look"], again["repeat_of"]) == (5, 5) and ledger.read(where)[-1]["repeat_of"] == {"test": 5}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(runs))
    monkeypatch.setattr(evaluate.figures, "write_figures", full_disk)
    before = where.read_bytes()
    assert evaluate.main(["--checkpoint", str(c), "--top-share", "0.2", *FAST]) == common.EXIT_ENVIRONMENT
    assert where.read_bytes() == before  # no number shown, no look


@pytest.mark.parametrize("flag", ["--cv", "--ensemble"])
def test_runs_that_are_not_folds_are_refused_in_one_line_naming_the_flag_before_any_look(two_runs, capsys, flag):
    where = two_runs / ledger.NAME
    before = where.read_bytes() if where.exists() else b""
    extra = ["--holdout"] if flag == "--ensemble" else []
    assert evaluate.main([flag, str(two_runs / "a"), str(two_runs / "b"), *extra, *FAST]) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag}: not folds of one cross-validation") and "trained without --folds" in err
    assert "\n" not in err and len(err) <= 220 and "None" not in err
    assert (where.read_bytes() if where.exists() else b"") == before  # nothing scored, nothing recorded
