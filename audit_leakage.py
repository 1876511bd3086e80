"""Leakage audit of a HelicoDataSet split: run it before training, read it before trusting a metric.

    python audit_leakage.py --data-root HelicoDataSet                        # the split train.py would make
    python audit_leakage.py --data-root HelicoDataSet --folds 5 --fold 2     # one fold of 5
    python audit_leakage.py --data-root HelicoDataSet --split runs/26/split.json --json audit.json

The split is obtained exactly as train.py obtains it from the same flags (splits.resolve_split), so a clean
audit means the split train.py will use is clean. The report gives the composition of each split part (the
all-negative classifier's accuracy included: the accuracy trap) and every finding, one line each.

Leaks (kind "leak", exit 1):
  patient_in_several_parts     one patient (after patient_id) in more than one part, e.g. B22-111_0 in train
                               and B22-111_1 in val
  split_lists_folder_names     the split names folders (B22-111_0), not patients: train.py refuses it
  identical_images_across_parts  byte-identical PNGs in different parts (HoldOut counts as a part of its own)
  aug_copy_across_parts        an `_AugK` re-crop in another part than its original window (same patient+window)
  window_across_parts          the Annotated and Cropped copies of one window in different parts
  holdout_in_crossvalidation   a HoldOut patient that also has CrossValidation folders
  reference_not_in_train       the stain reference patch's patient in val or test (it would shape the normalizer)
  split_refused                anything else splits.split_problems reports (train.py would refuse the split)
Warnings (kind "warning"): multi_section_patients, label_conflicts, presence_zero_rows, rows_without_files,
  files_without_rows, stray_entries, duplicate_rows, control_or_external_mentions (paths and every workbook/CSV
  cell), off_size_images, unreadable_png_headers, duplicate_content_groups (even when kept together),
  reference_patch_missing, patients_outside_split, patients_without_diagnosis.

Exit codes: 0 no leak (warnings may be printed); 1 at least one leak; 2 bad input (missing or malformed data
root, workbook or CSV, bad --split JSON, a split patient the data root lacks, bad --folds/--fold/--val-frac):
one line `error: ...` on stderr. `--json OUT` is written atomically:
  {"ok": bool, "findings": [{"kind", "check", "patients", "detail", "files"}], "composition": {...}, "split": {...}}

Speed on the real dataset (~220k PNGs, minutes not hours):
- one directory scan (common.load_data); every later check works on that listing in memory;
- content hashes only for files whose byte size another file shares (a file with a unique size cannot have a
  byte-identical twin), read and hashed in a thread pool and cached by (path, size, mtime) in --hash-cache,
  so a re-run hashes only new or changed files;
- image sizes from the 24-byte PNG header (signature + IHDR), read in a thread pool; no pixel is decoded.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import struct
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import common
import splits
from common import TREES, DataError, patient_id

PARTS = splits.SPLIT_PARTS          # train, val, test
HOLDOUT = "holdout"                 # the HoldOut tree: the independent test set, a part of its own
MENTION = re.compile(r"control|extern", re.IGNORECASE)  # the original control-section trace (also externo/extern)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHOW = 6                            # examples per finding in the printed report (the JSON has all files)


@dataclass
class Finding:
    kind: str                       # leak | warning
    check: str                      # stable name (see the module docstring)
    patients: list
    detail: str
    files: list = field(default_factory=list)


def leak(check, patients, detail, files=()) -> Finding:
    return Finding("leak", check, sorted(set(patients)), detail, sorted(files))


def warning(check, patients, detail, files=()) -> Finding:
    return Finding("warning", check, sorted(set(patients)), detail, sorted(files))


def examples(items, n=SHOW) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------- parts
class Parts:
    """Which split part a patient, folder or file belongs to. Entries should be patient IDs; a split listing
    folder names is resolved folder by folder, so B22-111_0 (train) and B22-111_1 (val) stay distinguishable."""

    def __init__(self, split: dict):
        self.by_entry: dict[str, str] = {}
        self.by_patient: dict[str, str] = {}
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
        return self.of_folder(PurePosixPath(path).parent.name)


def split_patients(split: dict) -> dict[str, list[str]]:
    """part -> patient IDs (folder names reduced to their patient)."""
    return {part: sorted({patient_id(str(e)) for e in split.get(part) or []}) for part in PARTS if part in split}


def missing_patients(split: dict, data: common.HelicoData) -> list[str]:
    known = set(data.cv_patients)
    return sorted({p for ps in split_patients(split).values() for p in ps} - known)


# ----------------------------------------------------------------------------------------------- leak checks
def patient_in_several_parts(split: dict) -> list[Finding]:
    where: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for part in PARTS:
        for entry in map(str, split.get(part) or []):
            where[patient_id(entry)].setdefault(part, []).append(entry)
    bad = {p: parts for p, parts in sorted(where.items()) if len(parts) > 1}
    if not bad:
        return []
    lines = [f"{p} in " + " and ".join(f"{part} ({', '.join(e)})" for part, e in parts.items()) for p, parts in bad.items()]
    return [leak("patient_in_several_parts", bad, f"{len(bad)} patient(s) in more than one part: {examples(lines)}")]


def split_lists_folder_names(split: dict) -> list[Finding]:
    folders = sorted({str(e) for part in PARTS for e in split.get(part) or [] if patient_id(str(e)) != str(e)})
    if not folders:
        return []
    return [leak("split_lists_folder_names", map(patient_id, folders),
                 f"the split names section folders, not patients ({examples(folders)}): a patient's other section "
                 f"can land in another part unnoticed; train.py refuses such a split. List patient IDs (B22-111)")]


def identical_images_across_parts(shared: dict[str, list[str]], parts: Parts) -> list[Finding]:
    """Byte-identical files (splits.shared_content) whose copies sit in different parts."""
    pairs: dict[tuple, list[str]] = defaultdict(list)
    for paths in shared.values():
        owners = {(patient_id(PurePosixPath(p).parent.name), parts.of_path(p)) for p in paths}
        if len({part for _, part in owners} - {None}) > 1:
            pairs[tuple(sorted(owners, key=str))].extend(paths)
    if not pairs:
        return []
    lines = [" + ".join(f"{p} ({part or 'no part'})" for p, part in owners) + f": {len(set(paths))} files"
             for owners, paths in pairs.items()]
    return [leak("identical_images_across_parts", [p for o in pairs for p, _ in o],
                 f"byte-identical images in different parts: {examples(lines)}; keep such patients together "
                 f"(the default split does)", files={p for ps in pairs.values() for p in ps})]


def windows_across_parts(samples: list[common.Sample], parts: Parts) -> list[Finding]:
    """One slide window (patient + window number) whose files land in different parts: its `_AugK` re-crops
    (aug_copy_across_parts) or its Annotated and Cropped copies (window_across_parts). Works on the joined
    samples, part decided by each file's folder, so a split by folder or a mislabelled Pat_ID makes it fire."""
    groups: dict[tuple, list[common.Sample]] = defaultdict(list)
    for s in samples:
        if s.source != "holdout":
            groups[(s.patient, s.window)].append(s)
    found: dict[str, list] = {"aug_copy_across_parts": [], "window_across_parts": []}
    for (patient, window), group in sorted(groups.items()):
        where = {parts.of_path(s.path) for s in group}
        if len(where - {None}) > 1:  # a file in no part is unused, not leaked
            check = "aug_copy_across_parts" if any(s.aug is not None for s in group) else "window_across_parts"
            found[check].append((patient, window, sorted(map(str, where)), [s.path for s in group]))
    out = []
    for check, items in found.items():
        if items:
            lines = [f"{p} window {w} in {'/'.join(where)}" for p, w, where, _ in items]
            out.append(leak(check, [p for p, *_ in items], f"{len(items)} window(s) split across parts: "
                            f"{examples(lines)}", files={f for *_, fs in items for f in fs}))
    return out


def holdout_in_crossvalidation(data: common.HelicoData) -> list[Finding]:
    both = sorted(set(data.holdout_patients) & set(data.cv_patients))
    if not both:
        return []
    return [leak("holdout_in_crossvalidation", both, f"{len(both)} HoldOut patient(s) also in CrossValidation: "
                 f"{examples(both)}; the HoldOut is no longer independent")]


def reference_not_in_train(reference: str | None, parts: Parts) -> list[Finding]:
    if not reference:
        return []
    folder = PurePosixPath(Path(reference).as_posix()).parent.name
    part = parts.of_folder(folder)
    if part not in ("val", "test"):
        return []
    return [leak("reference_not_in_train", [patient_id(folder)], f"stain reference {reference} belongs to "
                 f"{patient_id(folder)}, a {part} patient: the normalizer would be fitted on {part} data; keep it "
                 f"in train (the default split does) or pick another --reference-patch", files=[reference])]


def split_refused(problems: list[str], findings: list[Finding]) -> list[Finding]:
    """Safety net: whatever makes train.py refuse the split is a leak here too, even if no check above caught it."""
    if not problems or any(f.kind == "leak" for f in findings):
        return []
    return [leak("split_refused", [], "train.py would refuse this split: " + "; ".join(problems))]


# ----------------------------------------------------------------------------------------------- warning checks
def multi_section_patients(data: common.HelicoData) -> list[Finding]:
    folders: dict[str, set] = defaultdict(set)
    for tree in ("annotated", "cropped"):
        for p, names in data.folders[tree].items():
            folders[p].update(names)
    multi = {p: sorted(n) for p, n in sorted(folders.items()) if len(n) > 1}
    if not multi:
        return []
    return [warning("multi_section_patients", multi, f"{len(multi)} patient(s) with several section folders: "
                    f"{examples(p + ' (' + ' + '.join(n) + ')' for p, n in multi.items())}; they are one patient and "
                    f"must stay in one part")]


def label_conflicts(data: common.HelicoData) -> list[Finding]:
    rows = [a for a in data.annotations if a.presence == 1 and data.diagnosis.get(a.patient) == "NEGATIVA"]
    if not rows:
        return []
    windows: dict[str, set] = defaultdict(set)
    for a in rows:
        windows[a.patient].add(a.window)
    lines = [f"{p} (window {', '.join(map(str, sorted(w)))})" for p, w in sorted(windows.items())]
    return [warning("label_conflicts", windows, f"{len(windows)} NEGATIVA patient(s) with a window annotated "
                    f"Presence 1 ({len(rows)} rows incl. Aug copies): {examples(lines)}; label noise, kept as "
                    f"annotated")]


def presence_zero_rows(data: common.HelicoData) -> list[Finding]:
    rows = [a for a in data.annotations if a.presence == 0]
    if not rows:
        return []
    per = Counter(a.patient for a in rows)
    return [warning("presence_zero_rows", per, f"{len(rows)} row(s) with Presence 0 (uncertain), excluded from "
                    f"training and metrics: {examples(f'{p} ({n})' for p, n in sorted(per.items()))}; rows "
                    f"{examples(a.row for a in rows)}")]


def rows_without_files(data: common.HelicoData) -> list[Finding]:
    rows = data.rows_without_file
    if not rows:
        return []
    return [warning("rows_without_files", [a.patient for a in rows], f"{len(rows)} workbook row(s) without an "
                    f"image, ignored: {examples(f'row {a.row} {a.patient} window {a.window}' + (f'_Aug{a.aug}' if a.aug else '') for a in rows)}")]


def files_without_rows(data: common.HelicoData) -> list[Finding]:
    files = data.files_without_row
    if not files:
        return []
    return [warning("files_without_rows", [patient_id(PurePosixPath(f).parent.name) for f in files],
                    f"{len(files)} Annotated image(s) without a workbook row, unused: {examples(files)}", files)]


def stray_entries(data: common.HelicoData) -> list[Finding]:
    if not data.stray:
        return []
    return [warning("stray_entries", [], f"{len(data.stray)} entr(y/ies) that are not patient folders or patch "
                    f"PNGs, skipped: {examples(data.stray)}", data.stray)]


def duplicate_rows(data: common.HelicoData) -> list[Finding]:
    keys: dict[tuple, list[common.Annotation]] = defaultdict(list)
    for a in data.annotations:
        keys[(a.patient, a.window, a.aug)].append(a)
    dups = {k: rows for k, rows in keys.items() if len(rows) > 1}
    if not dups:
        return []
    lines = []
    for (p, w, aug), rows in sorted(dups.items(), key=lambda kv: kv[1][0].row):
        presences = sorted({a.presence for a in rows})
        lines.append(f"{p} window {w}{f'_Aug{aug}' if aug else ''} rows {'/'.join(str(a.row) for a in rows)}"
                     + (f" (Presence {'/'.join(map(str, presences))}: the first row is used)" if len(presences) > 1 else ""))
    return [warning("duplicate_rows", [k[0] for k in dups], f"{len(dups)} (patient, window) key(s) on several "
                    f"workbook rows: {examples(lines)}")]


def metadata_cells(path: Path):
    """(cell, patient of that row or None, text) for every non-empty cell of an xlsx (all sheets) or a CSV."""
    def rows_of(table):
        header = [str(h).strip().lower() if h is not None else "" for h in (table[0] if table else [])]
        col = next((header.index(c) for c in ("pat_id", "codi") if c in header), None)
        for r, row in enumerate(table, start=1):
            patient = str(row[col]).strip() if col is not None and r > 1 and col < len(row) and row[col] else None
            yield r, row, patient
    if path.suffix.lower() == ".xlsx":
        import openpyxl
        from openpyxl.utils import get_column_letter
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            for ws in wb.worksheets:
                yield f"{path.name}: sheet name", None, ws.title
                for r, row, patient in rows_of(list(ws.iter_rows(values_only=True))):
                    for c, v in enumerate(row, start=1):
                        if v is not None:
                            yield f"{path.name}!{ws.title}!{get_column_letter(c)}{r}", patient, str(v)
        finally:
            wb.close()
    else:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
        dialect = csv.Sniffer().sniff(text.splitlines()[0] if text.strip() else ",", delimiters=",;\t")
        for r, row, patient in rows_of([tuple(x) for x in csv.reader(text.splitlines(), dialect)]):
            for c, v in enumerate(row, start=1):
                if v:
                    yield f"{path.name} row {r} column {c}", patient, v


def control_or_external_mentions(data: common.HelicoData, paths) -> list[Finding]:
    """The original pipeline's control-section trace: 'control' / 'external' in any path, workbook or CSV cell."""
    hits_paths = sorted(p for p in paths if MENTION.search(p))
    hits_cells = [(where, patient, text) for f in (data.annotations_file, data.diagnosis_file) if f
                  for where, patient, text in metadata_cells(f) if MENTION.search(text)]
    if not hits_paths and not hits_cells:
        return []
    patients = [patient_id(PurePosixPath(p).parts[-2]) if len(PurePosixPath(p).parts) > 1 else p for p in hits_paths]
    patients += [p for _, p, _ in hits_cells if p]
    lines = [f"{where} = {text!r}" + (f" ({p})" if p else "") for where, p, text in hits_cells] + hits_paths
    return [warning("control_or_external_mentions", patients, f"{len(lines)} mention(s) of control/external "
                    f"material: {examples(lines)}; check these are not control sections mixed into the patients",
                    hits_paths)]


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the PNG signature and IHDR chunk (first 24 bytes); None if not a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def png_sizes(root: Path, paths, workers: int = 16, progress: bool = True) -> dict[str, tuple | None]:
    from tqdm import tqdm
    paths = sorted(paths)
    with ThreadPoolExecutor(workers) as pool:  # file opens release the GIL: latency-bound, so threads overlap it
        sizes = list(tqdm(pool.map(lambda p: png_size(root / p), paths), total=len(paths), desc="PNG headers",
                          unit="file", disable=not progress or not paths, mininterval=1))
    return dict(zip(paths, sizes))


def off_size_images(sizes: dict, expected: int) -> list[Finding]:
    off = {p: s for p, s in sizes.items() if s is not None and tuple(s) != (expected, expected)}
    bad = sorted(p for p, s in sizes.items() if s is None)
    out = []
    if off:
        per_size = Counter(f"{w}x{h}" for w, h in off.values())
        out.append(warning("off_size_images", [patient_id(PurePosixPath(p).parent.name) for p in off],
                           f"{len(off)} image(s) not {expected}x{expected} (resized when loaded): "
                           f"{examples(f'{s} ({n})' for s, n in per_size.most_common())}; {examples(off)}", off))
    if bad:
        out.append(warning("unreadable_png_headers", [patient_id(PurePosixPath(p).parent.name) for p in bad],
                           f"{len(bad)} file(s) named .png without a PNG header (truncated or another format): "
                           f"{examples(bad)}", bad))
    return out


def duplicate_content_groups(groups: list[list[str]], parts: Parts, holdout_patients) -> list[Finding]:
    if not groups:
        return []
    holdout = set(holdout_patients)
    where = lambda p: parts.of_patient(p) or (HOLDOUT if p in holdout else "no part")
    lines = [" + ".join(f"{p} ({where(p)})" for p in g) for g in groups]
    return [warning("duplicate_content_groups", [p for g in groups for p in g], f"{len(groups)} group(s) of "
                    f"patients sharing byte-identical images: {examples(lines)}; one slide under two IDs? they "
                    f"must stay in one part")]


def reference_patch_missing(root: Path, reference: str | None) -> list[Finding]:
    if not reference:
        return []
    path = Path(reference) if Path(reference).is_absolute() else root / reference
    if path.is_file():
        return []
    return [warning("reference_patch_missing", [patient_id(Path(reference).parent.name)], f"stain reference "
                    f"{reference} not found under {root}: Macenko normalization cannot use it; pass "
                    f"--reference-patch")]


def patients_outside_split(split: dict, data: common.HelicoData) -> list[Finding]:
    listed = {p for ps in split_patients(split).values() for p in ps}
    outside = sorted(set(data.cv_patients) - listed)
    if not outside:
        return []
    return [warning("patients_outside_split", outside, f"{len(outside)} CrossValidation patient(s) in no part of "
                    f"the split, unused: {examples(outside)}")]


def patients_without_diagnosis(data: common.HelicoData) -> list[Finding]:
    missing = sorted((set(data.cv_patients) | set(data.holdout_patients)) - set(data.diagnosis))
    if not missing:
        return []
    return [warning("patients_without_diagnosis", missing, f"{len(missing)} patient(s) with images but no "
                    f"{common.DIAGNOSIS_NAME} row: their Cropped patches get no label: {examples(missing)}")]


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


def composition(data: common.HelicoData, split: dict, parts: Parts) -> dict:
    by_part: dict[str, list] = defaultdict(list)
    for s in data.labelled:
        by_part[parts.of_path(s.path)].append(s)
    uncertain = Counter(parts.of_patient(a.patient) for a in data.uncertain)
    out = {part: part_composition(by_part[part], ps, data, uncertain[part]) for part, ps in split_patients(split).items()}
    out[HOLDOUT] = {"patients": len(data.holdout_patients), "patches": len(data.holdout),
                    "diagnosis": dict(Counter(data.diagnosis.get(p, "unknown") for p in data.holdout_patients))}
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


def image_paths(data: common.HelicoData) -> set[str]:
    """Every patch PNG load_data found, Presence 0 windows included (they are not samples but are files)."""
    paths = {s.path for s in data.all_samples()} | set(data.files_without_row)
    for a in data.uncertain + data.duplicate_rows:
        for folder in data.folders["annotated"].get(a.patient, []):
            rel = f"{TREES['annotated']}/{folder}/{common.annotated_file_name(a.window, a.aug)}"
            if (data.root / rel).is_file():
                paths.add(rel)
    return paths


def run_checks(data, split, groups, shared, sizes, args) -> list[Finding]:
    parts = Parts(split)
    found = [*patient_in_several_parts(split), *split_lists_folder_names(split),
             *identical_images_across_parts(shared, parts),
             *windows_across_parts(data.labelled + data.cropped, parts),
             *holdout_in_crossvalidation(data), *reference_not_in_train(args.reference_patch, parts)]
    found += split_refused(splits.split_problems(split, data, groups, args.reference_patch), found)
    found += [*multi_section_patients(data), *label_conflicts(data), *presence_zero_rows(data),
              *rows_without_files(data), *files_without_rows(data), *stray_entries(data), *duplicate_rows(data),
              *control_or_external_mentions(data, set(sizes) | set(data.stray)),
              *off_size_images(sizes, args.expected_size),
              *duplicate_content_groups(groups, parts, data.holdout_patients),
              *reference_patch_missing(data.root, args.reference_patch),
              *patients_outside_split(split, data), *patients_without_diagnosis(data)]
    return found


def audit(args) -> Audit:
    if not args.data_root:
        raise DataError("--data-root: not given (pass the HelicoDataSet folder or set $HELICO_DATA)")
    data = common.load_data(args.data_root)
    progress = not args.no_progress
    split, groups = splits.resolve_split(args, data, progress=progress)
    missing = missing_patients(split, data)
    if missing:
        raise DataError(f"--split {args.split}: data root {data.root} lacks patient(s) of the split: "
                        f"{examples(missing)}")
    cache = Path(args.hash_cache) if args.hash_cache else splits.default_hash_cache(data.root)
    shared = splits.shared_content(data, cache=cache, progress=False)  # cache hits only: resolve_split just hashed
    sizes = png_sizes(data.root, image_paths(data), progress=progress)
    return Audit(data, split, run_checks(data, split, groups, shared, sizes, args), composition(data, split, Parts(split)),
                 split_source=f"file {args.split}" if args.split else "made from the flags")


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
    return lines


def render_report(a: Audit) -> str:
    d, s = a.data, a.split
    lines = [f"Leakage audit of {d.root}",
             f"  {len(d.cv_patients)} CrossValidation patients, {len(d.holdout_patients)} HoldOut patients, "
             f"{len(d.annotations):,} workbook rows ({d.annotations_file.name}), {len(d.diagnosis)} diagnoses",
             f"  split: {a.split_source}; " + ", ".join(f"{p} {len(ps)} patients" for p, ps in split_patients(s).items())
             + (f"; seed {s.get('seed')}, " + (f"fold {s.get('fold')} of {s.get('folds')}" if s.get("folds")
                                                else f"val-frac {s.get('val_frac')}") if "seed" in s else ""),
             "", "Composition (windows counted once; +Aug = re-crops training adds; easy = Cropped of NEGATIVA)",
             *composition_table(a.composition)]
    for part in ("val", "test"):
        acc = a.composition.get(part, {}).get("dummy_accuracy")
        if acc is not None:
            lines.append(f"  ACCURACY TRAP: always answering 'negative' scores {percent(acc)} on {part} without "
                         f"looking at an image; judge models by recall, precision and PR-AUC, not accuracy.")
    for kind, title in (("leak", "LEAKS"), ("warning", "Warnings")):
        items = [f for f in a.findings if f.kind == kind]
        lines += ["", f"{title} ({len(items)})" if items else f"{title}: none"]
        lines += [f"  {'LEAK' if kind == 'leak' else 'warn'} [{f.check}] {f.detail}" for f in items]
    verdict = (f"VERDICT: {len(a.leaks)} LEAK(S): do not train on this split (exit 1)" if a.leaks
               else "VERDICT: no leak found (exit 0)")
    return "\n".join(lines + ["", verdict])


def to_json(a: Audit) -> dict:
    s = a.split
    summary = {"source": a.split_source, "patients": split_patients(s),
               **{k: s.get(k) for k in ("seed", "val_frac", "folds", "fold", "kept_in_train", "duplicate_groups")}}
    return {"ok": not a.leaks, "findings": [asdict(f) for f in a.findings], "composition": a.composition,
            "split": summary}


# ----------------------------------------------------------------------------------------------- main
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Audit a patient-level split of the HelicoDataSet for leaks before "
                                "training. Exit 0: no leak; 1: leak found; 2: bad input.",
                                parents=[splits.split_args_parser()])
    p.add_argument("--json", metavar="OUT", help="also write the findings and composition as JSON (for CI or "
                   "to archive next to a run); written atomically")
    p.add_argument("--expected-size", type=int, default=256, help="patch side in pixels the dataset should have "
                   "(256 for the real data; the demo's --patch-size if you changed it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs of batch jobs)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        result = audit(args)
        if args.json:
            try:
                common.atomic_write_text(args.json, json.dumps(to_json(result), indent=2) + "\n")
            except OSError as e:
                raise DataError(f"--json {args.json}: cannot write ({e.strerror or e})") from None
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return common.EXIT_BAD_INPUT
    print(render_report(result))
    return common.EXIT_LEAK if result.leaks else common.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
