"""common.py: names, metadata readers, data-root join, samples, dataset, devices, atomic writes."""
import csv
import os
import shutil

import openpyxl
import pytest
import torch
from PIL import Image

import common
from conftest import META, needs_meta

HEADER = ["Pat_ID", "Section_ID", "Window_ID", "i", "j", "h", "w", "Presence"]


# ------------------------------------------------------------------------------------------ helpers
def write_xlsx(path, rows, header=HEADER):
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(header)
    for r in rows:
        ws.append(list(r))
    wb.save(path)


def png(path, size=(8, 8), mode="RGB", color=(200, 180, 190)):
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = color if mode == "RGB" else (*color, 255) if mode == "RGBA" else color[0]
    Image.new(mode, size, fill).save(path)


def make_root(tmp_path, rows, annotated, cropped, diagnosis, holdout=()):
    """A minimal data root: workbook rows, file lists per tree (relative 'FOLDER/NAME.png'), diagnosis dict."""
    root = tmp_path / "root"
    for t, (tree, names) in enumerate((("CrossValidation/Annotated", annotated), ("CrossValidation/Cropped", cropped),
                                       ("HoldOut", holdout))):
        (root / tree).mkdir(parents=True, exist_ok=True)
        for k, name in enumerate(names):
            if name.endswith(".png"):
                png(root / tree / name, color=(k % 250, k // 250, 40 * t))  # distinct bytes
            else:
                (root / tree / name).parent.mkdir(parents=True, exist_ok=True)
                (root / tree / name).write_bytes(b"stray")
    write_xlsx(root / "HP_WSI-CoordAllAnnotatedPatches.xlsx", [(p, s, w, 0, 0, 256, 256, pr) for p, s, w, pr in rows])
    with open(root / "PatientDiagnosis.csv", "w", newline="") as f:
        csv.writer(f).writerows([("CODI", "DENSITAT"), *diagnosis.items()])
    return root


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("folder,patient", [("B22-111_0", "B22-111"), ("B22-111_1", "B22-111"), ("B22-11_0", "B22-11"),
                                            ("B22-10_1", "B22-10"), ("B22-100_0", "B22-100"), ("B22-01_0", "B22-01"),
                                            ("/data/Cropped/B22-47_0", "B22-47"), ("B22-47", "B22-47")])
def test_patient_id_strips_only_the_section_suffix(folder, patient):
    assert common.patient_id(folder) == patient


def test_patient_id_never_prefix_matches():
    folders = ["B22-10_0", "B22-100_0", "B22-101_1", "B22-10_1"]
    assert [f for f in folders if common.patient_id(f) == "B22-10"] == ["B22-10_0", "B22-10_1"]


@pytest.mark.parametrize("name,parsed", [("00902.png", (902, None)), ("00902_Aug3.png", (902, 3)), ("388.png", (388, None)),
                                         ("1163.PNG", (1163, None)), ("Thumbs.db", None), ("x_Aug1.png", None)])
def test_parse_patch_name(name, parsed):
    assert common.parse_patch_name(name) == parsed


# ------------------------------------------------------------------------------------------ real metadata
@needs_meta
def test_real_workbook_loads_exactly():
    rows = common.read_annotations(META / "HP_WSI-CoordAllAnnotatedPatches.xlsx")
    assert len(rows) == 2695
    assert sum(r.aug is not None for r in rows) == 1312
    assert [sum(r.presence == v for r in rows) for v in (1, -1, 0)] == [1475, 1216, 4]
    assert sum(r.presence == 1 and r.aug is None for r in rows) == 163
    assert {r.aug for r in rows if r.aug is not None} == set(range(1, 9))
    assert all(isinstance(r.window, int) for r in rows)
    assert rows[0].row == 2  # spreadsheet row numbers, header is row 1


@needs_meta
def test_real_workbook_has_one_aug_group_without_original():
    rows = common.read_annotations(META / "HP_WSI-CoordAllAnnotatedPatches.xlsx")
    originals = {(r.patient, r.window) for r in rows if r.aug is None}
    orphans = {(r.patient, r.window) for r in rows if r.aug is not None} - originals
    assert len(orphans) == 1


@needs_meta
def test_real_diagnosis_loads():
    dx = common.read_diagnosis(META / "PatientDiagnosis.csv")
    assert len(dx) == 309
    assert [sum(v == d for v in dx.values()) for d in common.DIAGNOSES] == [151, 72, 86]
    assert dx["B22-01"] == "BAIXA"


@needs_meta
def test_workbook_csv_export_and_other_names_load_the_same(tmp_path):
    xlsx = common.read_annotations(META / "HP_WSI-CoordAllAnnotatedPatches.xlsx")
    wb = openpyxl.load_workbook(META / "HP_WSI-CoordAllAnnotatedPatches.xlsx", read_only=True)
    with open(tmp_path / "HP_WSI-CoordAnnotatedPatches.csv", "w", newline="") as f:
        csv.writer(f, delimiter=";").writerows(wb["Sheet1"].iter_rows(values_only=True))
    assert common.read_annotations(tmp_path) == xlsx  # a folder is searched under every known name
    shutil.copy(META / "HP_WSI-CoordAllAnnotatedPatches.xlsx", tmp_path / "HP_WSI-CoordAnnotatedAllPatches.xlsx")
    assert common.read_annotations(tmp_path / "HP_WSI-CoordAnnotatedAllPatches.xlsx") == xlsx


@pytest.mark.parametrize("header,row,message", [
    (["Pat_ID", "Section_ID", "Window_ID", "i"], ("B22-1", 0, 5, 0), "missing column 'Presence'"),
    (HEADER, ("B22-1", 0, 5, 0, 0, 256, 256, 2), "row 2: unknown Presence value 2"),
    (HEADER, ("B22-1", 0, 5, 0, 0, 256, 256, "yes"), "row 2: unknown Presence value 'yes'"),
    (HEADER, ("B22-1", 0, "902_Augx", 0, 0, 256, 256, 1), "row 2: unparsable Window_ID '902_Augx'"),
    (HEADER, ("B22-1", 0, None, 0, 0, 256, 256, 1), "row 2: unparsable Window_ID None"),
])
def test_bad_workbook_is_a_clear_error_naming_file_row_and_value(tmp_path, header, row, message):
    path = tmp_path / "HP_WSI-CoordAllAnnotatedPatches.xlsx"
    write_xlsx(path, [row], header)
    with pytest.raises(common.DataError, match=message) as e:
        common.read_annotations(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_unknown_diagnosis_is_a_clear_error(tmp_path):
    (tmp_path / "PatientDiagnosis.csv").write_text("CODI,DENSITAT\nB22-01,BAIXA\nB22-02,MEDIA\n")
    with pytest.raises(common.DataError, match=r"PatientDiagnosis.csv: row 3: unknown DENSITAT 'MEDIA'"):
        common.read_diagnosis(tmp_path / "PatientDiagnosis.csv")


# ------------------------------------------------------------------------------------------ data root
@pytest.fixture
def small_root(tmp_path):
    rows = [("B22-5", 0, 1, 1), *[("B22-5", 0, f"1_Aug{k}", 1) for k in (1, 2)],   # positive + 2 Aug copies
            ("B22-5", 1, 2, -1),                       # Section_ID 1 but the file lives in B22-5_0
            ("B22-5", 0, 3, 0),                        # uncertain: excluded, counted
            ("B22-5", 0, 4, -1),                       # row without a file
            ("B22-50", 0, 7, -1), ("B22-50", 0, 8, -1)]
    annotated = ["B22-5_0/00001.png", "B22-5_0/00001_Aug1.png", "B22-5_0/00001_Aug2.png", "B22-5_0/00002.png",
                 "B22-5_0/00003.png", "B22-5_0/00009.png",       # 9: file without a row
                 "B22-50_1/00007.png", "B22-50_1/00008.png", "B22-50_1/Thumbs.db"]
    cropped = ["B22-50_1/7.png", "B22-50_0/20.png", "B22-50_1/21.png", "B22-5_0/30.png", "Thumbs.db"]
    return make_root(tmp_path, rows, annotated, cropped, {"B22-5": "ALTA", "B22-50": "NEGATIVA"},
                     holdout=["B22-90_0/1.png"])


def test_join_is_on_patient_window_aug_not_section(small_root):
    data = common.load_data(small_root)
    by_path = {s.path: s for s in data.labelled}
    assert by_path["CrossValidation/Annotated/B22-5_0/00002.png"].label == 0
    assert by_path["CrossValidation/Annotated/B22-5_0/00001_Aug2.png"].aug == 2
    assert by_path["CrossValidation/Annotated/B22-5_0/00001_Aug2.png"].window == 1  # base window
    assert by_path["CrossValidation/Annotated/B22-50_1/00007.png"].patient == "B22-50"


def test_problems_are_reported_never_dropped_silently(small_root):
    data = common.load_data(small_root)
    assert [(a.patient, a.window) for a in data.rows_without_file] == [("B22-5", 4)]
    assert data.files_without_row == ["CrossValidation/Annotated/B22-5_0/00009.png"]
    assert [(a.window, a.presence) for a in data.uncertain] == [(3, 0)]
    assert sorted(data.stray) == ["CrossValidation/Annotated/B22-50_1/Thumbs.db", "CrossValidation/Cropped/Thumbs.db"]


def test_sample_set_of_the_original_workflow(small_root):
    data = common.load_data(small_root)
    kinds = sorted((s.source, s.label, s.patient) for s in data.labelled)
    assert kinds.count(("annotated", 1, "B22-5")) == 3        # window 1 and its 2 Aug copies
    assert ("supplemental", 0, "B22-5") not in kinds           # Cropped of an infected patient is not a negative
    # B22-50's Cropped 7.png is annotated window 7 already: a hard negative, not counted again as an easy one
    assert sorted(s.path for s in data.labelled if s.source == "supplemental") == [
        "CrossValidation/Cropped/B22-50_0/20.png", "CrossValidation/Cropped/B22-50_1/21.png"]
    assert {s.label for s in data.cropped if s.patient == "B22-5"} == {-1}
    assert [(s.patient, s.source) for s in data.holdout] == [("B22-90", "holdout")]
    assert data.cv_patients == ["B22-5", "B22-50"] and data.holdout_patients == ["B22-90"]
    assert data.folders["cropped"]["B22-50"] == ["B22-50_0", "B22-50_1"]


def test_select_counts_each_window_once_unless_training(small_root):
    data = common.load_data(small_root)
    assert len([s for s in common.select(data.labelled, ["B22-5"]) if s.label == 1]) == 1
    assert len([s for s in common.select(data.labelled, ["B22-5"], include_aug=True) if s.label == 1]) == 3
    orphan = [s for s in data.labelled if s.aug is not None]  # an Aug group with no original keeps one copy
    assert [s.aug for s in common.one_per_window(orphan)] == [1]


def test_cropped_copy_of_a_presence_zero_window_is_not_an_easy_negative(tmp_path):
    # the real workbook's Presence 0 rows all belong to a NEGATIVA patient, whose Cropped patches are easy negatives
    rows = [("B22-60", 0, 12, 0), ("B22-60", 0, 13, -1)]
    root = make_root(tmp_path, rows, ["B22-60_0/00012.png", "B22-60_0/00013.png"],
                     ["B22-60_0/12.png", "B22-60_0/13.png", "B22-60_0/14.png", "B22-60_1/12.png"], {"B22-60": "NEGATIVA"})
    data = common.load_data(root)
    assert data.uncertain_cropped == ["CrossValidation/Cropped/B22-60_0/12.png"]
    assert sorted(s.path for s in data.labelled if s.source == "supplemental") == [
        "CrossValidation/Cropped/B22-60_0/14.png", "CrossValidation/Cropped/B22-60_1/12.png"]  # _1/12: another window


def test_two_sections_reusing_a_window_number_keep_both_files(tmp_path):
    rows = [("B22-70", 0, 5, -1), ("B22-70", 1, 5, 1), *[("B22-70", 1, f"5_Aug{k}", 1) for k in (1, 2)]]
    annotated = ["B22-70_0/00005.png", "B22-70_1/00005.png", "B22-70_1/00005_Aug1.png", "B22-70_1/00005_Aug2.png"]
    root = make_root(tmp_path, rows, annotated, ["B22-70_0/1.png", "B22-70_1/1.png"], {"B22-70": "ALTA"})
    data = common.load_data(root)
    by_path = {s.path: s.label for s in data.labelled}
    assert by_path["CrossValidation/Annotated/B22-70_0/00005.png"] == 0
    assert by_path["CrossValidation/Annotated/B22-70_1/00005.png"] == 1
    assert data.files_without_row == [] and data.rows_without_file == [] and data.duplicate_rows == []
    once = common.select(data.labelled, ["B22-70"])
    assert sorted((s.section, s.window, s.aug) for s in once) == [(0, 5, None), (1, 5, None)]
    assert len(common.select(data.cropped, ["B22-70"])) == 2


def test_a_reused_window_number_whose_row_names_no_section_is_listed_not_dropped(tmp_path):
    rows = [("B22-71", 3, 5, -1)]  # Section_ID 3: neither B22-71_0 nor B22-71_1
    root = make_root(tmp_path, rows, ["B22-71_0/00005.png", "B22-71_1/00005.png"], [], {"B22-71": "ALTA"})
    data = common.load_data(root)
    assert [a.row for a in data.rows_without_file] == [2]
    assert data.files_without_row == ["CrossValidation/Annotated/B22-71_0/00005.png",
                                      "CrossValidation/Annotated/B22-71_1/00005.png"]


def test_conflicting_rows_of_one_window_make_it_uncertain(tmp_path):
    rows = [("B22-151", 0, 93, -1), ("B22-151", 0, 93, 0), ("B22-151", 0, 94, -1), ("B22-151", 0, 94, -1)]
    root = make_root(tmp_path, rows, ["B22-151_0/00093.png", "B22-151_0/00094.png"], [], {"B22-151": "BAIXA"})
    data = common.load_data(root)
    assert [(a.window, a.presence) for a in data.uncertain] == [(93, 0)]       # -1 and 0 for one window: excluded
    assert [(s.window, s.label) for s in data.labelled] == [(94, 0)]           # agreeing duplicates: kept once
    assert [a.row for a in data.duplicate_rows] == [3, 5]


@needs_meta
def test_real_workbook_conflicts_are_the_four_b22_151_windows():
    rows = common.read_annotations(META / "HP_WSI-CoordAllAnnotatedPatches.xlsx")
    keys = {}
    for a in rows:
        keys.setdefault((a.patient, a.window, a.aug), set()).add(a.presence)
    assert sorted(k for k, v in keys.items() if len(v) > 1) == [("B22-151", w, None) for w in (93, 146, 147, 148)]


def test_missing_layout_pieces_are_clear_errors(small_root):
    (small_root / "PatientDiagnosis.csv").unlink()
    with pytest.raises(common.DataError, match="missing PatientDiagnosis.csv"):
        common.load_data(small_root)
    with pytest.raises(common.DataError, match="missing folder CrossValidation/Annotated"):
        common.load_data(small_root / "nowhere")


# ------------------------------------------------------------------------------------------ dataset
def test_dataset_converts_rgba_grey_and_resizes_off_size(tmp_path):
    samples = []
    for name, mode, size in (("a.png", "RGBA", (16, 16)), ("b.png", "L", (16, 16)), ("c.png", "RGB", (16, 13))):
        png(tmp_path / name, size=size, mode=mode)
        samples.append(common.Sample(name, "B22-1", "annotated", 1, 1))
    ds = common.PatchDataset(tmp_path, samples, image_size=16)
    for k in range(3):
        x, label, idx = ds[k]
        assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and (label, idx) == (1, k)


def test_truncated_png_is_an_error_naming_the_file_or_skipped_on_request(tmp_path):
    png(tmp_path / "ok.png", size=(64, 64))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    samples = [common.Sample("cut.png", "B22-1", "annotated", 0, 1)]
    with pytest.raises(common.DataError, match="cut.png: unreadable image"):
        common.PatchDataset(tmp_path, samples, image_size=64)[0]
    x, label, idx = common.PatchDataset(tmp_path, samples, image_size=64, skip_bad=True)[0]
    assert label == common.BAD
    images, labels, indices, bad = common.drop_bad(x[None], torch.tensor([label]), torch.tensor([idx]))
    assert len(images) == 0 and bad == [0]


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with common.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    common.atomic_write_text(target, "whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]
    umask = os.umask(0o022)
    try:
        common.atomic_write_text(target, "shared")
    finally:
        os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o644  # readable by colleagues, as open() would make it


def test_device_rule_names_the_flag_and_refuses_what_it_cannot_use():
    assert common.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert common.resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(common.DataError, match=f"--device {bad}: expected auto, cpu, cuda or cuda:N"):
            common.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(common.DataError, match="--device cuda:1: CUDA is not available"):
            common.resolve_device("cuda:1")


def test_explicit_gpu_index_under_torchrun_is_refused_and_cuda_takes_the_local_rank(monkeypatch):
    # cuda:N would put every rank on GPU N, where NCCL fails on the duplicate GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current = []  # the chosen GPU becomes the current one (an Event or stream made later lands there, not on GPU 0)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    with pytest.raises(common.DataError, match=r"--device cuda:1: under torchrun \(4 processes\).*use --device cuda"):
        common.resolve_device("cuda:1", local_rank=2, world=4)
    assert common.resolve_device("cuda", local_rank=2, world=4) == torch.device("cuda", 2)
    assert common.resolve_device("auto", local_rank=3, world=4) == torch.device("cuda", 3)
    assert common.resolve_device("cuda:1", local_rank=0, world=1) == torch.device("cuda", 1)  # one process: any GPU
    assert current == [torch.device("cuda", 2), torch.device("cuda", 3), torch.device("cuda", 1)]
    assert common.resolve_device("cpu") == torch.device("cpu") and len(current) == 3


def test_a_failed_atomic_write_names_the_file_the_user_asked_for_not_its_temp_file(tmp_path, capsys):
    (tmp_path / "log.jsonl").mkdir()  # os.replace(tmp, path) fails: IsADirectoryError(tmp, path)
    with pytest.raises(IsADirectoryError) as caught:
        common.atomic_write_text(tmp_path / "log.jsonl", "{}\n")
    assert common.unexpected_fault(caught.value) == common.EXIT_BAD_INPUT
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {tmp_path / 'log.jsonl'}: ") and ".tmp" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]  # the temp file is gone


def test_bounded_map_keeps_at_most_ahead_calls_in_flight_and_keeps_order():
    from concurrent.futures import ThreadPoolExecutor
    submitted, consumed = [], []
    with ThreadPoolExecutor(2) as pool:
        real_submit = pool.submit
        pool.submit = lambda fn, x: submitted.append(x) or real_submit(fn, x)
        for x in common.bounded_map(pool, lambda v: v * v, range(50), ahead=3):
            consumed.append(x)
            assert len(submitted) - len(consumed) <= 3  # Executor.map would have submitted all 50 at once
    assert consumed == [v * v for v in range(50)]


def test_files_digest_is_the_sha256_of_one_line_per_file_in_order():
    import hashlib
    files = [(f"CrossValidation/Cropped/B22-1_0/{k}.png", 1000 + k, 10 ** 18 + k) for k in range(20000)]
    want = hashlib.sha256("".join(f"{p}\t{s}\t{m}\n" for p, s, m in files).encode()).hexdigest()
    assert common.files_digest(iter(files)) == want  # across the 8192-line pieces
    assert common.files_digest(files[::-1]) != want and common.files_digest([]) == hashlib.sha256().hexdigest()


def test_remembered_computes_once_per_key_and_again_for_a_bad_file(tmp_path):
    where, calls = tmp_path / "memo.json", []
    compute = lambda: calls.append(1) or {"n": len(calls)}
    valid = lambda value: isinstance(value["n"], int)
    assert common.remembered(where, "k", "value", compute, valid) == {"n": 1}
    assert common.remembered(where, "k", "value", compute, valid) == {"n": 1} and len(calls) == 1  # read
    assert common.remembered(where, "other", "value", compute, valid) == {"n": 2}  # another key: computed, kept
    for bad in ("[1]", "{", '{"key": "other", "value": {"n": "x"}}', '{"key": "other"}'):
        where.write_text(bad)  # not an object, not JSON, a value valid() refuses, no value: computed again
        assert common.remembered(where, "other", "value", compute, valid) == {"n": len(calls)}
    assert len(calls) == 6 and common.remembered(None, "other", "value", compute, valid) == {"n": 7}
