"""The HelicoDataSet as the code sees it: what a patient, a workbook row, a sample and a decoded patch are.

Owns patient IDs, the workbook/CSV reader, data-root discovery and the row-to-file join, sample selection and
PatchDataset. Splits live in splits.py, the packed cache in packed_cache.py; errors and exit codes in the top-level
common.py.

    from helico import helicodata
    data = helicodata.load_data("HelicoDataSet")        # discover + join workbook rows to files
    train = helicodata.select(data.labelled, ["B22-47", "B22-111"], include_aug=True)
    ds = helicodata.PatchDataset(data.root, train, image_size=256)

Every bad input raises common.DataError with a one-line message naming the file, row or flag.
"""
from __future__ import annotations

import csv
import functools

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from common import DataError

ANNOTATION_NAMES = ("HP_WSI-CoordAllAnnotatedPatches", "HP_WSI-CoordAnnotatedAllPatches",
                    "HP_WSI-CoordAnnotatedPatches")  # the names other copies of the dataset use; .xlsx or .csv
DIAGNOSIS_NAME = "PatientDiagnosis.csv"
DIAGNOSES = ("NEGATIVA", "BAIXA", "ALTA")  # BAIXA (low density) and ALTA (high) both mean infected
DEFAULT_REFERENCE = "CrossValidation/Annotated/B22-47_0/01653.png"  # the original pipeline's stain reference
MAX_REFERENCE_PATCHES = 64  # a reference fitted from more pooled patches would need chunking (~60 bytes per pixel)


# ----------------------------------------------------------------------------------------------- names
_FOLDER = re.compile(r"^(?P<patient>.+?)_(?P<section>\d+)$")
_PATCH = re.compile(r"^(?P<window>\d+)(?:_Aug(?P<aug>\d+))?\.png$", re.IGNORECASE)
_WINDOW_ID = re.compile(r"^(?P<window>\d+)(?:_Aug(?P<aug>\d+))?$", re.IGNORECASE)


def patient_id(folder_name: str) -> str:
    """`B22-111_0` and `B22-111_1` -> `B22-111`: strip the section suffix. Exact parsing, never a prefix match."""
    name = Path(str(folder_name).strip()).name
    m = _FOLDER.match(name)
    return m.group("patient") if m else name


@functools.lru_cache(maxsize=4096)  # a few hundred folders, asked once per sample (~220k): 1 s at start-up before
def folder_section(folder_name: str) -> int | None:
    m = _FOLDER.match(Path(folder_name).name)
    return int(m.group("section")) if m else None


@functools.lru_cache(maxsize=1 << 16)  # the same window names recur in every folder; each is parsed twice per scan
def parse_patch_name(file_name: str) -> tuple[int, int | None] | None:
    """`00902_Aug3.png` -> (902, 3); `388.png` -> (388, None); anything else -> None."""
    m = _PATCH.match(file_name)
    if not m:
        return None
    return int(m.group("window")), (int(m.group("aug")) if m.group("aug") else None)


# ----------------------------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class Annotation:
    patient: str
    section: int | None
    window: int
    aug: int | None      # K of `_AugK`, None for an original window
    presence: int        # 1 present, -1 absent, 0 uncertain
    row: int             # 1-based row in the sheet (header = row 1), for error messages


def find_metadata(root: Path, names: tuple[str, ...], suffixes: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in suffixes:
            if (root / (name + suffix)).is_file():
                return root / (name + suffix)
    return None


def read_sheets(path: Path, first_only: bool = True) -> list[tuple[str, list[tuple]]]:
    """(sheet name, rows of cell values) of an xlsx (Sheet1, else its first sheet; every sheet unless first_only), or
    [("", rows)] of a CSV split on whichever of `,` `;` tab its first line uses most (exports use , or ;). The one
    reader of tables: the workbook, PatientDiagnosis.csv and the audit's cell scan all go through it."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() != ".xlsx":
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        delimiter = max(",;\t", key=lambda d: lines[0].count(d)) if lines else ","
        return [("", [tuple(r) for r in csv.reader(lines, delimiter=delimiter)])]
    import openpyxl  # only needed here
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises several types for a corrupt file
        raise DataError(f"{path}: not a readable xlsx workbook ({type(e).__name__}: {e})") from None
    sheets = [wb["Sheet1"] if "Sheet1" in wb.sheetnames else wb.worksheets[0]] if first_only else wb.worksheets
    tables = [(ws.title, list(ws.iter_rows(values_only=True))) for ws in sheets]
    wb.close()
    return tables


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, tuple]]]:
    """Header and (row number, values) of the first sheet of an xlsx or of a CSV."""
    rows = read_sheets(path)[0][1]
    if not rows:
        raise DataError(f"{path}: empty file, expected a header row")
    header = [str(h).strip() if h is not None else "" for h in rows[0]]
    body = [(n, r) for n, r in enumerate(rows[1:], start=2)
            if any(v is not None and str(v).strip() != "" for v in r)]
    return header, body


def _int_or_none(value) -> int | None:
    """902, 902.0 and "902" -> 902; anything else -> None."""
    try:
        f = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else None


def read_annotations(path) -> list[Annotation]:
    """Rows of the annotation workbook (xlsx via openpyxl read-only, or a CSV export); a data root also works."""
    path = Path(path)
    if path.is_dir():
        found = find_metadata(path, ANNOTATION_NAMES, (".xlsx", ".csv"))
        if found is None:
            raise DataError(f"{path}: no annotation workbook (looked for {', '.join(ANNOTATION_NAMES)} .xlsx/.csv)")
        path = found
    header, body = _read_table(path)
    col = {h.lower(): k for k, h in enumerate(header)}
    for needed in ("Pat_ID", "Section_ID", "Window_ID", "Presence"):
        if needed.lower() not in col:
            raise DataError(f"{path}: missing column {needed!r} (header is {header})")
    out = []
    for n, r in body:
        cell = {name: (r[k] if k < len(r) else None) for name, k in col.items()}
        patient = str(cell["pat_id"] or "").strip()
        if not patient:
            raise DataError(f"{path}: row {n}: empty Pat_ID")
        window = cell["window_id"]
        m = _WINDOW_ID.match(str(_int_or_none(window)) if isinstance(window, float) else str(window).strip())
        if not m:
            raise DataError(f"{path}: row {n}: unparsable Window_ID {window!r} (expected 902 or '902_Aug1')")
        presence = _int_or_none(cell["presence"])
        if presence not in (-1, 0, 1):
            raise DataError(f"{path}: row {n}: unknown Presence value {cell['presence']!r} (expected 1, -1 or 0)")
        out.append(Annotation(patient=patient, section=_int_or_none(cell["section_id"]), window=int(m.group("window")),
                              aug=int(m.group("aug")) if m.group("aug") else None, presence=presence, row=n))
    return out


def read_diagnosis(path) -> dict[str, str]:
    """PatientDiagnosis.csv -> {patient: NEGATIVA | BAIXA | ALTA}."""
    path = Path(path)
    if path.is_dir():
        path = path / DIAGNOSIS_NAME
    header, body = _read_table(path)
    col = {h.upper(): k for k, h in enumerate(header)}
    if "CODI" not in col or "DENSITAT" not in col:
        raise DataError(f"{path}: expected columns CODI,DENSITAT (header is {header})")
    out: dict[str, str] = {}
    for n, r in body:
        patient, dx = (str(r[col[k]]).strip() if col[k] < len(r) else "" for k in ("CODI", "DENSITAT"))
        dx = dx.upper()
        if dx not in DIAGNOSES:
            raise DataError(f"{path}: row {n}: unknown DENSITAT {dx!r} for {patient} (expected {'/'.join(DIAGNOSES)})")
        if out.get(patient, dx) != dx:
            raise DataError(f"{path}: row {n}: {patient} listed twice with different diagnoses")
        out[patient] = dx
    return out


# ----------------------------------------------------------------------------------------------- stain reference
def add_reference_argument(parser, purpose: str) -> None:
    """--reference-patch, as every command spells it (train.py and the audit through splits.py, patch_cache.py,
    bench.py): one PNG or more, or folders of them; `purpose` ends its help."""
    parser.add_argument("--reference-patch", nargs="+", default=[DEFAULT_REFERENCE], metavar="PNG_OR_FOLDER",
                        help="stain reference: one PNG, several, or folders of them (their pixels pooled: tiles of "
                        "several slides give a steadier DAB vector than one patch's few rods), relative to the data "
                        f"root or absolute; {purpose}")


def reference_list(reference) -> list[str]:
    """--reference-patch as given -> a list of entries (files or folders): a string (older checkpoints' config,
    library callers), a list (the flag takes several), or None (no reference)."""
    if not reference:
        return []
    return [str(reference)] if isinstance(reference, (str, Path)) else [str(r) for r in reference]


def reference_files(root, reference) -> list[Path]:
    """The PNGs a stain reference is fitted from: each entry relative to the data root unless absolute; a folder
    gives its own PNGs (sorted, not recursive). DataError naming the entry when one is missing or an empty folder,
    or when there are more than MAX_REFERENCE_PATCHES."""
    files = []
    for entry in reference_list(reference):
        path = Path(entry) if Path(entry).is_absolute() else Path(root) / entry
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
            if not found:
                raise DataError(f"--reference-patch {path}: folder holds no .png (give stain reference tiles)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"--reference-patch {path}: file not found (Macenko needs a stain reference tile: pass "
                            f"one under the data root or an absolute path, or train with --no-macenko)")
    if len(files) > MAX_REFERENCE_PATCHES:
        raise DataError(f"--reference-patch: {len(files)} PNGs, at most {MAX_REFERENCE_PATCHES} (a few dozen "
                        f"tissue-rich tiles with DAB fix the stain vectors; more only costs memory)")
    return files


def reference_patients(reference) -> list[str]:
    """The patients a stain reference is taken from, by name alone (no disk read): a file's folder, or a folder's
    own name (`<Pat_ID>_<section>`). Splits keep them in train; tiles copied into a folder of another name are
    not traced."""
    paths = [PurePosixPath(Path(e).as_posix()) for e in reference_list(reference)]
    return sorted({patient_id(p.parent.name if p.suffix.lower() == ".png" else p.name) for p in paths})


# ----------------------------------------------------------------------------------------------- discovery
@dataclass(frozen=True, slots=True)  # slots: ~220k of them are held at once (no per-instance dict: ~40 MB less)
class Sample:
    path: str            # relative to the data root, POSIX separators
    patient: str
    source: str          # annotated | supplemental | holdout
    label: int           # 1 positive, 0 negative, -1 unknown (Cropped of infected patients, HoldOut)
    window: int          # for an `_AugK` copy: the base window it was re-cropped from
    aug: int | None = None
    diagnosis: str | None = None

    @property
    def section(self) -> int | None:
        """The section suffix of the file's folder (B22-111_1 -> 1): two sections may reuse a window number."""
        return folder_section(self.path.rsplit("/", 2)[-2])


@dataclass
class HelicoData:
    root: Path
    annotations: list[Annotation]
    diagnosis: dict[str, str]
    folders: dict[str, dict[str, list[str]]]          # tree -> patient -> folder names
    labelled: list[Sample] = field(default_factory=list)       # the original workflow's sample set
    cropped: list[Sample] = field(default_factory=list)        # every Cropped patch (patient-level diagnosis)
    holdout: list[Sample] = field(default_factory=list)
    rows_without_file: list[Annotation] = field(default_factory=list)
    files_without_row: list[str] = field(default_factory=list)
    uncertain: list[Annotation] = field(default_factory=list)  # Presence 0: excluded, counted
    uncertain_files: list[str] = field(default_factory=list)    # their images: not samples, but files to audit
    uncertain_cropped: list[str] = field(default_factory=list)  # Cropped copies of Presence 0 windows: excluded too
    stray: list[str] = field(default_factory=list)              # non-PNG / non-folder entries skipped
    # of the stray entries, what a user must act on: images not read (a JPG, a PNG not named <window>.png) in patient
    # folders, and folders not named <Pat_ID>_<section> -> the image files inside (missing from that patient)
    unread_images: list[str] = field(default_factory=list)
    unparsed_folders: dict[str, int] = field(default_factory=dict)
    empty_folders: list[str] = field(default_factory=list)      # patient folders holding no patch PNG nor image
    duplicate_rows: list[Annotation] = field(default_factory=list)
    annotations_file: Path | None = None
    diagnosis_file: Path | None = None
    # path -> (size, mtime_ns) of every patch PNG, from the one stat pass of the scan: the hash and decode caches and
    # the packed cache's index key on it, so no later step stats a file again (a round trip on a shared file system)
    file_stats: dict[str, tuple[int, int]] = field(default_factory=dict)
    # what later steps work out from this scan once per process (splits.identical_files), by their own keys
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def cv_patients(self) -> list[str]:
        return sorted(set(self.folders["annotated"]) | set(self.folders["cropped"]))

    @property
    def holdout_patients(self) -> list[str]:
        return sorted(self.folders["holdout"])

    def all_samples(self) -> list[Sample]:
        return self.labelled + self.cropped + self.holdout

    def image_paths(self) -> list[str]:
        """Every patch PNG found: samples, Presence 0 windows and Annotated files without a row."""
        return sorted({s.path for s in self.all_samples()} | set(self.files_without_row) | set(self.uncertain_files))


TREES = {"annotated": "CrossValidation/Annotated", "cropped": "CrossValidation/Cropped", "holdout": "HoldOut"}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")  # what a user may take for a patch


def _scan_tree(root: Path, tree: str, data: HelicoData) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Patient -> folder names, and folder -> PNG names, of one tree; other entries go to data.stray (images not read,
    folders not parsed and empty patient folders also to their own lists), each PNG's (size, mtime_ns) to
    data.file_stats."""
    stray, stats = data.stray, data.file_stats
    base = root / TREES[tree]
    patients: dict[str, list[str]] = {}
    files: dict[str, list[str]] = {}
    if not base.is_dir():
        return patients, files
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        rel = f"{TREES[tree]}/{entry.name}"
        if not entry.is_dir() or folder_section(entry.name) is None:
            stray.append(rel)  # Thumbs.db, .DS_Store, oddly named folders: skipped but reported
            if entry.is_dir():
                with os.scandir(entry.path) as listing:
                    data.unparsed_folders[rel] = sum(Path(f.name).suffix.lower() in IMAGE_SUFFIXES for f in listing)
            continue
        patients.setdefault(patient_id(entry.name), []).append(entry.name)
        fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)  # stats relative to it: no path walk per file
        try:
            with os.scandir(fd) as listing:
                found = sorted((f.name, f.is_file()) for f in listing)
            names = [name for name, is_file in found if is_file and parse_patch_name(name)]
            stray += [f"{rel}/{name}" for name, is_file in found if not (is_file and parse_patch_name(name))]
            unread = [f"{rel}/{name}" for name, is_file in found
                      if is_file and not parse_patch_name(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES]
            data.unread_images += unread
            if not names and not unread:
                data.empty_folders.append(rel)
            for name in names:
                st = os.stat(name, dir_fd=fd)  # the process's one stat of this file
                stats[f"{rel}/{name}"] = (st.st_size, st.st_mtime_ns)
        finally:
            os.close(fd)
        files[entry.name] = names
    return patients, files


def load_data(root) -> HelicoData:
    """Discover a HelicoDataSet root, read its metadata and join workbook rows to files."""
    root = Path(root)
    for tree in ("annotated", "cropped"):
        if not (root / TREES[tree]).is_dir():
            raise DataError(f"{root}: missing folder {TREES[tree]} (is --data-root the HelicoDataSet folder?)")
    ann_file = find_metadata(root, ANNOTATION_NAMES, (".xlsx", ".csv"))
    if ann_file is None:
        raise DataError(f"{root}: no annotation workbook (looked for {', '.join(ANNOTATION_NAMES)} .xlsx/.csv)")
    if not (root / DIAGNOSIS_NAME).is_file():
        raise DataError(f"{root}: missing {DIAGNOSIS_NAME}")
    data = HelicoData(root=root, annotations=read_annotations(ann_file), diagnosis=read_diagnosis(root / DIAGNOSIS_NAME),
                      folders={}, annotations_file=ann_file, diagnosis_file=root / DIAGNOSIS_NAME)
    listing = {}
    for tree in TREES:
        data.folders[tree], listing[tree] = _scan_tree(root, tree, data)
    _join_annotated(data, listing["annotated"])
    # A Cropped patch that is an annotated window (same patient, section and number) is that window again: a labelled
    # one is already a sample, an uncertain (Presence 0) one must not come back as an easy negative.
    window_of = lambda path: (patient_id(path.rsplit("/", 2)[-2]), folder_section(path.rsplit("/", 2)[-2]),
                              parse_patch_name(path.rsplit("/", 1)[-1])[0])
    annotated_windows = {window_of(s.path) for s in data.labelled if s.source == "annotated"}
    uncertain_windows = {window_of(p) for p in data.uncertain_files}
    for tree, source in (("cropped", "supplemental"), ("holdout", "holdout")):
        for folder, names in listing[tree].items():
            p, section = patient_id(folder), folder_section(folder)
            dx = data.diagnosis.get(p)
            label = 0 if (dx == "NEGATIVA" and tree == "cropped") else -1
            made = [Sample(f"{TREES[tree]}/{folder}/{name}", p, source, label, *parse_patch_name(name), dx)
                    for name in names]  # (window, aug)
            (data.cropped if tree == "cropped" else data.holdout).extend(made)
            for s in made if label == 0 else ():
                if (p, section, s.window) in uncertain_windows:
                    data.uncertain_cropped.append(s.path)
                elif (p, section, s.window) not in annotated_windows:  # else already a hard negative
                    data.labelled.append(s)
    return data


def _join_annotated(data: HelicoData, listing: dict[str, list[str]]) -> None:
    """Join rows to Annotated files on (patient, window, aug), whatever the row's Section_ID says (the real one does
    not always match the folder), unless several section folders of the patient hold that number: then the
    Section_ID picks the file, and a file no row picks is listed in files_without_row, never dropped."""
    files: dict[tuple, dict] = {}  # (patient, window, aug) -> {section: path}
    for folder, names in listing.items():
        for name in names:
            key = (patient_id(folder), *parse_patch_name(name))
            files.setdefault(key, {})[folder_section(folder)] = f"{TREES['annotated']}/{folder}/{name}"
    rows: dict[tuple, list[Annotation]] = {}
    for a in data.annotations:
        rows.setdefault((a.patient, a.window, a.aug), []).append(a)
    used = set()
    for key, same in rows.items():
        found = files.get(key, {})
        if len(found) <= 1:
            _join_rows(data, same, next(iter(found.values()), None), used)
            continue
        by_section: dict = {}
        for a in same:
            by_section.setdefault(a.section, []).append(a)
        for section, group in by_section.items():
            _join_rows(data, group, found.get(section), used)
    data.files_without_row = sorted(path for found in files.values() for path in found.values() if path not in used)


def _join_rows(data: HelicoData, same: list[Annotation], path: str | None, used: set) -> None:
    """The rows of one file: the first is the window, the rest are duplicates; conflicting Presence = uncertain."""
    a = same[0]
    data.duplicate_rows += same[1:]
    if path is None:
        data.rows_without_file.append(a)
        return
    used.add(path)
    if any(r.presence != a.presence for r in same):  # the real B22-151 has -1 and 0 rows for one window
        a = Annotation(**{**a.__dict__, "presence": 0})  # conflicting reviews: as uncertain as a 0
    if a.presence == 0:
        data.uncertain.append(a)
        data.uncertain_files.append(path)
        return
    data.labelled.append(Sample(path, a.patient, "annotated", 1 if a.presence == 1 else 0, a.window, a.aug,
                                data.diagnosis.get(a.patient)))


def one_per_window(samples: list[Sample]) -> list[Sample]:
    """Drop `_AugK` copies: each annotated window counted once (its original, else its lowest-K copy)."""
    rank = lambda s: -1 if s.aug is None else s.aug  # the original first, then Aug1, Aug2, ...
    key = lambda s: (s.patient, s.source, s.section, s.window)  # the section too: it may reuse a window number
    best: dict[tuple, Sample] = {}
    for s in samples:
        if key(s) not in best or rank(s) < rank(best[key(s)]):
            best[key(s)] = s
    return [s for s in samples if best[key(s)] is s]


def select(samples: list[Sample], patients, include_aug: bool = False) -> list[Sample]:
    """The samples of `patients`; Aug copies only when asked (training), so metrics count each window once."""
    keep = set(patients)
    chosen = [s for s in samples if s.patient in keep]
    return chosen if include_aug else one_per_window(chosen)


# ----------------------------------------------------------------------------------------------- dataset
BAD = -100  # label of a patch that could not be decoded (only with skip_bad)


class PatchDataset:
    """uint8 (3, H, W) tensors (RGBA/grey -> RGB, off-size -> resized), label and sample index.

    Workers only decode: stain normalization, jitter and ImageNet normalization run batched on the device."""

    def __init__(self, root, samples: list[Sample], image_size: int | None = 256, skip_bad: bool = False):
        self.root, self.samples, self.image_size, self.skip_bad = Path(root), list(samples), image_size, skip_bad

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx: int):
        import torch
        from PIL import Image
        path = self.root / self.samples[idx].path
        try:
            with Image.open(path) as im:
                # convert drops alpha (RGBA patches are opaque) and expands grey/palette; on RGB it would only copy
                im = im if im.mode == "RGB" else im.convert("RGB")
                if self.image_size and im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError) as e:
            if not self.skip_bad:
                raise DataError(f"{path}: unreadable image ({e}); pass --skip-bad-images to skip and list it") from None
            size = self.image_size or 256
            return torch.zeros(3, size, size, dtype=torch.uint8), BAD, idx
        # one transposing copy to (3, H, W): a DataLoader worker spends ~20% of a decode on extra copies otherwise
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), self.samples[idx].label, idx


def drop_bad(images, labels, indices):
    """Remove undecodable patches from a collated batch; returns the rest and the dropped indices."""
    bad = labels == BAD
    return images[~bad], labels[~bad], indices[~bad], indices[bad].tolist()
