"""splits.py: deterministic stratified patient-level splits (duplicate-patient groups kept together) and their checks."""
import argparse
import json
import shutil

import pytest

import common
from helico import identity, splits, staining
from test_common import make_root

DX = {**{f"B22-{n}": "NEGATIVA" for n in range(1, 13)}, **{f"B22-{n}": "BAIXA" for n in range(13, 22)},
      **{f"B22-{n}": "ALTA" for n in range(22, 31)}, "B22-47": "ALTA", "B22-200": "NEGATIVA", "B22-201": "NEGATIVA",
      "B22-202": "BAIXA", "B22-203": "BAIXA"}


@pytest.fixture
def root(tmp_path):
    cropped = [f"{p}_0/{k}.png" for p in DX for k in (1, 2)]
    annotated = ["B22-47_0/01653.png"]
    r = make_root(tmp_path, [("B22-47", 0, 1653, -1)], annotated, cropped, DX)
    for src, dst in (("B22-200_0", "B22-201_0"), ("B22-202_0", "B22-203_0")):  # byte-identical patient folders
        shutil.rmtree(r / "CrossValidation/Cropped" / dst)
        shutil.copytree(r / "CrossValidation/Cropped" / src, r / "CrossValidation/Cropped" / dst)
    return r


@pytest.fixture
def data(root):
    return common.load_data(root)


@pytest.fixture
def groups(data, tmp_path):
    return identity.duplicate_groups(identity.shared_content(data, cache=tmp_path / "h.json", progress=False))


def test_duplicate_content_patients_are_grouped(groups):
    assert groups == [["B22-200", "B22-201"], ["B22-202", "B22-203"]]


def part_of(split: dict, patient: str) -> str:
    return next(part for part in splits.SPLIT_PARTS if patient in split[part])


def test_split_is_deterministic_for_a_seed(data, groups):
    a, b = (splits.make_split(data, seed=3, groups=groups) for _ in range(2))
    assert a == b
    assert splits.make_split(data, seed=4, groups=groups)["test"] != a["test"]


def test_split_has_three_parts_stratified_by_diagnosis(data, groups):
    s = splits.make_split(data, seed=0, groups=groups)
    assert s["untouched_test"] is True and splits.has_untouched_test(s)
    units = [p for p in DX if p not in ("B22-201", "B22-203")]  # a duplicate pair is one unit
    for part in ("val", "test"):
        for dx in ("NEGATIVA", "BAIXA", "ALTA"):
            n = sum(DX[p] == dx for p in units)
            assert sum(DX[p] == dx for p in s[part] if p in units) == round(0.2 * n)
    every = s["train"] + s["val"] + s["test"]
    assert sorted(every) == sorted(data.cv_patients) and len(set(every)) == len(every)


@pytest.mark.parametrize("seed", range(12))
def test_three_part_split_never_shares_a_patient_or_duplicate_group_across_parts(data, groups, seed):
    s = splits.make_split(data, seed=seed, keep_in_train=["B22-47"], groups=groups)
    every = s["train"] + s["val"] + s["test"]
    assert len(every) == len(set(every)) == len(data.cv_patients)
    for g in groups:
        assert len({part_of(s, p) for p in g}) == 1
    assert "B22-47" in s["train"]
    assert splits.split_problems(s, data, groups, reference=staining.DEFAULT_REFERENCE) == []


@pytest.mark.parametrize("seed", range(4))
def test_k_fold_test_parts_partition_the_patients_and_val_comes_from_the_other_folds(data, groups, seed):
    made = [splits.make_split(data, seed=seed, folds=5, fold=i, keep_in_train=["B22-47"], groups=groups)
            for i in range(5)]
    tests = [p for s in made for p in s["test"]]
    assert len(tests) == len(set(tests)) == len(data.cv_patients) - 1  # everyone tested once, but B22-47
    assert max(len(s["test"]) for s in made) - min(len(s["test"]) for s in made) <= 2
    for s in made:
        assert not set(s["val"]) & set(s["test"]) and s["val"] and "B22-47" in s["train"]
        for g in groups:
            assert len({part_of(s, p) for p in g}) == 1
        assert splits.split_problems(s, data, groups, reference=staining.DEFAULT_REFERENCE) == []


def test_fold_problems_catch_overlapping_or_missing_test_parts(data, groups):
    made = [splits.make_split(data, folds=3, fold=i, keep_in_train=["B22-47"], groups=groups) for i in range(3)]
    assert splits.fold_problems(made, data.cv_patients) == []
    moved = [dict(made[0], test=made[0]["test"] + made[1]["test"][:1]), made[1], made[2]]
    assert any("in the test parts of folds 0 and 1" in p for p in splits.fold_problems(moved, data.cv_patients))
    gone = made[1]["test"][0]
    missing = [made[0], dict(made[1], test=made[1]["test"][1:], train=made[1]["train"] + [gone]), made[2]]
    assert any("in no fold's test part: " + gone in p for p in splits.fold_problems(missing, data.cv_patients))
    assert any("not the folds 0..K-1" in p for p in splits.fold_problems(made[:2], data.cv_patients))


def test_two_part_split_is_flagged_as_having_no_untouched_set(data, groups):
    s = splits.make_split(data, test_frac=0, groups=groups)
    assert s["test"] == [] and s["untouched_test"] is False and not splits.has_untouched_test(s)
    folds = [splits.make_split(data, folds=4, fold=i, test_frac=0, groups=groups) for i in range(4)]
    vals = [p for f in folds for p in f["val"]]  # the fold is val: the old two-part k-fold
    assert sorted(vals) == sorted(data.cv_patients) and all(f["test"] == [] for f in folds)


@pytest.mark.parametrize("kwargs,message", [({"folds": 5, "fold": 5}, "--folds 5 --fold 5"),
                                            ({"folds": 1, "fold": 0}, "--folds 1"),
                                            ({"fold": 3}, "--fold 3: give the number of folds too"),
                                            ({"val_frac": 1.5}, "--val-frac 1.5"),
                                            ({"val_frac": 0.5, "test_frac": 0.5}, "--test-frac 0.5"),
                                            ({"folds": 5, "fold": 1, "test_frac": 0.3}, "--test-frac 0.3 with --folds")])
def test_bad_split_flags_are_clear_errors(data, kwargs, message):
    with pytest.raises(common.DataError, match=message):
        splits.make_split(data, **kwargs)


def test_split_problems_catch_leaks_and_unknown_patients(data, groups):
    bad = {"train": ["B22-1", "B22-200", "B22-111_0"], "val": ["B22-1", "B22-201", "B22-47", "B22-999"]}
    text = "\n".join(splits.split_problems(bad, data, groups, reference=staining.DEFAULT_REFERENCE))
    assert "patient B22-1 is in both train and val" in text
    assert "folder name 'B22-111_0'" in text
    assert "lacks patient(s) of the split: B22-111, B22-999" in text
    assert "byte-identical images are split across ['train', 'val']: B22-200, B22-201" in text
    assert "stain reference patient B22-47 is in val" in text
    several = [staining.DEFAULT_REFERENCE, "CrossValidation/Cropped/B22-201_0"]  # a file and a folder
    text = "\n".join(splits.split_problems(bad, data, groups, reference=several))
    assert "stain reference patient B22-47 is in val" in text and "stain reference patient B22-201 is in val" in text
    made = splits.make_split(data, keep_in_train=staining.reference_patients(several), groups=groups)
    assert {"B22-47", "B22-201"} <= set(made["train"])


@pytest.mark.parametrize("content,message", [(None, "file not found"), ("{", "not valid JSON"),
                                             ('{"train": []}', "expected an object with .train., .val. .and .test.. lists"),
                                             ('{"train": [], "val": ["B22-1"]}', "empty 'train' or 'val'"),
                                             ('{"train": ["a"], "val": ["b"], "test": "c"}', "expected an object")])
def test_load_split_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "split.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(common.DataError, match=f"--split {path}: {message}"):
        splits.load_split(path)


def test_resolve_split_makes_or_reloads_the_same_split(data, root, tmp_path):
    parser = argparse.ArgumentParser(parents=[splits.split_args_parser()])
    args = parser.parse_args(["--data-root", str(root), "--hash-cache", str(tmp_path / "h.json")])
    made, groups, shared = splits.resolve_split(data, **splits.split_options(args), progress=False)
    (tmp_path / "split.json").write_text(json.dumps(made))
    args = parser.parse_args(["--data-root", str(root), "--split", str(tmp_path / "split.json"),
                              "--hash-cache", str(tmp_path / "h.json")])
    loaded, groups2, shared2 = splits.resolve_split(data, **splits.split_options(args), progress=False)
    assert loaded == made and groups2 == groups and shared2 == shared and "B22-47" in made["train"]


def test_a_version_1_split_file_loads_as_two_parts_without_an_untouched_set(tmp_path):
    (tmp_path / "split.json").write_text(json.dumps({"train": ["B22-1"], "val": ["B22-2"], "version": 1}))
    s = splits.load_split(tmp_path / "split.json")
    assert s["test"] == [] and not splits.has_untouched_test(s)
