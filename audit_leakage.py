"""Leakage audit of a HelicoDataSet split: run it before training, read it before trusting a metric.

    python audit_leakage.py --data-root HelicoDataSet                        # the split train.py would make
    python audit_leakage.py --data-root HelicoDataSet --folds 5 --fold 2     # one fold of 5
    python audit_leakage.py --data-root HelicoDataSet --folds 5              # every fold, and their test parts
    python audit_leakage.py --data-root HelicoDataSet --split runs/26/split.json --json audit.json

The split comes from splits.resolve_split, as in train.py, so the audit checks exactly the split train.py makes
from the same flags; it accepts train.py's whole command line (helico/train_flags.py), which is how
run_h_pylori.sh calls it: `python audit_leakage.py <train.py's arguments>`. The report shows each part's
composition (with the all-negative classifier's accuracy: the accuracy trap), then every finding, one line each,
under a stable check name:
- leaks: patient_in_several_parts (B22-111_0 in train, B22-111_1 in val), split_lists_folder_names,
  identical_images_across_parts (byte-identical PNGs in different parts; HoldOut counts as a part),
  aug_copy_across_parts (an _AugK re-crop in another part than its window), window_across_parts (Annotated
  and Cropped copies of a window), holdout_in_crossvalidation, reference_not_in_train (the stain reference
  patient in val/test), split_refused (anything else splits.split_problems reports: train.py would refuse it),
  fold_test_parts (--folds K without --fold: the folds' test parts overlap or miss a patient);
- warnings: multi_section_patients, label_conflicts, presence_zero_rows, rows_without_files, files_without_rows,
  stray_entries, unread_images (a JPG, or a PNG not named <window>.png, in a patient folder: missing from that
  patient), unparsed_folders (a folder not named <Pat_ID>_<section>: its images missing from that patient),
  empty_patient_folders, duplicate_rows, control_or_external_mentions (paths and every workbook/CSV cell),
  off_size_images, unreadable_png_headers, undecodable_images (a valid header, pixels that do not decode: a
  truncated PNG), duplicate_content_groups (even when kept together), near_duplicate_images (a 64-bit perceptual
  hash within 6 bits across two patients: a re-encoded copy under another ID, which the content hash misses; pairs
  of HoldOut against CrossValidation and across split parts listed first, pairs within one part counted),
  reference_patch_missing, patients_outside_split, patients_without_diagnosis.

Exit codes: 0 no leak (warnings may be printed); 1 at least one leak; 2 bad input (missing or malformed data
root, workbook or CSV, bad --split JSON, a split patient the data root lacks, bad --folds/--fold/--val-frac),
with one line `error: ...` on stderr. `--json OUT` is written atomically:
  {"ok": bool, "findings": [{"kind", "check", "patients", "detail", "files"}], "composition": {...}, "split": {...}}

The composition also counts each part's near-uniform images (blank or background patches): their perceptual
hash is noise or constant, so the near-duplicate search leaves them out.

How it stays fast at the real dataset's size (file identity and its caches: helico/identity.py):
- one directory scan (common.load_data); every check then works on that listing in memory;
- content hashes only for files whose byte size another file shares (a file of unique size cannot have a
  byte-identical twin), hashed in a thread pool and cached by (path, size, mtime) in --hash-cache: a re-run
  hashes only new or changed files;
- image sizes from the 24-byte PNG header; every image is decoded once, in a thread pool, to find truncated files
  and take its perceptual hash, and the answers are kept beside the hash cache: a re-run decodes only new or
  changed files;
- the near-duplicate search compares distinct hashes only and counts the pairs of a hash many images share without
  listing them, so a dataset of look-alike patches costs no more than one of distinct patches.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common
from helico import identity, run_folder, splits, staining, train_flags
from common import TREES, DataError, patient_id

PARTS = splits.SPLIT_PARTS          # train, val, test
HOLDOUT = "holdout"                 # the HoldOut tree: the independent test set, a part of its own
MENTION = re.compile(r"control|extern", re.IGNORECASE)  # the original control-section trace (also externo/extern)
SHOW = 6                            # examples per finding in the printed report (the JSON has all files)


@dataclass
class Finding:
    kind: str                       # leak | warning
    check: str                      # stable name (see the module docstring)
    patients: list
    detail: str
    files: list = field(default_factory=list)


def found(kind: str, check: str, items, patients, detail: str, files=()) -> list[Finding]:
    """The answer of every check: one Finding when `items` (what it looked for) is non-empty, else nothing."""
    return [Finding(kind, check, sorted(set(patients)), detail, sorted(set(files)))] if items else []


def examples(items, n=SHOW) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def path_patient(path: str) -> str | None:
    """Patient of a path relative to the data root; None outside patient folders (e.g. Cropped/Thumbs.db)."""
    for tree in TREES.values():
        if path.startswith(tree + "/"):
            folder = path[len(tree) + 1:].split("/")[0]
            return patient_id(folder) if common.folder_section(folder) is not None else None
    return None


# ----------------------------------------------------------------------------------------------- parts
class Parts:
    """Which split part a patient, folder or file belongs to. Entries should be patient IDs; a split listing
    folder names is resolved folder by folder, so B22-111_0 (train) and B22-111_1 (val) stay distinguishable."""

    def __init__(self, split: dict):
        self.by_entry: dict[str, str] = {}
        self.by_patient: dict[str, str] = {}
        self.folder_memo: dict[str, str | None] = {}
        for part in PARTS:
            for entry in map(str, split.get(part) or []):
                self.by_entry.setdefault(entry, part)
                self.by_patient.setdefault(patient_id(entry), part)

    def of_patient(self, patient: str) -> str | None:
        return self.by_entry.get(patient) or self.by_patient.get(patient)

    def of_folder(self, folder: str) -> str | None:
        return self.by_entry.get(folder) or self.of_patient(patient_id(folder))

    def of_path(self, path: str) -> str | None:
        if path.startswith(TREES["holdout"] + "/"):
            return HOLDOUT
        folder = path.rsplit("/", 2)[-2]  # called per file (~220k): plain string work, one lookup per folder
        if folder not in self.folder_memo:
            self.folder_memo[folder] = self.of_folder(folder)
        return self.folder_memo[folder]


def split_patients(split: dict) -> dict[str, list[str]]:
    """part -> patient IDs (folder names reduced to their patient)."""
    return {part: sorted({patient_id(str(e)) for e in split.get(part) or []}) for part in PARTS if part in split}


# ----------------------------------------------------------------------------------------------- leak checks
def patient_in_several_parts(split: dict) -> list[Finding]:
    where: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for part in PARTS:
        for entry in map(str, split.get(part) or []):
            where[patient_id(entry)].setdefault(part, []).append(entry)
    bad = {p: parts for p, parts in sorted(where.items()) if len(parts) > 1}
    lines = [f"{p} in " + " and ".join(f"{part} ({', '.join(e)})" for part, e in parts.items())
             for p, parts in bad.items()]
    return found("leak", "patient_in_several_parts", bad, bad,
                 f"{len(bad)} patient(s) in more than one part: {examples(lines)}")


def split_lists_folder_names(split: dict) -> list[Finding]:
    folders = sorted({str(e) for part in PARTS for e in split.get(part) or [] if patient_id(str(e)) != str(e)})
    return found("leak", "split_lists_folder_names", folders, map(patient_id, folders),
                 f"the split names section folders, not patients ({examples(folders)}): a patient's other section "
                 f"can land in another part unnoticed, and train.py refuses such a split; list patient IDs")


def identical_images_across_parts(shared: dict[str, list[str]], parts: Parts) -> list[Finding]:
    """Byte-identical files (identity.shared_content) whose copies sit in different parts (HoldOut is one)."""
    owners_files: dict[tuple, list[str]] = defaultdict(list)
    for paths in shared.values():
        owners = {(path_patient(p), parts.of_path(p)) for p in paths}
        if len({part for _, part in owners} - {None}) > 1:
            owners_files[tuple(sorted(owners, key=str))].extend(paths)
    lines = [" + ".join(f"{p} ({part or 'no part'})" for p, part in owners) + f": {len(set(files))} files"
             for owners, files in owners_files.items()]
    return found("leak", "identical_images_across_parts", owners_files, [p for o in owners_files for p, _ in o],
                 f"byte-identical images in different parts: {examples(lines)}; keep such patients together "
                 f"(the default split does)", [f for fs in owners_files.values() for f in fs])


def windows_across_parts(samples: list[common.Sample], parts: Parts) -> list[Finding]:
    """One slide window (patient + window number) whose files land in different parts: its `_AugK` re-crops
    (aug_copy_across_parts) or its Annotated and Cropped copies (window_across_parts). Works on the joined
    samples, the part decided by each file's folder, so a split by folder or a row whose Pat_ID differs from its
    file's folder makes it fire."""
    groups: dict[tuple, list[common.Sample]] = defaultdict(list)
    for s in samples:
        if s.source != "holdout":
            groups[(s.patient, s.window)].append(s)
    hits: dict[str, list] = {"aug_copy_across_parts": [], "window_across_parts": []}
    for (patient, window), group in sorted(groups.items()):
        where = {parts.of_path(s.path) for s in group} - {None}  # a file in no part is unused, not leaked
        if len(where) > 1:
            check = "aug_copy_across_parts" if any(s.aug is not None for s in group) else "window_across_parts"
            hits[check].append((patient, window, sorted(where), [s.path for s in group]))
    return [f for check, items in hits.items() for f in found(
        "leak", check, items, [p for p, *_ in items], f"{len(items)} window(s) split across parts: "
        f"{examples(f'{p} window {w} in ' + '/'.join(where) for p, w, where, _ in items)}",
        [f for *_, fs in items for f in fs])]


def holdout_in_crossvalidation(data: common.HelicoData) -> list[Finding]:
    both = sorted(set(data.holdout_patients) & set(data.cv_patients))
    return found("leak", "holdout_in_crossvalidation", both, both, f"{len(both)} HoldOut patient(s) also in "
                 f"CrossValidation: {examples(both)}; the HoldOut is no longer an independent test")


def reference_not_in_train(reference, parts: Parts) -> list[Finding]:
    outside = [(p, parts.of_patient(p)) for p in staining.reference_patients(reference)
               if parts.of_patient(p) in ("val", "test")]
    return found("leak", "reference_not_in_train", outside, [p for p, _ in outside],
                 f"stain reference {' '.join(staining.reference_list(reference))} comes from "
                 f"{', '.join(f'{p} (a {part} patient)' for p, part in outside)}: the normalizer would be fitted on "
                 f"held-out data; keep them in train (the default split does) or pick another --reference-patch",
                 staining.reference_list(reference))


def split_refused(problems: list[str], findings: list[Finding]) -> list[Finding]:
    """Safety net: whatever makes train.py refuse the split is a leak here too, even if no check above caught it."""
    caught = any(f.kind == "leak" for f in findings)
    return found("leak", "split_refused", problems and not caught, [],
                 "train.py would refuse this split: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------- warning checks
def multi_section_patients(data: common.HelicoData) -> list[Finding]:
    folders: dict[str, set] = defaultdict(set)
    for tree in ("annotated", "cropped"):
        for p, names in data.folders[tree].items():
            folders[p].update(names)
    multi = {p: sorted(n) for p, n in sorted(folders.items()) if len(n) > 1}
    return found("warning", "multi_section_patients", multi, multi, f"{len(multi)} patient(s) with several section "
                 f"folders: {examples(p + ' (' + ' + '.join(n) + ')' for p, n in multi.items())}; one patient, "
                 f"so one part")


def label_conflicts(data: common.HelicoData) -> list[Finding]:
    rows = [a for a in data.annotations if a.presence == 1 and data.diagnosis.get(a.patient) == "NEGATIVA"]
    windows: dict[str, set] = defaultdict(set)
    for a in rows:
        windows[a.patient].add(a.window)
    lines = [f"{p} (window {', '.join(map(str, sorted(w)))})" for p, w in sorted(windows.items())]
    return found("warning", "label_conflicts", rows, windows, f"{len(windows)} NEGATIVA patient(s) with a window "
                 f"annotated Presence 1 ({len(rows)} rows incl. Aug copies): {examples(lines)}; label noise, kept "
                 f"as annotated")


def presence_zero_rows(data: common.HelicoData) -> list[Finding]:
    rows = [a for a in data.annotations if a.presence == 0]
    per = Counter(a.patient for a in rows)
    copies = data.uncertain_cropped
    also = (f"; their {len(copies)} Cropped cop{'y is' if len(copies) == 1 else 'ies are'} excluded too (not easy "
            f"negatives): {examples(copies)}" if copies else "")
    return found("warning", "presence_zero_rows", rows, per, f"{len(rows)} row(s) with Presence 0 (uncertain), "
                 f"excluded from training and metrics: {examples(f'{p} ({n})' for p, n in sorted(per.items()))}; "
                 f"rows {examples(a.row for a in rows)}{also}", data.uncertain_files + copies)


def rows_without_files(data: common.HelicoData) -> list[Finding]:
    rows = data.rows_without_file
    names = (f"row {a.row} {a.patient} window {a.window}" + (f"_Aug{a.aug}" if a.aug else "") for a in rows)
    return found("warning", "rows_without_files", rows, [a.patient for a in rows],
                 f"{len(rows)} workbook row(s) without an image, ignored: {examples(names)}")


def files_without_rows(data: common.HelicoData) -> list[Finding]:
    files = data.files_without_row
    return found("warning", "files_without_rows", files, map(path_patient, files),
                 f"{len(files)} Annotated image(s) without a workbook row, unused: {examples(files)}", files)


def stray_entries(data: common.HelicoData) -> list[Finding]:
    named = set(data.unread_images) | set(data.unparsed_folders)  # reported by the two checks below
    stray = [p for p in data.stray if p not in named]
    return found("warning", "stray_entries", stray, [], f"{len(stray)} entries that are neither patient "
                 f"folders nor patch PNGs, skipped: {examples(stray)}", stray)


def unread_images(data: common.HelicoData) -> list[Finding]:
    files = data.unread_images
    missing = Counter(map(path_patient, files))
    return found("warning", "unread_images", files, missing, f"{len(files)} image(s) in patient folders that are not "
                 f"read (only PNG patches named <window>.png or <window>_Aug<K>.png are), so they are missing from "
                 f"their patient: {examples(f'{p} ({n})' for p, n in sorted(missing.items()))}; convert them to PNG "
                 f"under such a name: {examples(files)}", files)


def unparsed_folders(data: common.HelicoData) -> list[Finding]:
    folders = data.unparsed_folders
    what = [f"{f} ({n} image(s) missing from patient {patient_id(f)})" for f, n in sorted(folders.items())]
    return found("warning", "unparsed_folders", folders, [patient_id(f) for f in folders if folders[f]],
                 f"{len(folders)} folder(s) not named <Pat_ID>_<section> (e.g. B22-500_0), so none of their images "
                 f"is read: {examples(what)}; rename each <Pat_ID>_<section>", list(folders))


def empty_patient_folders(data: common.HelicoData) -> list[Finding]:
    empty = data.empty_folders
    return found("warning", "empty_patient_folders", empty, map(patient_id, empty), f"{len(empty)} "
                 f"patient folder(s) are empty (no patch PNG), so those sections have no data: {examples(empty)}; "
                 f"copy their patches in, or remove the folder", empty)


def duplicate_rows(data: common.HelicoData) -> list[Finding]:
    keys: dict[tuple, list[common.Annotation]] = defaultdict(list)
    for a in data.annotations:
        keys[(a.patient, a.window, a.aug)].append(a)
    dups = sorted((rows for rows in keys.values() if len(rows) > 1), key=lambda rows: rows[0].row)
    lines = []
    for rows in dups:
        a, presences = rows[0], sorted({r.presence for r in rows})
        conflict = (f" (Presence {'/'.join(map(str, presences))}: conflicting, window excluded as uncertain)"
                    if len(presences) > 1 else "")
        lines.append(f"{a.patient} window {a.window}{f'_Aug{a.aug}' if a.aug else ''} rows "
                     f"{'/'.join(str(r.row) for r in rows)}{conflict}")
    return found("warning", "duplicate_rows", dups, [rows[0].patient for rows in dups], f"{len(dups)} (patient, "
                 f"window) key(s) on several workbook rows: {examples(lines)}")


def metadata_cells(path: Path):
    """(cell, patient of that row or None, text) for every non-empty cell of an xlsx (all sheets) or a CSV."""
    from openpyxl.utils import get_column_letter
    for sheet, rows in common.read_sheets(path, first_only=False):
        where = f"{path.name}!{sheet}!" if sheet else f"{path.name}!"
        header = [str(h if h is not None else "").strip().lower() for h in (rows[0] if rows else [])]
        col = next((header.index(c) for c in ("pat_id", "codi") if c in header), None)
        for r, row in enumerate(rows, start=1):
            patient = str(row[col]).strip() if col is not None and r > 1 and col < len(row) and row[col] else None
            for c, v in enumerate(row, start=1):
                if v is not None and str(v).strip():
                    yield f"{where}{get_column_letter(c)}{r}", patient, str(v)


def control_or_external_mentions(data: common.HelicoData, paths) -> list[Finding]:
    """The original pipeline's control-section trace: 'control' / 'external' in any path, workbook or CSV cell."""
    hit_paths = sorted(p for p in paths if MENTION.search(p))
    hit_cells = [(where, patient, text) for f in (data.annotations_file, data.diagnosis_file) if f
                 for where, patient, text in metadata_cells(f) if MENTION.search(text)]
    lines = [f"{where} = {text!r}" + (f" ({p})" if p else "") for where, p, text in hit_cells] + hit_paths
    patients = [p for p in map(path_patient, hit_paths) if p] + [p for _, p, _ in hit_cells if p]
    return found("warning", "control_or_external_mentions", lines, patients, f"{len(lines)} mention(s) of "
                 f"control/external material: {examples(lines)}; make sure no control section is mixed into the "
                 f"patients", hit_paths)


def off_size_images(sizes: dict, expected: int) -> list[Finding]:
    off = {p: s for p, s in sizes.items() if s is not None and tuple(s) != (expected, expected)}
    bad = sorted(p for p, s in sizes.items() if s is None)
    per_size = [f"{size} ({n})" for size, n in Counter(f"{w}x{h}" for w, h in off.values()).most_common()]
    return [*found("warning", "off_size_images", off, map(path_patient, off), f"{len(off)} image(s) not "
                   f"{expected}x{expected} (resized when loaded): {examples(per_size)}; {examples(off)}", off),
            *found("warning", "unreadable_png_headers", bad, map(path_patient, bad), f"{len(bad)} file(s) named "
                   f".png without a PNG header (truncated or another format): {examples(bad)}", bad)]


def undecodable_images(errors: dict[str, str]) -> list[Finding]:
    bad = sorted(errors)
    why = sorted({errors[p] for p in bad})
    return found("warning", "undecodable_images", bad, map(path_patient, bad), f"{len(bad)} PNG(s) with a valid "
                 f"header whose pixels do not decode ({examples(why)}): {examples(bad)}; train.py and evaluate.py "
                 f"stop at the first one (exit 2): replace them, or pass --skip-bad-images to leave them out", bad)


ACT_ON = ("holdout_vs_crossvalidation", "across_parts")  # near pairs a user must act on, listed in this order


def near_concern(a: str | None, b: str | None) -> str:
    """What a near pair of images in places a and b (a split part, HOLDOUT, None: no part) asks of the user."""
    if a != b and HOLDOUT in (a, b):
        return "holdout_vs_crossvalidation"
    return "across_parts" if a != b and a in PARTS and b in PARTS else "within_part"


def near_duplicate_images(hashes: dict[str, int], near_uniform: int, groups, parts: Parts) -> list[Finding]:
    """Images of two different patients (not one duplicate group, so never a byte-identical copy:
    identical_images_across_parts and duplicate_content_groups report those) whose perceptual hashes differ in at
    most NEAR of 64 bits: a re-encoded or re-colored copy of a slide under another ID escapes the content hash, the
    split, the bootstrap clusters and the HoldOut check. Pairs of HoldOut and CrossValidation images, then pairs
    across split parts, are listed; pairs within one part (or with a patient no part uses) are counted. `hashes`
    holds the informative images only (near-uniform ones match each other by chance). A warning, not a leak: a hash
    match is evidence, not proof; look at the pairs."""
    group_of = {p: i for i, g in enumerate(groups) for p in g}

    def where(path):
        patient = path_patient(path)
        return None if patient is None else (parts.of_path(path), patient)
    near = identity.near_duplicates(hashes, where, lambda patient: group_of.get(patient, patient), near_concern, ACT_ON)
    lines = [f"{a} ({path_patient(a)}, {parts.of_path(a) or 'no part'}) ~ {b} ({path_patient(b)}, "
             f"{parts.of_path(b) or 'no part'}), {bits} bit(s)" for _, a, b, bits in near.listed]
    act, within = sum(near.pairs.get(c, 0) for c in ACT_ON), near.pairs.get("within_part", 0)
    shown = f"; {len(lines):,} listed, one per pair of patients and of hashes" if act > len(lines) else ""
    similar = (f"images of different patients whose 64-bit perceptual hashes differ in <= {identity.NEAR} bits (not "
               f"byte-identical: re-encoded or re-colored copies?)")
    head = (f"{act:,} pair(s) to act on ({near.pairs.get(ACT_ON[0], 0):,} of HoldOut against CrossValidation, "
            f"{near.pairs.get(ACT_ON[1], 0):,} across split parts{shown}) of {similar}: {examples(lines)}; if a pair "
            f"is one slide under two IDs, its patients must stay in one part (and out of the HoldOut): give train.py "
            f"a --split that does so" if act else
            f"no pair to act on (HoldOut against CrossValidation or across split parts) of {similar}")
    notes = [f"{within:,} pair(s) within one part of the split (or with a patient no part uses), counted, not listed"
             if within else "", f"{near.shared_hashes:,} hash(es) shared by several images (the largest by "
             f"{near.largest_share:,}): their pairs counted, not listed" if near.shared_hashes else "",
             f"{near_uniform:,} near-uniform image(s) (blank or background) left out of the search" if near_uniform
             else ""]
    return found("warning", "near_duplicate_images", act + within, sorted(near.patients),
                 head + "".join(f"; {n}" for n in notes if n), [f for _, a, b, _ in near.listed for f in (a, b)])


def duplicate_content_groups(groups: list[list[str]], parts: Parts, holdout_patients) -> list[Finding]:
    where = lambda p: parts.of_patient(p) or (HOLDOUT if p in set(holdout_patients) else "no part")
    lines = [" + ".join(f"{p} ({where(p)})" for p in g) for g in groups]
    return found("warning", "duplicate_content_groups", groups, [p for g in groups for p in g], f"{len(groups)} "
                 f"group(s) of patients sharing byte-identical images: {examples(lines)}; one slide under two IDs? "
                 f"they must stay in one part")


def reference_patch_missing(root: Path, reference) -> list[Finding]:
    entries = staining.reference_list(reference)
    missing = [e for e in entries if not (Path(e) if Path(e).is_absolute() else root / e).exists()]
    return found("warning", "reference_patch_missing", missing, staining.reference_patients(missing),
                 f"stain reference {' '.join(missing)} not found under {root}: Macenko normalization cannot use it; "
                 f"pass --reference-patch")


def patients_outside_split(split: dict, data: common.HelicoData) -> list[Finding]:
    outside = sorted(set(data.cv_patients) - {p for ps in split_patients(split).values() for p in ps})
    return found("warning", "patients_outside_split", outside, outside, f"{len(outside)} CrossValidation "
                 f"patient(s) in no part of the split, unused: {examples(outside)}")


def patients_without_diagnosis(data: common.HelicoData) -> list[Finding]:
    with_images = {s.patient for s in data.all_samples()} | set(map(path_patient, data.files_without_row +
                                                                      data.uncertain_files))
    missing = sorted(with_images - set(data.diagnosis))  # an empty folder's patient: empty_patient_folders
    return found("warning", "patients_without_diagnosis", missing, missing, f"{len(missing)} patient(s) with images "
                 f"but no {common.DIAGNOSIS_NAME} row, so their Cropped patches get no label: {examples(missing)}")


# ----------------------------------------------------------------------------------------------- composition
def part_composition(samples: list[common.Sample], patients: list[str], data: common.HelicoData,
                     uncertain: int) -> dict:
    """Counts of one part as validation would see it (each window once) plus the Aug copies training adds."""
    once = common.one_per_window(samples)
    positives = sum(s.label == 1 for s in once)
    hard = sum(s.label == 0 and s.source == "annotated" for s in once)
    easy = sum(s.label == 0 and s.source == "supplemental" for s in once)
    n = positives + hard + easy
    return {"patients": len(patients), "diagnosis": dict(Counter(data.diagnosis.get(p, "unknown") for p in patients)),
            "positives": positives, "aug_copies": sum(s.label == 1 for s in samples) - positives,
            "hard_negatives": hard, "easy_negatives": easy, "presence0_excluded": uncertain, "samples": n,
            "dummy_accuracy": (hard + easy) / n if n else None}


def composition(data: common.HelicoData, split: dict, parts: Parts, near_uniform: Counter) -> dict:
    """Each part's composition (part_composition; the HoldOut's patients and patches) and its near-uniform images
    (`near_uniform`: part -> count), which the near-duplicate search leaves out."""
    by_part: dict[str, list] = defaultdict(list)
    for s in data.labelled:
        by_part[parts.of_path(s.path)].append(s)
    uncertain = Counter(parts.of_patient(a.patient) for a in data.uncertain)
    out = {part: part_composition(by_part[part], ps, data, uncertain[part])
           for part, ps in split_patients(split).items()}
    out[HOLDOUT] = {"patients": len(data.holdout_patients), "patches": len(data.holdout),
                    "diagnosis": dict(Counter(data.diagnosis.get(p, "unknown") for p in data.holdout_patients))}
    for part, c in out.items():
        c["near_uniform_images"] = near_uniform.get(part, 0)
    return out


# ----------------------------------------------------------------------------------------------- the audit
@dataclass
class Audit:
    data: common.HelicoData
    split: dict
    findings: list[Finding]
    composition: dict
    split_source: str

    @property
    def leaks(self) -> list[Finding]:
        return [f for f in self.findings if f.kind == "leak"]


def run_checks(data, split, groups, shared, checked: dict[str, identity.Decoded], reference_patch,
               patch_size: int) -> list[Finding]:
    """Leaks first (in the order of the module docstring), then warnings. `checked`: identity.decode_images."""
    parts = Parts(split)
    folders = {f"{TREES[tree]}/{f}" for tree, pats in data.folders.items() for fs in pats.values() for f in fs}
    sizes = {p: d.size for p, d in checked.items()}
    errors = {p: d.error for p, d in checked.items() if d.error}
    hashes = {p: d.dhash for p, d in checked.items() if d.informative}
    near_uniform = sum(d.dhash is not None and not d.informative for d in checked.values())
    findings = [*patient_in_several_parts(split), *split_lists_folder_names(split),
                *identical_images_across_parts(shared, parts),
                *windows_across_parts(data.labelled + data.cropped, parts),
                *holdout_in_crossvalidation(data), *reference_not_in_train(reference_patch, parts)]
    findings += split_refused(splits.split_problems(split, data, groups, reference_patch), findings)
    return findings + [
        *multi_section_patients(data), *label_conflicts(data), *presence_zero_rows(data), *rows_without_files(data),
        *files_without_rows(data), *stray_entries(data), *unread_images(data), *unparsed_folders(data),
        *empty_patient_folders(data), *duplicate_rows(data),
        *control_or_external_mentions(data, set(sizes) | set(data.stray) | folders),
        *off_size_images(sizes, patch_size), *undecodable_images(errors),
        *duplicate_content_groups(groups, parts, data.holdout_patients),
        *near_duplicate_images(hashes, near_uniform, groups, parts),
        *reference_patch_missing(data.root, reference_patch), *patients_outside_split(split, data),
        *patients_without_diagnosis(data)]


def audit_all(args) -> tuple[list[Audit], list[Finding]]:
    """The audit of the split the flags ask for; with --folds K and no --fold, of every fold, plus the check that the
    folds' test parts are disjoint and cover the patients (fold_test_parts)."""
    if not args.data_root:
        raise DataError("--data-root: not given (pass the HelicoDataSet folder or set $HELICO_DATA)")
    data = common.load_data(args.data_root)
    every_fold = bool(args.folds) and args.fold is None and not args.split
    folds = range(args.folds) if every_fold and args.folds >= 2 else [args.fold]
    cache = identity.decode_cache_path(identity.hash_cache_path(args.hash_cache, data.root))
    checked = identity.decode_images(data.root, data.image_paths(), data.file_stats, cache,  # once for every fold
                                     progress=not args.no_progress)
    audits = [audit(argparse.Namespace(**{**vars(args), "fold": k}), data, checked) for k in folds]
    if not every_fold:
        return audits, []
    problems = splits.fold_problems([a.split for a in audits], data.cv_patients)
    return audits, found("leak", "fold_test_parts", problems, [], "; ".join(problems))


def audit(args, data: common.HelicoData, checked: dict[str, identity.Decoded]) -> Audit:
    progress = not args.no_progress
    try:
        split, groups, shared = splits.resolve_split(data, **splits.split_options(args), progress=progress)
    except OSError as e:  # e.g. an unwritable --hash-cache, a file vanishing mid-scan
        raise DataError(f"{e.filename}: {e.strerror} (while hashing; check --hash-cache and the data root)") from None
    missing = sorted({p for ps in split_patients(split).values() for p in ps} - set(data.cv_patients))
    if missing:  # split_problems reports it too; here it is bad input, as it is for train.py
        raise DataError(f"--split {args.split}: data root {data.root} lacks patient(s) of the split: "
                        f"{examples(missing)}")
    parts = Parts(split)
    near_uniform = Counter(parts.of_path(p) for p, d in checked.items() if d.dhash is not None and not d.informative)
    return Audit(data, split, run_checks(data, split, groups, shared, checked, args.reference_patch,
                                         args.patch_size),
                 composition(data, split, parts, near_uniform),
                 split_source=f"from {args.split}" if args.split else "made from the flags, as train.py makes it")


# ----------------------------------------------------------------------------------------------- report
def percent(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def composition_table(comp: dict) -> list[str]:
    head = (f"  {'part':<8}{'patients':>9}{'NEG/BAIXA/ALTA':>16}{'positives':>11}{'+Aug':>6}{'hard neg':>10}"
            f"{'easy neg':>10}{'Presence 0':>12}{'all-negative acc':>18}")
    lines = [head]
    for part, c in comp.items():
        dx = "/".join(str(c["diagnosis"].get(d, 0)) for d in common.DIAGNOSES)
        if part == HOLDOUT:
            lines.append(f"  {part:<8}{c['patients']:>9}{dx:>16}   {c['patches']:,} patches, patient diagnosis only")
            continue
        lines.append(f"  {part:<8}{c['patients']:>9}{dx:>16}{c['positives']:>11,}{c['aug_copies']:>6,}"
                     f"{c['hard_negatives']:>10,}{c['easy_negatives']:>10,}{c['presence0_excluded']:>12,}"
                     f"{percent(c['dummy_accuracy']):>18}")
    blank = {part: c.get("near_uniform_images", 0) for part, c in comp.items()}
    if any(blank.values()):
        lines.append("  near-uniform images (blank or background; left out of the near-duplicate search): "
                     + ", ".join(f"{part} {n:,}" for part, n in blank.items()))
    return lines


def render_report(a: Audit) -> str:
    d, s = a.data, a.split
    how = (f"fold {s.get('fold')} of {s.get('folds')} is {'test' if splits.has_untouched_test(s) else 'val'}"
           if s.get("folds") else f"val-frac {s.get('val_frac')}"
           + (f", test-frac {s['test_frac']}" if s.get("test_frac") is not None else ""))
    fold = f" (fold {s.get('fold')} of {s.get('folds')})" if s.get("folds") else ""
    lines = [f"Leakage audit of {d.root}{fold}",
             f"  {len(d.cv_patients)} CrossValidation patients, {len(d.holdout_patients)} HoldOut patients, "
             f"{len(d.annotations):,} workbook rows ({d.annotations_file.name}), {len(d.diagnosis)} diagnoses",
             f"  split {a.split_source}: " + ", ".join(f"{p} {len(ps)} patients" for p, ps in split_patients(s).items())
             + (f" (seed {s['seed']}, {how})" if "seed" in s else ""),
             "", "Composition (windows counted once; +Aug = re-crops training adds; easy = Cropped of NEGATIVA)",
             *composition_table(a.composition)]
    if not splits.has_untouched_test(s):
        lines += ["", "  NO UNTOUCHED SET: this is a two-part split (train/val); every number evaluate.py reports "
                      "comes from the patients that chose the epoch, the threshold and the patient rule."]
    trap = [f"{percent(c['dummy_accuracy'])} accuracy on {part}" for part, c in a.composition.items()
            if part in ("val", "test") and c.get("dummy_accuracy") is not None]
    if trap:
        lines += ["", f"  ACCURACY TRAP: a model answering 'negative' for every patch scores {' and '.join(trap)}.",
                  "  Accuracy says almost nothing here: judge by recall, precision and PR-AUC."]
    for kind, title in (("leak", "LEAKS"), ("warning", "Warnings")):
        items = [f for f in a.findings if f.kind == kind]
        lines += ["", f"{title} ({len(items)})" if items else f"{title}: none"]
        lines += [f"  {'LEAK' if kind == 'leak' else 'warn'} [{f.check}] {f.detail}" for f in items]
    verdict = (f"VERDICT: {len(a.leaks)} LEAK(S), do not train on this split (exit 1)" if a.leaks
               else "VERDICT: no leak found (exit 0)")
    return "\n".join(lines + ["", verdict])


def to_json(a: Audit) -> dict:
    s = a.split
    summary = {"source": a.split_source, "patients": split_patients(s),
               **{k: s.get(k) for k in ("seed", "val_frac", "test_frac", "folds", "fold", "kept_in_train",
                                        "duplicate_groups")}, "untouched_test": splits.has_untouched_test(s)}
    return {"ok": not a.leaks, "findings": [asdict(f) for f in a.findings], "composition": a.composition,
            "split": summary}


def to_json_all(audits: list[Audit], cross: list[Finding]) -> dict:
    """One audit: its JSON as it always was. Every fold: {"ok", "folds": [one per fold], "findings": cross-fold}."""
    if len(audits) == 1 and not cross:
        return to_json(audits[0])
    return {"ok": not cross and all(not a.leaks for a in audits), "folds": [to_json(a) for a in audits],
            "findings": [asdict(f) for f in cross]}


# ----------------------------------------------------------------------------------------------- main
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Audit a patient-level split of the HelicoDataSet for leaks before "
                                "training. Exit 0: no leak; 1: leak found; 2: bad input. Every train.py flag is "
                                "accepted too (not listed here), so the audit takes train.py's whole command line and "
                                "checks the split it trains.",
                                parents=[train_flags.train_args_parser(shown=False)], allow_abbrev=False,
                                formatter_class=common.HelpFormatter)
    p.add_argument("--json", metavar="OUT", help="also write the findings and composition as JSON (for CI or "
                   "to archive next to a run); written atomically")
    p.add_argument("--patch-size", type=int, default=256, help="side in pixels the dataset's PNG files should have "
                   "(256 for the real data; make_demo_data.py's --patch-size if you changed it); not --image-size, "
                   "the model input train.py resizes them to")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs of batch jobs)")
    p.add_argument("--check-flags", action="store_true", help="only parse the command line and check that train.py "
                   "may write its run folder (--runs-dir/--run-id: not one holding an earlier model without last.pt, "
                   "unless --force), then exit (0, or 2 with one line): what run_h_pylori.sh runs before staging, so "
                   "a mistyped flag or a finished run folder costs no copy")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.check_flags:
        try:
            if args.run_id:
                run_folder.refuse_earlier_run(Path(args.runs_dir) / args.run_id, args.force)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return common.EXIT_BAD_INPUT
        return common.EXIT_OK
    try:
        audits, cross = audit_all(args)
        if args.json:
            try:
                common.atomic_write_text(args.json, json.dumps(to_json_all(audits, cross), indent=2) + "\n")
            except OSError as e:
                raise DataError(f"--json {args.json}: cannot write ({e.strerror or e})") from None
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return common.EXIT_BAD_INPUT
    except (OSError, ImportError) as e:  # never Python's exit 1, which here means a leak
        return common.unexpected_fault(e)
    print("\n\n".join(render_report(a) for a in audits))
    if len(audits) > 1:
        print(f"\nAll {len(audits)} folds: " + ("; ".join(f"LEAK [{f.check}] {f.detail}" for f in cross) or
              "test parts disjoint, every patient tested once (but the stain reference kept in train)"))
    leaks = cross or any(a.leaks for a in audits)
    return common.EXIT_LEAK if leaks else common.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
