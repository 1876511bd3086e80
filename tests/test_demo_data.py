"""make_demo_data.py: the miniature HelicoDataSet has the real on-disk format, every trap of the real data,
learnable pixels (brown rods on positives only), is deterministic, and never leaves a half-written folder.

Format checks read the files themselves (openpyxl, PIL, csv), never make_demo_data's internals. They use the
session-wide default demo (`demo_root`, seed 0); behavior checks generate tiny datasets in tmp_path."""
import csv
import functools
import os
import re
import shutil
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import openpyxl
import pytest
from PIL import Image

import make_demo_data

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--patients", "8", "--holdout-patients", "2", "--patch-size", "64"]
FOLDER = re.compile(r"^(B22-\d+)_([01])$")
ANNOTATED_NAME = re.compile(r"^(\d{5})(?:_Aug([1-8]))?\.png$")
UNPADDED_NAME = re.compile(r"^([1-9]\d*)\.png$")
BROWN_OD = 0.10   # blue OD minus red OD: DAB gives +0.5 per unit, hematoxylin -0.36, clean background < 0.07


# ----------------------------------------------------------------------------------------------- helpers
def generate(out: Path, *flags) -> int:
    return make_demo_data.main([str(out), *flags])


def tree_bytes(root: Path) -> dict:
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


_OD = -np.log((np.arange(256) + 1) / 256)                    # optical density of each 8-bit value
_IS_BROWN = (_OD[None, :] - _OD[:, None]) > BROWN_OD          # [red, blue] -> DAB-like? (a lookup is fast)


@functools.lru_cache(maxsize=None)   # several tests look at the same files: decode each once
def brown_pixels(path: Path, size: int | None = None) -> int:
    """Pixels whose optical density is DAB-like (absorbs blue more than red), after optional resizing."""
    img = Image.open(path).convert("RGB")
    if size:
        img = img.resize((size, size), Image.BILINEAR)
    rgb = np.asarray(img)
    return int(_IS_BROWN[rgb[..., 0], rgb[..., 2]].sum())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Three minimum-size datasets: seed 1, seed 1 again, seed 2."""
    base = tmp_path_factory.mktemp("tiny")
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert generate(base / name, *TINY, "--seed", seed) == 0
    return {name: base / name for name in "abc"}


@pytest.fixture(scope="module")
def rows(demo_root):
    wb = openpyxl.load_workbook(demo_root / "HP_WSI-CoordAllAnnotatedPatches.xlsx", read_only=True)
    assert wb.sheetnames == ["Sheet1"]
    table = list(wb["Sheet1"].iter_rows(values_only=True))
    wb.close()
    assert table[0] == ("Pat_ID", "Section_ID", "Window_ID", "i", "j", "h", "w", "Presence")
    return table[1:]


@pytest.fixture(scope="module")
def diagnosis(demo_root):
    with open(demo_root / "PatientDiagnosis.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["CODI", "DENSITAT"]
    return dict(table[1:])


def row_key(row) -> tuple:
    window, _, aug = str(row[2]).partition("_Aug")
    return row[0], int(window), int(aug) if aug else None


@pytest.fixture(scope="module")
def annotated_files(demo_root) -> dict:
    """(patient, window, aug) -> path, for every PNG under CrossValidation/Annotated."""
    files = {}
    for folder in (demo_root / "CrossValidation" / "Annotated").iterdir():
        for f in folder.glob("*.png"):
            m = ANNOTATED_NAME.match(f.name)
            files[(FOLDER.match(folder.name).group(1), int(m.group(1)), int(m.group(2)) if m.group(2) else None)] = f
    return files


def patient_folders(root: Path) -> dict:
    """patient -> folder paths, parsing `<Pat_ID>_<section>` exactly."""
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        out.setdefault(FOLDER.match(d.name).group(1), []).append(d)
    return out


# ----------------------------------------------------------------------------------------------- layout
def test_data_root_holds_only_the_real_dataset_entries(demo_root):
    assert sorted(p.name for p in demo_root.iterdir()) == [
        "CrossValidation", "HP_WSI-CoordAllAnnotatedPatches.xlsx", "HoldOut", "PatientDiagnosis.csv"]
    assert sorted(p.name for p in (demo_root / "CrossValidation").iterdir()) == ["Annotated", "Cropped"]


def test_every_folder_is_named_patient_underscore_section(demo_root):
    for tree in ("CrossValidation/Annotated", "CrossValidation/Cropped", "HoldOut"):
        for d in (demo_root / tree).iterdir():
            assert d.is_dir() == (d.name != "Thumbs.db"), d
            assert d.name == "Thumbs.db" or FOLDER.match(d.name), d


def test_annotated_names_pad_the_window_number_before_the_aug_suffix(demo_root):
    names = [f.name for f in (demo_root / "CrossValidation" / "Annotated").glob("*/*.png")]
    assert names and all(ANNOTATED_NAME.match(n) for n in names)
    assert any("_Aug" in n for n in names) and any(n.startswith("0") for n in names)


def test_cropped_and_holdout_names_are_unpadded(demo_root):
    for tree in ("CrossValidation/Cropped", "HoldOut"):
        names = [f.name for f in (demo_root / tree).glob("*/*") if f.name != "Thumbs.db"]
        assert names and all(UNPADDED_NAME.match(n) for n in names), tree


def test_default_demo_stays_small(demo_root):
    pngs = list(demo_root.rglob("*.png"))
    assert 1200 <= len(pngs) <= 2000
    assert sum(f.stat().st_size for f in demo_root.rglob("*") if f.is_file()) < 200e6


# ----------------------------------------------------------------------------------------------- patients
def test_cross_validation_patients_cover_all_diagnoses_with_cropped_and_mostly_annotated(demo_root, diagnosis):
    cropped = patient_folders(demo_root / "CrossValidation" / "Cropped")
    annotated = patient_folders(demo_root / "CrossValidation" / "Annotated")
    assert Counter(diagnosis[p] for p in cropped) == {"NEGATIVA": 15, "BAIXA": 10, "ALTA": 11}
    assert set(annotated) <= set(cropped) and len(annotated) >= 0.75 * len(cropped)
    assert all(20 <= sum(len(list(d.glob("*.png"))) for d in folders) <= 31 for folders in cropped.values())


def test_patient_ids_include_prefix_traps_and_two_digit_padding(demo_root, diagnosis):
    cropped = patient_folders(demo_root / "CrossValidation" / "Cropped")
    assert {"B22-10", "B22-100", "B22-11", "B22-111", "B22-03"} <= set(cropped)
    assert all(re.fullmatch(r"B22-(0[1-9]|[1-9]\d+)", p) for p in diagnosis)


def test_one_patient_has_two_sections_in_both_trees(demo_root):
    for tree in ("Annotated", "Cropped"):
        names = {d.name for d in (demo_root / "CrossValidation" / tree).iterdir()}
        assert {"B22-111_0", "B22-111_1"} <= names
        assert Counter(FOLDER.match(n).group(1) for n in names if n != "Thumbs.db")["B22-111"] == 2


def test_holdout_patients_are_new_listed_and_of_mixed_diagnosis(demo_root, diagnosis):
    holdout = set(patient_folders(demo_root / "HoldOut"))
    cv = set(patient_folders(demo_root / "CrossValidation" / "Cropped"))
    assert len(holdout) == 6 and not holdout & cv
    assert holdout <= set(diagnosis) and {diagnosis[p] for p in holdout} == {"NEGATIVA", "BAIXA", "ALTA"}


def test_diagnosis_csv_lists_every_patient_with_images_and_a_few_without(demo_root, diagnosis):
    with_images = set(patient_folders(demo_root / "HoldOut")) | set(
        patient_folders(demo_root / "CrossValidation" / "Cropped"))
    assert with_images < set(diagnosis)
    assert set(diagnosis.values()) == {"NEGATIVA", "BAIXA", "ALTA"}


def test_two_negativa_patients_have_byte_identical_cropped_folders(demo_root, diagnosis):
    src, dst = (demo_root / "CrossValidation" / "Cropped" / f"B22-{n}_0" for n in (200, 201))
    assert tree_bytes(src) == tree_bytes(dst) and len(tree_bytes(src)) >= 20
    assert diagnosis["B22-200"] == diagnosis["B22-201"] == "NEGATIVA"


def test_stray_thumbs_db_at_top_level_and_inside_a_patient_folder(demo_root):
    cropped = demo_root / "CrossValidation" / "Cropped"
    assert (cropped / "Thumbs.db").is_file()
    assert len(list(cropped.glob("*/Thumbs.db"))) == 1


# ----------------------------------------------------------------------------------------------- workbook
def test_workbook_cells_have_the_real_types(rows):
    assert all(isinstance(r[0], str) and r[1] in (0, 1) and type(r[1]) is int for r in rows)
    assert all(all(type(v) is int for v in r[3:]) for r in rows)
    window_types = Counter(type(r[2]).__name__ for r in rows)
    assert window_types["int"] > 0 and window_types["str"] > 0 and set(window_types) == {"int", "str"}
    assert all(re.fullmatch(r"[1-9]\d*_Aug[1-8]", r[2]) for r in rows if isinstance(r[2], str))


def test_presence_counts_include_positives_negatives_and_two_uncertain(rows):
    counts = Counter(r[7] for r in rows)
    assert set(counts) == {1, -1, 0} and counts[0] == 2 and counts[1] > counts[-1] > 0


def test_aug_rows_come_in_positive_groups_of_eight_and_one_group_lacks_its_original(rows):
    originals = {row_key(r)[:2] for r in rows if isinstance(r[2], int)}
    groups = Counter(row_key(r)[:2] for r in rows if isinstance(r[2], str))
    assert set(groups.values()) == {8}
    assert all(r[7] == 1 for r in rows if isinstance(r[2], str))
    assert len([g for g in groups if g not in originals]) == 1


def test_aug_rows_are_small_shifts_of_their_original(rows):
    origin = {row_key(r)[:2]: r for r in rows if isinstance(r[2], int)}
    shifts = [(abs(r[3] - origin[row_key(r)[:2]][3]), abs(r[4] - origin[row_key(r)[:2]][4]))
              for r in rows if isinstance(r[2], str) and row_key(r)[:2] in origin]
    assert shifts and max(max(s) for s in shifts) <= 24


def test_some_rows_name_another_section_than_their_folder(rows, annotated_files):
    folder_of = {k: int(FOLDER.match(p.parent.name).group(2)) for k, p in annotated_files.items()}
    mismatched = [r for r in rows if row_key(r) in folder_of and folder_of[row_key(r)] != r[1]]
    assert {r[0] for r in mismatched} >= {"B22-10", "B22-111"}


def test_exactly_one_row_without_file_and_one_file_without_row(rows, annotated_files):
    keys = {row_key(r) for r in rows}
    assert len(keys) == len(rows)
    assert len(keys - set(annotated_files)) == 1 and len(set(annotated_files) - keys) == 1


def test_negativa_patient_with_a_positive_window_is_label_noise(rows, diagnosis):
    noisy = {r[0] for r in rows if r[7] == 1 and diagnosis[r[0]] == "NEGATIVA"}
    assert noisy == {"B22-03"}


def test_hard_negatives_exist_for_every_annotated_patient(rows, annotated_files):
    assert {k[0] for k in annotated_files} == {r[0] for r in rows if r[7] == -1}


def test_cropped_windows_never_reuse_an_annotated_window_of_the_same_patient(demo_root, annotated_files):
    annotated = {k[:2] for k in annotated_files}
    for f in (demo_root / "CrossValidation" / "Cropped").glob("*/*.png"):
        assert (FOLDER.match(f.parent.name).group(1), int(f.stem)) not in annotated, f


# ----------------------------------------------------------------------------------------------- images
def test_every_png_opens_and_modes_include_rgba_and_grey(demo_root):
    modes = Counter()
    for f in demo_root.rglob("*.png"):
        brown_pixels(f)   # decodes every pixel (a truncated or corrupt PNG raises), cached for the tests below
        with Image.open(f) as img:
            modes[img.mode] += 1
    assert set(modes) == {"RGB", "RGBA", "L"} and modes["L"] == 1 and modes["RGBA"] >= 5


def test_one_off_size_patch_matches_its_row(demo_root, rows, annotated_files):
    sizes = Counter(Image.open(f).size for f in demo_root.rglob("*.png"))
    assert sizes == {(256, 256): sizes[(256, 256)], (206, 256): 1}
    (row,) = [r for r in rows if r[6] != 256]
    assert (row[5], row[6]) == (256, 206) and Image.open(annotated_files[row_key(row)]).size == (206, 256)


def test_stain_reference_patch_exists_and_is_tissue_rich(demo_root):
    rgb = np.asarray(Image.open(demo_root / "CrossValidation/Annotated/B22-47_0/01653.png").convert("RGB"), float)
    od = -np.log((rgb + 1) / 256).sum(axis=2)
    assert (od > 0.35).mean() > 0.8   # background sums to ~0.2


def test_stain_reference_patch_fits_a_two_stain_macenko_reference(demo_root):
    import macenko_gpu
    ref = macenko_gpu.load_rgb(demo_root / "CrossValidation/Annotated/B22-47_0/01653.png")
    assert macenko_gpu.MacenkoNormalizer().fit(ref).fitted  # raises on a reference without both stains


def test_every_positive_window_and_aug_copy_shows_brown_rods(rows, annotated_files):
    positives = [annotated_files[row_key(r)] for r in rows if r[7] == 1]
    assert len(positives) > 100 and all(brown_pixels(f) >= 10 for f in positives)


def test_bacteria_stay_visible_after_resizing_to_96_px(rows, annotated_files):
    originals = [annotated_files[row_key(r)] for r in rows if r[7] == 1 and isinstance(r[2], int)]
    assert all(brown_pixels(f, size=96) >= 1 for f in originals)


def test_most_negatives_have_no_brown_but_a_few_carry_artefacts(demo_root, rows, annotated_files, diagnosis):
    hard = [brown_pixels(annotated_files[row_key(r)]) for r in rows if r[7] == -1 and row_key(r) in annotated_files]
    easy = [brown_pixels(f) for f in (demo_root / "CrossValidation" / "Cropped").glob("*/*.png")
            if diagnosis[FOLDER.match(f.parent.name).group(1)] == "NEGATIVA"]
    assert np.mean(np.array(hard) == 0) >= 0.7 and np.mean(np.array(easy) == 0) >= 0.9
    assert max(hard + easy) > 0   # no "any brown pixel = positive" shortcut


def test_share_of_brown_cropped_patches_follows_diagnosis(demo_root, diagnosis):
    share = {}
    for dx in ("NEGATIVA", "BAIXA", "ALTA"):
        files = [f for tree in ("CrossValidation/Cropped", "HoldOut") for f in (demo_root / tree).glob("*/*.png")
                 if diagnosis[FOLDER.match(f.parent.name).group(1)] == dx]
        share[dx] = np.mean([brown_pixels(f) >= 10 for f in files])
    assert share["NEGATIVA"] < 0.06 < share["BAIXA"] < 0.2 < share["ALTA"] < 0.4, share


# ----------------------------------------------------------------------------------------------- behavior
def test_same_seed_gives_identical_bytes_and_another_seed_differs(tiny):
    a, b, c = (tree_bytes(tiny[n]) for n in "abc")
    assert a == b
    assert a["HP_WSI-CoordAllAnnotatedPatches.xlsx"] != c["HP_WSI-CoordAllAnnotatedPatches.xlsx"]
    assert a["CrossValidation/Annotated/B22-47_0/01653.png"] != c["CrossValidation/Annotated/B22-47_0/01653.png"]


def test_minimum_size_dataset_still_has_every_trap(tiny):
    root = tiny["a"]
    assert (root / "CrossValidation/Annotated/B22-47_0/01653.png").is_file()
    assert (root / "CrossValidation/Cropped/B22-111_1").is_dir() and (root / "CrossValidation/Cropped/Thumbs.db").is_file()
    sizes = Counter(Image.open(f).size for f in root.rglob("*.png"))
    assert sizes[(64, 64)] > 0 and sizes[(52, 64)] == 1   # off-size scales with --patch-size


def test_the_tree_gets_the_umasks_permissions_not_its_temp_folders_private_ones(tiny):
    # built in a mkdtemp folder (0700) and renamed: a shared cluster group must still be able to read the demo
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(tiny["a"].stat().st_mode) == 0o777 & ~umask


def test_refuses_a_non_empty_out_dir_without_force(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert generate(tmp_path, *TINY) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--force" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_force_replaces_an_earlier_demo_but_never_a_foreign_folder(tmp_path, tiny):
    demo, foreign = tmp_path / "demo", tmp_path / "foreign"
    shutil.copytree(tiny["a"], demo)   # seed 1
    assert generate(demo, *TINY, "--seed", "2", "--force") == 0
    assert tree_bytes(demo) == tree_bytes(tiny["c"])
    foreign.mkdir()
    (foreign / "PatientDiagnosis.csv").write_text("CODI,DENSITAT\n")
    assert generate(foreign, *TINY, "--force") == 2 and (foreign / "PatientDiagnosis.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "foreign"]   # no temp folders left


def test_a_crash_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args):
        raise RuntimeError("disk full")
    monkeypatch.setattr(make_demo_data, "write_holdout", fail)
    with pytest.raises(RuntimeError):
        generate(tmp_path / "out", *TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags", [["--patients", "3"], ["--patch-size", "16"], ["--holdout-patients", "-1"]])
def test_bad_flag_values_exit_2_naming_the_flag(tmp_path, capsys, flags):
    assert generate(tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + flags[0]) and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_help_runs_and_gives_advice():
    res = subprocess.run([sys.executable, str(ROOT / "make_demo_data.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--patients" in res.stdout and "--force" in res.stdout
