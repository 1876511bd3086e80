"""audit_leakage.py as a specification: each check fires on data made to have its problem, stays quiet on the
clean demo, and every bad input is a one-line error with exit code 2.

Broken datasets are hard-linked copies of the session's demo (fast, no image bytes copied): never write into
an existing file of a copy, unlink it first (replace_file), or the shared demo changes under other tests."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import openpyxl
import pytest
from PIL import Image

import audit_leakage
import common
from helico import identity, splits, staining
from conftest import META

CROPPED, ANNOTATED, HOLDOUT = (Path(common.TREES[t]) for t in ("cropped", "annotated", "holdout"))
WORKBOOK = "HP_WSI-CoordAllAnnotatedPatches.xlsx"


# ----------------------------------------------------------------------------------------------- helpers
def copy_demo(demo_root, tmp_path) -> Path:
    dst = tmp_path / "HelicoDataSet"
    try:
        shutil.copytree(demo_root, dst, copy_function=os.link)
    except OSError:  # another file system: real copies
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(demo_root, dst)
    return dst


def replace_file(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)  # break the hard link before writing
    path.write_bytes(data)


def run_audit(root, tmp_path, *flags):
    """(exit code, JSON report or None) of one audit run."""
    out = tmp_path / "audit.json"
    out.unlink(missing_ok=True)
    rc = audit_leakage.main(["--data-root", str(root), "--no-progress", "--json", str(out), *map(str, flags)])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def finding(report, check):
    hits = [f for f in report["findings"] if f["check"] == check]
    assert len(hits) <= 1, "one finding per check"
    return hits[0] if hits else None


def leak_checks(report):
    return {f["check"] for f in report["findings"] if f["kind"] == "leak"}


def write_split(path: Path, **parts) -> Path:
    path.write_text(json.dumps({k: list(v) for k, v in parts.items()}))
    return path


@pytest.fixture(scope="module")
def demo_audit(demo_root, tmp_path_factory):
    """The default audit of the untouched demo, run once for every test that only reads it."""
    return run_audit(demo_root, tmp_path_factory.mktemp("audit"))


@pytest.fixture(scope="module")
def demo_data(demo_root):
    return common.load_data(demo_root)


def default_split(data):
    return splits.make_split(data, keep_in_train=["B22-47"],
                             groups=identity.duplicate_groups(identity.shared_content(data, progress=False)))


# ----------------------------------------------------------------------------------------------- clean demo
def test_default_demo_split_has_no_leak_and_exits_0(demo_audit):
    rc, report = demo_audit
    assert rc == common.EXIT_OK
    assert report["ok"] is True and leak_checks(report) == set()


def test_byte_identical_patients_are_reported_but_kept_together_by_default(demo_audit):
    rc, report = demo_audit
    group = finding(report, "duplicate_content_groups")
    assert group["kind"] == "warning" and {"B22-200", "B22-201"} <= set(group["patients"])
    split = report["split"]["patients"]
    assert len({part for part, ps in split.items() if {"B22-200", "B22-201"} & set(ps)}) == 1


def test_default_split_keeps_the_stain_reference_patient_in_train(demo_audit):
    assert "B22-47" in demo_audit[1]["split"]["patients"]["train"]


@pytest.mark.parametrize("check, patient", [
    ("multi_section_patients", "B22-111"), ("label_conflicts", "B22-03"), ("presence_zero_rows", "B22-11"),
    ("rows_without_files", "B22-100"), ("files_without_rows", "B22-11"), ("off_size_images", "B22-100")])
def test_demo_traps_are_warnings_naming_the_patient(demo_audit, check, patient):
    f = finding(demo_audit[1], check)
    assert f is not None and f["kind"] == "warning" and patient in f["patients"]


def test_stray_thumbs_db_files_are_listed(demo_audit):
    files = finding(demo_audit[1], "stray_entries")["files"]
    assert "CrossValidation/Cropped/Thumbs.db" in files and "CrossValidation/Cropped/B22-10_1/Thumbs.db" in files


def test_off_size_image_reports_its_size_and_file(demo_audit):
    f = finding(demo_audit[1], "off_size_images")
    assert "206x256" in f["detail"] and f["files"] == ["CrossValidation/Annotated/B22-100_0/02045.png"]


def test_clean_demo_has_no_control_mention_or_missing_reference(demo_audit):
    report = demo_audit[1]
    assert finding(report, "control_or_external_mentions") is None
    assert finding(report, "reference_patch_missing") is None
    assert finding(report, "holdout_in_crossvalidation") is None


def test_json_report_has_the_documented_structure(demo_audit):
    report = demo_audit[1]
    assert set(report) >= {"ok", "findings", "composition", "split"}
    for f in report["findings"]:
        assert f["kind"] in ("leak", "warning") and isinstance(f["check"], str) and f["check"]
        assert isinstance(f["patients"], list) and isinstance(f["detail"], str) and f["detail"]
    assert set(report["composition"]) == {"train", "val", "test", "holdout"}
    assert set(report["composition"]["val"]) >= {"patients", "diagnosis", "positives", "aug_copies", "hard_negatives",
                                                "easy_negatives", "presence0_excluded", "dummy_accuracy"}
    assert set(report["split"]["patients"]) == {"train", "val", "test"}


def test_json_is_written_atomically_without_leftovers(demo_root, tmp_path):
    run_audit(demo_root, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["audit.json"]


def test_composition_matches_an_independent_count(demo_audit, demo_data):
    comp, parts = demo_audit[1]["composition"], demo_audit[1]["split"]["patients"]
    for part in ("train", "val"):
        once = common.select(demo_data.labelled, parts[part])            # each window once
        with_aug = common.select(demo_data.labelled, parts[part], include_aug=True)
        c = comp[part]
        assert c["patients"] == len(parts[part]) == sum(c["diagnosis"].values())
        assert c["positives"] == sum(s.label == 1 for s in once)
        assert c["aug_copies"] == sum(s.label == 1 for s in with_aug) - c["positives"]
        assert c["hard_negatives"] + c["easy_negatives"] == sum(s.label == 0 for s in once)
        assert c["easy_negatives"] == sum(s.source == "supplemental" for s in once)
        assert c["dummy_accuracy"] == pytest.approx(1 - c["positives"] / len(once))


def test_accuracy_trap_is_printed_with_the_validation_dummy_accuracy(demo_root, tmp_path, capsys):
    rc, report = run_audit(demo_root, tmp_path)
    out = capsys.readouterr().out
    acc = report["composition"]["val"]["dummy_accuracy"]
    assert "ACCURACY TRAP" in out and f"{100 * acc:.1f}% accuracy on val" in out
    assert "VERDICT: no leak found (exit 0)" in out


def test_audit_checks_the_split_train_would_make_from_the_same_flags(demo_root, demo_data, tmp_path):
    rc, report = run_audit(demo_root, tmp_path, "--folds", 3, "--fold", 1, "--split-seed", 7)
    groups = identity.duplicate_groups(identity.shared_content(demo_data, progress=False))
    expected = splits.make_split(demo_data, 7, folds=3, fold=1, keep_in_train=["B22-47"], groups=groups)
    assert report["split"]["patients"] == {part: expected[part] for part in ("train", "val", "test")}
    assert rc == common.EXIT_OK


def test_audit_with_folds_and_no_fold_checks_every_fold_and_their_test_parts(demo_root, demo_data, tmp_path, capsys):
    rc, report = run_audit(demo_root, tmp_path, "--folds", 3)
    out = capsys.readouterr().out
    assert rc == common.EXIT_OK and report["ok"] and report["findings"] == []
    assert [f["split"]["fold"] for f in report["folds"]] == [0, 1, 2]
    tested = [p for f in report["folds"] for p in f["split"]["patients"]["test"]]
    assert sorted(tested) == [p for p in demo_data.cv_patients if p != "B22-47"]
    assert "All 3 folds: test parts disjoint" in out


def test_two_part_split_audit_says_there_is_no_untouched_set(demo_root, tmp_path, capsys):
    rc, report = run_audit(demo_root, tmp_path, "--test-frac", 0)
    assert rc == common.EXIT_OK and report["split"]["untouched_test"] is False
    assert "NO UNTOUCHED SET" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- leaks
def test_patient_split_by_section_folders_is_a_leak(demo_data, demo_root, tmp_path):
    others = [p for p in default_split(demo_data)["train"] if p != "B22-111"]
    split = write_split(tmp_path / "split.json", train=others + ["B22-111_0"], val=["B22-111_1"])
    rc, report = run_audit(demo_root, tmp_path, "--split", split)
    assert rc == common.EXIT_LEAK and report["ok"] is False
    assert finding(report, "patient_in_several_parts")["patients"] == ["B22-111"]
    assert finding(report, "split_lists_folder_names")["kind"] == "leak"


def test_same_patient_id_in_train_and_val_is_a_leak(demo_data, demo_root, tmp_path):
    s = default_split(demo_data)
    split = write_split(tmp_path / "split.json", train=s["train"], val=s["val"] + ["B22-01"])
    rc, report = run_audit(demo_root, tmp_path, "--split", split)
    assert rc == common.EXIT_LEAK and finding(report, "patient_in_several_parts")["patients"] == ["B22-01"]


def test_byte_identical_patients_in_different_parts_is_a_leak(demo_data, demo_root, tmp_path):
    s = default_split(demo_data)
    train = [p for p in s["train"] + s["val"] if p not in ("B22-201", "B22-08")]
    split = write_split(tmp_path / "split.json", train=train + ["B22-200"], val=["B22-201", "B22-08"])
    rc, report = run_audit(demo_root, tmp_path, "--split", split)
    f = finding(report, "identical_images_across_parts")
    assert rc == common.EXIT_LEAK and set(f["patients"]) == {"B22-200", "B22-201"}
    assert any("B22-201_0" in p for p in f["files"]) and any("B22-200_0" in p for p in f["files"])


def test_one_copied_image_between_parts_is_a_leak(demo_data, demo_root, tmp_path):
    root = copy_demo(demo_root, tmp_path)
    s = default_split(demo_data)
    src = sorted((root / CROPPED / f"{s['train'][0]}_0").glob("*.png"))[0]
    val_folder = next(f for f in (root / CROPPED).iterdir() if common.patient_id(f.name) == s["val"][0])
    shutil.copyfile(src, val_folder / "99999.png")
    split = write_split(tmp_path / "split.json", train=s["train"], val=s["val"])  # made before the copy
    rc, report = run_audit(root, tmp_path, "--split", split)  # (a split made now would group the two)
    f = finding(report, "identical_images_across_parts")
    assert rc == common.EXIT_LEAK and {s["train"][0], s["val"][0]} <= set(f["patients"])
    assert f"{CROPPED.as_posix()}/{val_folder.name}/99999.png" in f["files"]


def test_holdout_image_identical_to_a_crossvalidation_image_is_a_leak(demo_root, tmp_path):
    root = copy_demo(demo_root, tmp_path)
    src = sorted((root / CROPPED / "B22-47_0").glob("*.png"))[0]
    shutil.copyfile(src, next((root / HOLDOUT).iterdir()) / "99999.png")
    rc, report = run_audit(root, tmp_path)
    assert rc == common.EXIT_LEAK and "holdout" in finding(report, "identical_images_across_parts")["detail"]


def test_aug_copy_in_another_part_than_its_original_is_a_leak(demo_root, tmp_path):
    root = copy_demo(demo_root, tmp_path)
    data = common.load_data(root)
    aug = next(s for s in sorted(data.labelled, key=lambda s: s.path)
               if s.aug is not None and len(data.folders["annotated"][s.patient]) == 1)
    folder = Path(aug.path).parent.name
    other = f"{aug.patient}_{1 - common.folder_section(folder)}"     # a second section folder of that patient
    (root / ANNOTATED / other).mkdir()
    os.rename(root / aug.path, root / ANNOTATED / other / Path(aug.path).name)
    rest = [p for p in data.cv_patients if p != aug.patient]
    split = write_split(tmp_path / "split.json", train=rest + [folder], val=[other])
    rc, report = run_audit(root, tmp_path, "--split", split)
    assert rc == common.EXIT_LEAK and finding(report, "aug_copy_across_parts")["patients"] == [aug.patient]


def test_aug_copy_whose_row_names_another_patient_than_its_folder_fires():
    # A row's Pat_ID (sample.patient) can disagree with the folder the file sits in; the part is the folder's.
    original = common.Sample("CrossValidation/Annotated/B22-5_0/00012.png", "B22-5", "annotated", 1, 12)
    copy = common.Sample("CrossValidation/Annotated/B22-6_0/00012_Aug1.png", "B22-5", "annotated", 1, 12, 1)
    parts = audit_leakage.Parts({"train": ["B22-5"], "val": ["B22-6"]})
    [f] = audit_leakage.windows_across_parts([original, copy], parts)
    assert f.check == "aug_copy_across_parts" and f.patients == ["B22-5"] and f.kind == "leak"


def test_annotated_and_cropped_copies_of_a_window_in_different_parts_fire():
    annotated = common.Sample("CrossValidation/Annotated/B22-5_0/00012.png", "B22-5", "annotated", 0, 12)
    cropped = common.Sample("CrossValidation/Cropped/B22-5_1/12.png", "B22-5", "supplemental", 0, 12)
    parts = audit_leakage.Parts({"train": ["B22-5_0"], "val": ["B22-5_1"]})
    assert [f.check for f in audit_leakage.windows_across_parts([annotated, cropped], parts)] == ["window_across_parts"]


def test_holdout_patient_also_in_crossvalidation_is_a_leak(demo_root, tmp_path):
    root = copy_demo(demo_root, tmp_path)
    os.rename(next((root / HOLDOUT).iterdir()), root / HOLDOUT / "B22-01_0")
    rc, report = run_audit(root, tmp_path)
    assert rc == common.EXIT_LEAK and finding(report, "holdout_in_crossvalidation")["patients"] == ["B22-01"]


def test_stain_reference_patient_in_validation_is_a_leak(demo_data, demo_root, tmp_path):
    s = default_split(demo_data)
    split = write_split(tmp_path / "split.json", train=[p for p in s["train"] if p != "B22-47"],
                        val=s["val"] + ["B22-47"])
    other = s["val"][0]  # a second reference entry, a folder of another validation patient
    tree = "annotated" if other in demo_data.folders["annotated"] else "cropped"
    folder = f"{common.TREES[tree]}/{demo_data.folders[tree][other][0]}"
    rc, report = run_audit(demo_root, tmp_path, "--split", split, "--reference-patch", staining.DEFAULT_REFERENCE,
                           folder)
    assert rc == common.EXIT_LEAK and finding(report, "reference_not_in_train")["patients"] == sorted(["B22-47", other])


def test_a_test_part_is_audited_and_composed_like_val(demo_data, demo_root, tmp_path, capsys):
    s = default_split(demo_data)
    split = write_split(tmp_path / "split.json", train=[p for p in s["train"] if p != "B22-47"], val=s["val"],
                        test=["B22-47"])
    rc, report = run_audit(demo_root, tmp_path, "--split", split)
    assert rc == common.EXIT_LEAK and "test patient" in finding(report, "reference_not_in_train")["detail"]
    assert report["composition"]["test"]["patients"] == 1 and "accuracy on test" in capsys.readouterr().out


def test_any_problem_train_refuses_becomes_a_leak_when_no_check_caught_it():
    [f] = audit_leakage.split_refused(["something new"], [])
    assert f.kind == "leak" and "something new" in f.detail
    assert audit_leakage.split_refused(["x"], audit_leakage.found("leak", "other", [1], [], "x")) == []


# ----------------------------------------------------------------------------------------------- warnings
def test_warnings_alone_exit_0(demo_audit):
    rc, report = demo_audit
    assert rc == common.EXIT_OK and any(f["kind"] == "warning" for f in report["findings"])


def test_missing_reference_patch_is_a_warning(demo_root, tmp_path):
    rc, report = run_audit(demo_root, tmp_path, "--reference-patch", "CrossValidation/Annotated/B22-47_0/99999.png",
                           "CrossValidation/Annotated/B22-111_0")  # a folder that exists: not named
    assert rc == common.EXIT_OK and finding(report, "reference_patch_missing")["patients"] == ["B22-47"]


def test_control_folder_is_reported_from_its_path(demo_root, tmp_path):
    root = copy_demo(demo_root, tmp_path)
    shutil.copytree(root / CROPPED / "B22-08_0", root / CROPPED / "Control_0", copy_function=os.link)
    rc, report = run_audit(root, tmp_path)
    f = finding(report, "control_or_external_mentions")
    assert f["kind"] == "warning" and any("Control_0" in p for p in f["files"])


def test_workbook_cell_mentioning_external_is_reported_with_its_patient(demo_root, tmp_path):
    root = copy_demo(demo_root, tmp_path)
    wb = openpyxl.load_workbook(root / WORKBOOK)
    ws = wb["Sheet1"]
    ws.cell(row=1, column=9, value="Comment")
    row = next(r for r in range(2, ws.max_row + 1) if ws.cell(row=r, column=1).value == "B22-08")
    ws.cell(row=row, column=9, value="EXTERNAL sample")
    (root / WORKBOOK).unlink()
    wb.save(root / WORKBOOK)
    rc, report = run_audit(root, tmp_path)
    f = finding(report, "control_or_external_mentions")
    assert rc == common.EXIT_OK and f["patients"] == ["B22-08"] and f"I{row}" in f["detail"]


def test_png_header_size_equals_pil_size(demo_root):
    for path in sorted((demo_root / ANNOTATED / "B22-100_0").glob("*.png")):
        with Image.open(path) as im:
            assert identity.png_size(path) == im.size


def test_file_named_png_without_a_png_header_is_reported(demo_root, tmp_path):
    root = copy_demo(demo_root, tmp_path)
    victim = sorted((root / CROPPED / "B22-08_0").glob("*.png"))[0]
    replace_file(victim, b"not a png at all, just bytes")
    rc, report = run_audit(root, tmp_path)
    assert finding(report, "unreadable_png_headers")["files"] == [victim.relative_to(root).as_posix()]


def test_patients_left_out_of_a_split_file_are_a_warning(demo_data, demo_root, tmp_path):
    s = default_split(demo_data)
    split = write_split(tmp_path / "split.json", train=s["train"], val=s["val"][:-1], test=s["test"])
    rc, report = run_audit(demo_root, tmp_path, "--split", split)
    assert rc == common.EXIT_OK and finding(report, "patients_outside_split")["patients"] == [s["val"][-1]]


def test_patient_without_diagnosis_row_is_a_warning(demo_root, tmp_path):
    root = copy_demo(demo_root, tmp_path)
    csv_path = root / common.DIAGNOSIS_NAME
    lines = csv_path.read_text().splitlines()
    replace_file(csv_path, ("\n".join(line for line in lines if not line.startswith("B22-08,")) + "\n").encode())
    rc, report = run_audit(root, tmp_path)
    assert finding(report, "patients_without_diagnosis")["patients"] == ["B22-08"]


def test_a_jpg_a_folder_without_its_section_and_an_empty_folder_are_named_as_such_with_what_to_do(small_demo_root,
                                                                                                      tmp_path, capsys):
    root = copy_demo(small_demo_root, tmp_path)
    folder = next(p for p in sorted((root / CROPPED).iterdir()) if p.is_dir())  # a Cropped folder, <Pat_ID>_<section>
    png = next(folder.glob("*.png"))
    Image.open(png).convert("RGB").save(folder / "99999.jpg")  # saved as JPG: not read
    unsectioned = root / CROPPED / "B22-900"  # a patient folder whose _<section> suffix was lost
    unsectioned.mkdir()
    for k in range(3):
        os.link(png, unsectioned / f"{k:05d}.png")
    (root / HOLDOUT / "B22-500_0").mkdir()  # an empty HoldOut folder
    rc, report = run_audit(root, tmp_path)
    out = capsys.readouterr().out
    assert rc == common.EXIT_OK
    jpg = finding(report, "unread_images")
    patient = common.patient_id(folder.name)
    assert jpg["files"] == [f"{CROPPED}/{folder.name}/99999.jpg"] and jpg["patients"] == [patient]
    assert f"missing from their patient: {patient} (1); convert them to PNG" in jpg["detail"]
    unparsed = finding(report, "unparsed_folders")
    assert unparsed["files"] == [f"{CROPPED}/B22-900"] and unparsed["patients"] == ["B22-900"]
    assert f"{CROPPED}/B22-900 (3 image(s) missing from patient B22-900); rename each <Pat_ID>_<section>" in \
        unparsed["detail"]
    empty = finding(report, "empty_patient_folders")
    assert empty["files"] == [f"{HOLDOUT}/B22-500_0"] and "are empty (no patch PNG)" in empty["detail"]
    assert "B22-500" not in (finding(report, "patients_without_diagnosis") or {"patients": []})["patients"]
    stray = finding(report, "stray_entries")["files"]
    assert not {f"{CROPPED}/B22-900", f"{CROPPED}/{folder.name}/99999.jpg"} & set(stray)
    assert "[unread_images]" in out and "[unparsed_folders]" in out and "[empty_patient_folders]" in out


# ----------------------------------------------------------------------------------------------- real metadata
@pytest.fixture(scope="module")
def real_metadata_root(demo_root, tmp_path_factory):
    """The demo's images under the real workbook and CSV: most rows then have no file, which must be reported."""
    if not META.is_dir():
        pytest.skip(f"needs the real metadata folder {META} (missing here)")
    root = copy_demo(demo_root, tmp_path_factory.mktemp("real"))
    for name in (WORKBOOK, common.DIAGNOSIS_NAME):
        (root / name).unlink()
        shutil.copyfile(META / name, root / name)
    return root


def test_real_workbook_label_conflict_is_b22_241(real_metadata_root, tmp_path):
    rc, report = run_audit(real_metadata_root, tmp_path)
    assert finding(report, "label_conflicts")["patients"] == ["B22-241"]
    assert len(finding(report, "rows_without_files")["patients"]) > 100   # reported, not a crash
    assert finding(report, "presence_zero_rows")["patients"] == ["B22-151"]
    assert finding(report, "duplicate_rows")["patients"] == ["B22-151"]  # its Presence 0 rows repeat -1 windows


def test_real_workbook_cells_hold_no_control_mention_until_one_is_added(real_metadata_root, tmp_path):
    cells = list(audit_leakage.metadata_cells(real_metadata_root / WORKBOOK))
    assert len(cells) > 2695 * 8 and not any(audit_leakage.MENTION.search(text) for _, _, text in cells)
    root = tmp_path / "HelicoDataSet"
    shutil.copytree(real_metadata_root, root, copy_function=os.link)
    wb = openpyxl.load_workbook(root / WORKBOOK)
    ws = wb["Sheet1"]
    row = next(r for r in range(2, ws.max_row + 1) if ws.cell(row=r, column=1).value == "B22-241")
    ws.cell(row=row, column=9, value="control section")
    (root / WORKBOOK).unlink()
    wb.save(root / WORKBOOK)
    rc, report = run_audit(root, tmp_path)
    assert finding(report, "control_or_external_mentions")["patients"] == ["B22-241"]


# ----------------------------------------------------------------------------------------------- bad input
def bad_input(args, capsys):
    rc = audit_leakage.main([*map(str, args), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == common.EXIT_BAD_INPUT and err.startswith("error: ") and "\n" not in err
    return err


def test_missing_data_root_exits_2_naming_it(tmp_path, capsys):
    assert str(tmp_path / "nowhere") in bad_input(["--data-root", tmp_path / "nowhere"], capsys)


def test_bad_split_json_exits_2_naming_the_file(demo_root, tmp_path, capsys):
    (tmp_path / "split.json").write_text("{not json")
    assert "split.json" in bad_input(["--data-root", demo_root, "--split", tmp_path / "split.json"], capsys)


def test_split_naming_an_unknown_patient_exits_2_naming_it(demo_data, demo_root, tmp_path, capsys):
    s = default_split(demo_data)
    split = write_split(tmp_path / "split.json", train=s["train"] + ["B22-999"], val=s["val"])
    assert "B22-999" in bad_input(["--data-root", demo_root, "--split", split], capsys)


def test_unwritable_hash_cache_exits_2_naming_it(demo_root, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert "a_file" in bad_input(["--data-root", demo_root, "--hash-cache", tmp_path / "a_file" / "c.json"], capsys)


@pytest.mark.parametrize("flags", [["--folds", 5, "--fold", 5], ["--folds", 1, "--fold", 0], ["--val-frac", 1.5]])
def test_bad_fold_or_val_frac_exits_2_naming_the_flag(demo_root, flags, capsys):
    assert str(flags[0]) in bad_input(["--data-root", demo_root, *flags], capsys)


def test_a_truncated_png_with_an_intact_header_is_reported_as_undecodable(demo_root, tmp_path):
    root = copy_demo(demo_root, tmp_path)
    victim = sorted((root / CROPPED / "B22-08_0").glob("*.png"))[0]
    png = victim.read_bytes()
    replace_file(victim, png[: len(png) // 2])  # the header (and the size it states) survives
    rc, report = run_audit(root, tmp_path)
    assert rc == common.EXIT_OK
    f = finding(report, "undecodable_images")
    assert f["files"] == [victim.relative_to(root).as_posix()] and f["patients"] == ["B22-08"]
    assert "--skip-bad-images" in f["detail"]
    assert not [g for g in report["findings"] if g["check"] == "unreadable_png_headers"]


def test_a_second_audit_decodes_only_what_changed_and_reports_the_same(demo_root, tmp_path, monkeypatch):
    # the launcher audits at every job start and requeue: the decode answers live on disk, keyed by path, size and
    # mtime, beside the hash cache (--hash-cache names both)
    root, cache = copy_demo(demo_root, tmp_path), tmp_path / "hashes.json"
    rc, first = run_audit(root, tmp_path, "--hash-cache", cache)
    assert rc == common.EXIT_OK and identity.decode_cache_path(cache).is_file()
    decoded, real = [], identity.decode_check
    monkeypatch.setattr(identity, "decode_check", lambda path: decoded.append(path) or real(path))
    assert run_audit(root, tmp_path, "--hash-cache", cache) == (rc, first) and decoded == []
    victim = sorted((root / CROPPED / "B22-08_0").glob("*.png"))[0]
    replace_file(victim, victim.read_bytes()[:len(victim.read_bytes()) // 2])  # rewritten: new size and mtime
    rc, third = run_audit(root, tmp_path, "--hash-cache", cache)
    assert decoded == [victim] and finding(third, "undecodable_images")["files"] == [victim.relative_to(root).as_posix()]
    identity.decode_cache_path(cache).write_text("not a decode cache\n")  # foreign or damaged: decoded again
    assert run_audit(root, tmp_path, "--hash-cache", cache)[1] == third and len(decoded) > 100


def test_the_audit_and_the_split_flag_read_never_import_torch():
    # torch's import costs ~4 s of CPU per process here; the audit and run_h_pylori.sh's split-flag read need no
    # tensors, so a top-level `import torch` reaching them (through common -> devices once) is a regression.
    code = ("import sys, audit_leakage, common; from helico import splits, metrics, identity, run_folder; "
            "assert audit_leakage.main(['--check-flags', '--runs-dir', 'runs', '--run-id', 'no-such-run']) == 0; "
            "print(sorted(m for m in sys.modules if m == 'torch'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(audit_leakage.__file__).parent, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------- near-duplicates
def test_a_re_encoded_copy_under_another_patient_is_a_near_duplicate_the_content_hash_misses(small_demo_root, tmp_path):
    import io
    root = copy_demo(small_demo_root, tmp_path)
    rc, clean = run_audit(root, tmp_path)
    assert rc == 0 and finding(clean, "near_duplicate_images") is None  # distinct demo patches: >= 10 bits apart
    data = common.load_data(root)
    source = next(s.path for s in data.cropped if s.source == "supplemental")  # a CrossValidation patch
    holdout_folder = next((root / HOLDOUT).iterdir())
    with Image.open(root / source) as im:  # rescanned: 3 grey levels brighter, JPEG-compressed, saved as PNG again
        pixels = np.clip(np.asarray(im.convert("RGB"), dtype=np.int16) + 3, 0, 255).astype(np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, "JPEG", quality=85)
    jpeg.seek(0)
    copy = holdout_folder / "9999.png"
    with Image.open(jpeg) as im:
        im.save(copy)
    assert copy.read_bytes() != (root / source).read_bytes()
    rc, report = run_audit(root, tmp_path)
    hit = finding(report, "near_duplicate_images")
    assert hit is not None and hit["kind"] == "warning"
    assert {str(copy.relative_to(root)), source} <= set(hit["files"])
    owner = next(s.patient for s in data.cropped if s.path == source)
    assert {common.patient_id(holdout_folder.name), owner} <= set(hit["patients"])
    assert "HoldOut" in hit["detail"] and "<= 6 bits" in hit["detail"]
    assert finding(report, "identical_images_across_parts") is None  # not byte-identical: only this check sees it


def test_blank_tiles_are_counted_in_the_composition_and_left_out_of_the_near_duplicate_search(small_demo_root,
                                                                                               tmp_path):
    # flat tiles of different colors: not byte-identical, but every one hashes to 0; they once made every pair of
    # them a "near duplicate", across the HoldOut too
    root = copy_demo(small_demo_root, tmp_path)
    data = common.load_data(root)
    split = default_split(data)
    cv = next(s for s in data.cropped if s.patient in split["train"] and s.source == "supplemental")
    folders = [(root / cv.path).parent, next((root / HOLDOUT).iterdir())]
    for k, folder in enumerate(folders * 3):
        Image.new("RGB", (256, 256), (200 + k, 190, 180)).save(folder / f"{90000 + k}.png")
    rc, report = run_audit(root, tmp_path)
    assert rc == common.EXIT_OK and finding(report, "near_duplicate_images") is None
    assert report["composition"]["train"]["near_uniform_images"] == 3
    assert report["composition"]["holdout"]["near_uniform_images"] == 3
    assert report["composition"]["val"]["near_uniform_images"] == 0
