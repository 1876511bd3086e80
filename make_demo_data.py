"""Write a miniature HelicoDataSet of synthetic IHC patches in the real on-disk format.

    python make_demo_data.py demo_data --seed 0     # 36 CV + 6 HoldOut patients, ~1,600 PNGs, ~140 MB, ~15-30 s
    python make_demo_data.py /tmp/tiny --patients 8 --holdout-patients 2 --patch-size 64 --force   # ~2 s

Layout (the real dataset's); nothing else is written (no manifest):
    OUT_DIR/CrossValidation/Annotated/<Pat_ID>_<0|1>/00902.png, 00902_Aug1.png ... 00902_Aug8.png
    OUT_DIR/CrossValidation/Cropped/<Pat_ID>_<0|1>/388.png, 1163.png ...   and   OUT_DIR/HoldOut/<Pat_ID>_<0|1>/
    OUT_DIR/HP_WSI-CoordAllAnnotatedPatches.xlsx (Sheet1) and OUT_DIR/PatientDiagnosis.csv (CODI,DENSITAT)

What this demo exercises (each is a trap of the real dataset):
- CV patients of all three diagnoses (default 36: 15 NEGATIVA, 10 BAIXA, 11 ALTA, so that a 20% test part holds
  several infected patients), each with a Cropped folder of 22-30 patches, most with an Annotated folder; HoldOut patients (default 6, mixed) not in CrossValidation;
  2 patients in PatientDiagnosis.csv without any image (the real CSV also lists more patients than have images).
- Annotated: hard negatives (Presence -1) for every patient; infected patients' positive windows (Presence 1)
  each with 8 `_AugK` re-crops (rows "902_Aug3": shifted / rotated / flipped near-copies, i, j = original +
  shift). Window_ID mixes int and str. Cropped window numbers never reuse an Annotated one of the same patient.
- Cropped and HoldOut patches of infected patients carry bacteria at a diagnosis rate (ALTA 30%, BAIXA 8%, at
  least one per patient; NEGATIVA 0%), so a patient diagnosis from patch scores is meaningful.
- B22-47: CrossValidation/Annotated/B22-47_0/01653.png, the stain reference patch (tissue-rich, with DAB rods:
  Macenko needs both stains in its reference; annotated Presence 1).
- B22-111: one patient in two sections, B22-111_0 + B22-111_1 (both trees); _1 Cropped is RGBA; one _1 row says
  Section_ID 0. B22-10's only folders are B22-10_1 but its rows say Section_ID 0: join on patient + window.
- Prefix traps: B22-11 vs B22-111, B22-10 vs B22-100 (parse IDs, never startswith); IDs 1-9 padded (B22-03).
- Exactly one Aug group (B22-10: 8 rows + 8 files) without an original row or file; two Presence 0 rows
  (B22-11, one faint rod each); label noise: B22-03 is NEGATIVA with one Presence 1 window (+ 8 Aug copies).
- One row without a file (B22-100) and one Annotated PNG without a row (B22-11).
- RGBA PNGs (B22-111_1 Cropped + ~3% of Annotated), one greyscale PNG (B22-100 Cropped) and one off-size patch
  (B22-100 Annotated, 206 wide x 256 high, its row w=206), all valid.
- Stray Thumbs.db in CrossValidation/Cropped/ and in CrossValidation/Cropped/B22-10_1/.
- B22-201_0 (Cropped) is a byte-for-byte copy of B22-200_0, both NEGATIVA: a split by ID alone leaks.

Pixels: pale background (~235,232,228) under Beer-Lambert optical density of hematoxylin (stroma texture, gland
lumens, darker nuclei), with a per-patient stain (H and DAB vectors tilted, intensity scaled 0.75-1.3) so stain
normalization matters. Positives: 1-6 brown DAB rods (10-18 x 3-4 px at 256 px, slightly curved, ~30% of patches
faint) in pale mucus, still visible at 96 px. Negatives carry no rods; against an "any brown pixel" shortcut,
~15% of hard negatives and ~3% of other negatives carry one round, diffuse brown artefact as dark as a faint rod.
Deterministic: a seed gives the same bytes (seeded numpy Generators, own fixed PNG encoder, fixed workbook
timestamps). The tree is built in a temporary folder beside OUT_DIR and renamed into place when complete.

Exit codes: 0 ok; 2 bad input (bad flag value, OUT_DIR not empty without --force, --force on a folder that
make_demo_data.py did not write, OUT_DIR not writable).
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from collections import Counter, namedtuple
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openpyxl
from PIL import Image, ImageDraw, ImageFilter

import common

WORKBOOK = "HP_WSI-CoordAllAnnotatedPatches.xlsx"
DIAGNOSIS_CSV = "PatientDiagnosis.csv"
CREATOR = "make_demo_data.py"         # workbook author: how --force recognizes a folder it may replace
FIXED_TIME = datetime.datetime(2023, 1, 1)  # workbook timestamps, so equal seeds give equal bytes

BACKGROUND = np.array([235.0, 232.0, 228.0])    # glass + mounting medium, pale and slightly warm
HEMATOXYLIN = np.array([0.65, 0.70, 0.29])      # Ruifrok & Johnston optical-density vector (blue-purple)
DAB = np.array([0.27, 0.57, 0.78])              # brown: absorbs blue most
BACTERIA_RATE = {"NEGATIVA": 0.0, "BAIXA": 0.08, "ALTA": 0.30}   # share of Cropped/HoldOut patches with rods
DIAGNOSIS_SHARE = {"NEGATIVA": 10 / 24, "BAIXA": 7 / 24, "ALTA": 7 / 24}
AUG_SHIFT = 24                        # max re-crop shift in px at 256 (the real Aug rows move i, j by <= ~30)
STAIN_REFERENCE_WINDOW = 1653         # CrossValidation/Annotated/B22-47_0/01653.png
OFF_SIZE_WIDTH = 206                  # the real workbook has one 256x206 window

SPECIAL_PATIENTS = {  # number -> (diagnosis, traps): present whatever --patients is, so every trap always is
    3: ("NEGATIVA", {"label_noise"}), 47: ("BAIXA", {"stain_reference"}),
    10: ("ALTA", {"section_mismatch", "aug_without_original", "thumbs_db"}),
    100: ("NEGATIVA", {"off_size", "grey_cropped", "row_without_file"}),
    11: ("BAIXA", {"presence_0", "file_without_row"}), 111: ("ALTA", {"two_sections", "rgba_cropped"}),
    200: ("NEGATIVA", {"duplicate_source"}), 201: ("NEGATIVA", {"duplicate_copy"})}
CSV_ONLY_PATIENTS = 2
ID_POOL = 315  # patient numbers B22-1 ... B22-315


class DemoError(Exception):
    """Bad input: one-line message; main() prints it and exits 2."""


@dataclass
class Patient:
    number: int
    diagnosis: str
    traps: set = field(default_factory=set)
    annotated: bool = True

    @property
    def pid(self) -> str:
        return f"B22-{self.number:02d}"   # the real IDs pad 1-9 to two digits: B22-03

    @property
    def folders(self) -> tuple:           # section suffixes of this patient's folders on disk
        return (0, 1) if "two_sections" in self.traps else (1,) if "section_mismatch" in self.traps else (0,)


Stain = namedtuple("Stain", "hematoxylin dab background")   # OD vectors (scaled) and background RGB, float32


# ----------------------------------------------------------------------------------------------- pixels
def patient_stain(rng) -> Stain:
    """Per-patient stain: vectors tilted a little, intensity scaled (0.75-1.3), background tint +-3."""
    def tilt(v, sd):
        w = np.clip(v + rng.normal(0, sd, 3), 0.05, None)
        return w / np.linalg.norm(w)
    scale = rng.uniform(0.75, 1.3)
    f32 = lambda v: np.asarray(v, np.float32)   # float32 end to end: half the memory traffic of float64
    return Stain(f32(tilt(HEMATOXYLIN, 0.05) * scale), f32(tilt(DAB, 0.03) * rng.uniform(0.85, 1.15)),
                 f32(BACKGROUND + rng.uniform(-3, 3, 3)))


def smooth_noise(rng, size: int, cell: float) -> np.ndarray:
    """Unit Gaussian noise with blobs about `cell` px wide: a coarse grid upsampled bicubically."""
    cell = max(2, int(round(cell)))
    n = size // cell + 3
    coarse = Image.fromarray(rng.standard_normal((n, n)).astype(np.float32))
    fine = np.asarray(coarse.resize((n * cell, n * cell), Image.BICUBIC))
    return fine[cell:cell + size, cell:cell + size]   # skip the border cell, where bicubic is clamped


def nuclei(rng, tissue: np.ndarray, scale: float) -> np.ndarray:
    """Dark elliptical blobs, about one per 30x30 px of tissue, as hematoxylin concentration."""
    size = tissue.shape[0]
    n = rng.poisson(tissue.mean() * (size / (30 * scale)) ** 2)
    xy = rng.uniform(0, size - 1, (n, 2))
    radii = rng.uniform(2.5, 5.5, (n, 2)) * scale
    darkness = rng.uniform(0.55, 1.0, n)
    keep = rng.random(n) < tissue[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    img = Image.new("L", (size, size))
    draw = ImageDraw.Draw(img)
    for (x, y), (rx, ry), d in zip(xy[keep], radii[keep], darkness[keep]):
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=int(255 * d))
    img = img.filter(ImageFilter.GaussianBlur(0.8 * scale))
    return np.asarray(img, np.float32) * (1.0 / 255)


def hematoxylin_map(rng, size: int, scale: float, tissue_bias: float) -> np.ndarray:
    """Hematoxylin concentration: tissue mask (higher bias = more tissue) with gland lumens, texture, nuclei."""
    field_ = smooth_noise(rng, size, 64 * scale) + 0.5 * smooth_noise(rng, size, 24 * scale)
    tissue = 1 / (1 + np.exp(-4 * (field_ + tissue_bias)))                               # soft tissue mask
    tissue /= 1 + np.exp(6 * (smooth_noise(rng, size, 20 * scale) - 1.3))    # times 1 - sigmoid: gland lumens
    stroma = tissue * np.clip(0.17 + 0.07 * smooth_noise(rng, size, 5 * scale), 0.03, None)
    return stroma + 0.9 * nuclei(rng, tissue, scale)


def rods(rng, hema: np.ndarray, n: int, lo: float, hi: float, scale: float, faint: bool) -> np.ndarray:
    """DAB concentration of n slightly curved rods (10-18 px long, 3-4 px wide at 256 px), centers in [lo, hi).
    H. pylori lives in the mucus over the epithelium: each rod sits on one of the palest of 48 random points."""
    candidates = rng.uniform(lo, hi, (48, 2))
    pale = np.argsort(hema[candidates[:, 1].astype(int), candidates[:, 0].astype(int)], kind="stable")[:12]
    img = Image.new("L", hema.shape[::-1])
    draw = ImageDraw.Draw(img)
    for cx, cy in candidates[rng.choice(pale, size=n, replace=False)]:
        half = rng.uniform(5, 9) * scale
        width = max(2, int(round(rng.uniform(3, 4.4) * scale)))
        a = rng.uniform(0, np.pi)
        dx, dy = np.cos(a) * half, np.sin(a) * half
        bend = rng.uniform(-0.35, 0.35) * half                       # perpendicular offset of the midpoint
        mid = (cx - np.sin(a) * bend, cy + np.cos(a) * bend)
        draw.line([(cx - dx, cy - dy), mid, (cx + dx, cy + dy)], fill=int(rng.integers(215, 256)),
                  width=width, joint="curve")
    img = img.filter(ImageFilter.GaussianBlur(0.5 * scale))
    strength = rng.uniform(0.4, 0.55) if faint else rng.uniform(0.75, 1.2)
    return np.asarray(img, np.float32) * (strength / 255)


def artefact(rng, size: int, scale: float) -> np.ndarray:
    """A faint, diffuse, round brown blob (debris / non-specific DAB): brown but not a rod."""
    img = Image.new("L", (size, size))
    x, y = rng.uniform(0.15 * size, 0.85 * size, 2)
    r = rng.uniform(4, 8) * scale
    ImageDraw.Draw(img).ellipse([x - r, y - r, x + r, y + r], fill=255)
    img = img.filter(ImageFilter.GaussianBlur(2.0 * scale))
    return np.asarray(img, np.float32) * (rng.uniform(0.35, 0.7) / 255)   # peak overlaps faint rods


def render(rng, stain: Stain, size: int, scale: float, *, n_rods: int = 0, faint: bool = False,
           with_artefact: bool = False, tissue_bias: float | None = None, safe_margin: float = 0) -> np.ndarray:
    """One RGB patch (size x size, uint8). Rod centers stay `safe_margin` px inside every border."""
    if tissue_bias is None:
        tissue_bias = rng.uniform(-0.4, 1.2)
    hema = hematoxylin_map(rng, size, scale, tissue_bias)
    od = hema[..., None] * stain.hematoxylin
    if n_rods:
        edge = safe_margin + 10 * scale
        od += rods(rng, hema, n_rods, edge, size - edge, scale, faint)[..., None] * stain.dab
    if with_artefact:
        od += artefact(rng, size, scale)[..., None] * stain.dab
    rgb = stain.background * np.exp(-od)                                # Beer-Lambert
    rgb += rng.integers(-2, 3, od.shape, dtype=np.int8)               # sensor noise, sd 1.4 (cheaper than normal)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)                 # +0.5 then truncate = round


AUG_TRANSFORMS = (lambda a: a, np.fliplr, np.flipud, np.rot90, lambda a: np.rot90(a, 2),
                  lambda a: np.rot90(a, 3), lambda a: np.swapaxes(a, 0, 1))


def aug_copies(rng, canvas: np.ndarray, size: int, margin: int):
    """The 8 `_AugK` re-crops: the window shifted by up to `margin` px, then maybe rotated or flipped."""
    for k in range(1, 9):
        di, dj = (int(v) for v in rng.integers(-margin, margin + 1, 2))
        crop = canvas[margin + di:margin + di + size, margin + dj:margin + dj + size]
        yield k, di, dj, np.ascontiguousarray(AUG_TRANSFORMS[int(rng.integers(len(AUG_TRANSFORMS)))](crop))


def png_bytes(pixels: np.ndarray) -> bytes:
    """A plain PNG (8-bit grey, RGB or RGBA): "Up" filter + zlib RLE. Pillow's adaptive per-row filter search
    costs ~4x more than the compression itself; this gives files as small, at a quarter of the time."""
    h, w = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.reshape(h, w * channels)
    filtered = np.empty((h, w * channels + 1), np.uint8)
    filtered[:, 0] = 2                           # filter type 2 = Up: each byte minus the one above, mod 256
    filtered[0, 1:] = rows[0]
    filtered[1:, 1:] = rows[1:] - rows[:-1]
    packer = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = packer.compress(filtered.tobytes()) + packer.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, {1: 0, 3: 2, 4: 6}[channels], 0, 0, 0)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def save_png(path: Path, rgb: np.ndarray, mode: str = "RGB") -> None:
    if mode == "RGBA":
        rgb = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])   # opaque alpha, as the real RGBA files
    elif mode == "L":
        rgb = np.asarray(Image.fromarray(rgb).convert("L"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(rgb))


# ----------------------------------------------------------------------------------------------- patients
def extra_diagnoses(rng, n_cv: int) -> list:
    """Diagnoses of the non-special CV patients, so that all n_cv patients come close to 10:7:7."""
    have = Counter(d for d, _ in SPECIAL_PATIENTS.values())
    want = {d: int(round(n_cv * share)) for d, share in DIAGNOSIS_SHARE.items()}
    want["ALTA"] = n_cv - want["NEGATIVA"] - want["BAIXA"]
    extra = [d for d in DIAGNOSIS_SHARE for _ in range(max(0, want[d] - have[d]))]
    n_extra = n_cv - len(SPECIAL_PATIENTS)
    extra = (extra + list(DIAGNOSIS_SHARE) * n_extra)[:n_extra]   # pad / trim when specials over-fill a class
    return [extra[k] for k in rng.permutation(n_extra)]


def plan_patients(seed: int, n_cv: int, n_holdout: int):
    """CV patients (specials + random others), HoldOut patients and CSV-only patients, disjoint IDs."""
    rng = np.random.default_rng([seed, 0])
    cv = [Patient(n, d, set(t), annotated="duplicate_copy" not in t) for n, (d, t) in SPECIAL_PATIENTS.items()]
    pool = [n for n in range(1, ID_POOL + 1) if n not in SPECIAL_PATIENTS]
    numbers = [int(n) for n in rng.choice(pool, n_cv - len(cv) + n_holdout + CSV_ONLY_PATIENTS, replace=False)]
    for number, dx in zip(numbers, extra_diagnoses(rng, n_cv)):
        cv.append(Patient(number, dx, annotated=bool(rng.random() >= 0.15)))
    rest = numbers[n_cv - len(SPECIAL_PATIENTS):]
    holdout = [Patient(n, list(DIAGNOSIS_SHARE)[k % 3]) for k, n in enumerate(rest[:n_holdout])]
    csv_only = [Patient(n, list(DIAGNOSIS_SHARE)[int(rng.integers(3))]) for n in rest[n_holdout:]]
    by_number = lambda ps: sorted(ps, key=lambda p: p.number)
    return by_number(cv), by_number(holdout), by_number(csv_only)


def window_numbers(rng, count: int, exclude=()) -> list:
    pool = np.setdiff1d(np.arange(1, 5000), np.asarray(list(exclude), dtype=int))
    return [int(v) for v in rng.choice(pool, size=count, replace=False)]


# ----------------------------------------------------------------------------------------------- folders
def write_annotated(root: Path, p: Patient, rng, stain: Stain, size: int, tally: Counter):
    """Annotated windows of one patient -> (original rows, Aug rows, window numbers used)."""
    scale, margin = size / 256, int(round(AUG_SHIFT * size / 256))
    n_pos = {"NEGATIVA": 0, "BAIXA": int(rng.integers(1, 3)), "ALTA": int(rng.integers(2, 4))}[p.diagnosis]
    n_pos += "label_noise" in p.traps
    n_hard, n_unsure = int(rng.integers(3, 6)), 2 * ("presence_0" in p.traps)
    n_odd = len(p.traps & {"row_without_file", "file_without_row"})
    used = window_numbers(rng, n_hard + n_pos + n_unsure + n_odd, exclude=[STAIN_REFERENCE_WINDOW])
    if "stain_reference" in p.traps:
        used[0] = STAIN_REFERENCE_WINDOW
    numbers = iter(used)
    take = lambda n: [next(numbers) for _ in range(n)]
    hard, unsure, pos = take(n_hard), take(n_unsure), take(n_pos)
    rows, aug_rows, slot = [], [], iter(range(10 ** 6))
    mismatch_pending = "two_sections" in p.traps   # one _1 row of B22-111 will say Section_ID 0

    def place():  # next window's folder: multi-section patients alternate between their folders
        folder = p.folders[next(slot) % len(p.folders)]
        return folder, root / f"{p.pid}_{folder}"

    def row(out, window_id, folder, presence, i=None, j=None, width=size):
        nonlocal mismatch_pending
        section = 0 if "section_mismatch" in p.traps else folder
        if mismatch_pending and folder == 1:
            section, mismatch_pending = 0, False
        if i is None:
            i, j = (int(v) for v in rng.integers(2000, 48000, 2))   # slide coordinates
        out.append((p.pid, section, window_id, i, j, size, width, presence))

    for k, n in enumerate(hard):
        folder, d = place()
        ref = n == STAIN_REFERENCE_WINDOW
        # Macenko must see both stains in its reference, so the reference window is a tissue-rich positive
        img = render(rng, stain, size, scale, tissue_bias=0.8 if ref else None, n_rods=6 if ref else 0,
                     with_artefact=not ref and rng.random() < 0.15)
        width = int(round(OFF_SIZE_WIDTH * scale)) if ("off_size" in p.traps and k == 0) else size
        save_png(d / f"{n:05d}.png", img[:, :width], "RGBA" if not ref and rng.random() < 0.03 else "RGB")
        row(rows, n, folder, 1 if ref else -1, width=width)
        tally["positive windows" if ref else "hard negatives"] += 1
    for n in unsure:
        folder, d = place()
        save_png(d / f"{n:05d}.png", render(rng, stain, size, scale, n_rods=1, faint=True))
        row(rows, n, folder, 0)
        tally["uncertain (Presence 0)"] += 1
    for k, n in enumerate(pos):
        folder, d = place()
        canvas = render(rng, stain, size + 2 * margin, scale, n_rods=int(rng.integers(1, 7)),
                        faint=rng.random() < 0.3, safe_margin=2 * margin + 2 * scale)
        i, j = (int(v) for v in rng.integers(2000, 48000, 2))
        if not ("aug_without_original" in p.traps and k == 0):
            save_png(d / f"{n:05d}.png", canvas[margin:margin + size, margin:margin + size])
            row(rows, n, folder, 1, i, j)
            tally["positive windows"] += 1
        for aug, di, dj, crop in aug_copies(rng, canvas, size, margin):
            save_png(d / f"{n:05d}_Aug{aug}.png", crop, "RGBA" if rng.random() < 0.03 else "RGB")
            row(aug_rows, f"{n}_Aug{aug}", folder, 1, i + di, j + dj)
            tally["positive Aug copies"] += 1
    if "row_without_file" in p.traps:                  # annotated, but its PNG is missing
        row(rows, next(numbers), place()[0], -1)
    if "file_without_row" in p.traps:                  # a PNG that no row mentions
        save_png(place()[1] / f"{next(numbers):05d}.png", render(rng, stain, size, scale))
    return rows, aug_rows, set(used)


def write_patches(root: Path, p: Patient, rng, stain: Stain, size: int, windows: list, tally: Counter, kind: str):
    """Unlabelled Cropped / HoldOut patches, unpadded names; bacteria at the patient's diagnosis rate."""
    scale, rate = size / 256, BACTERIA_RATE[p.diagnosis]
    n_with = 0 if rate == 0 else max(1, int(round(rate * len(windows))))
    with_bacteria = set(int(k) for k in rng.choice(len(windows), n_with, replace=False))
    for k, n in enumerate(windows):
        folder = p.folders[k % len(p.folders)]
        if k in with_bacteria:
            img = render(rng, stain, size, scale, n_rods=int(rng.integers(1, 7)), faint=rng.random() < 0.3)
        else:
            img = render(rng, stain, size, scale, with_artefact=rng.random() < 0.03)
        mode = "RGBA" if ("rgba_cropped" in p.traps and folder == 1) else "RGB"
        mode = "L" if ("grey_cropped" in p.traps and k == 0) else mode
        save_png(root / f"{p.pid}_{folder}" / f"{n}.png", img, mode)
        tally[f"{kind} with bacteria" if k in with_bacteria else f"{kind} without bacteria"] += 1


THUMBS_DB = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)   # OLE2 header, as Windows Explorer writes it


def write_cross_validation(root: Path, patients: list, seed: int, size: int, tally: Counter) -> list:
    """Annotated + Cropped folders of every CV patient; returns the workbook rows (originals, then Aug rows)."""
    annotated, cropped = root / "CrossValidation" / "Annotated", root / "CrossValidation" / "Cropped"
    rows, aug_rows = [], []
    for p in patients:
        rng = np.random.default_rng([seed, 1, p.number])
        stain = patient_stain(rng)
        used = set()
        if p.annotated:
            r, a, used = write_annotated(annotated, p, rng, stain, size, tally)
            rows += r
            aug_rows += a
        if "duplicate_copy" in p.traps:
            continue   # copied below, once its source exists
        windows = window_numbers(rng, int(rng.integers(22, 31)), exclude=used)
        write_patches(cropped, p, rng, stain, size, windows, tally, "Cropped")
    source = next(p for p in patients if "duplicate_source" in p.traps)
    for p in patients:
        if "duplicate_copy" in p.traps:
            shutil.copytree(cropped / f"{source.pid}_0", cropped / f"{p.pid}_0")
            tally["Cropped without bacteria"] += len(list((cropped / f"{p.pid}_0").iterdir()))
        if "thumbs_db" in p.traps:
            (cropped / f"{p.pid}_{p.folders[0]}" / "Thumbs.db").write_bytes(THUMBS_DB)
    (cropped / "Thumbs.db").write_bytes(THUMBS_DB)
    order = np.random.default_rng([seed, 3]).permutation(len(rows))   # the real sheet is not sorted by patient
    return [rows[k] for k in order] + aug_rows


def write_holdout(root: Path, patients: list, seed: int, size: int, tally: Counter) -> None:
    (root / "HoldOut").mkdir(parents=True, exist_ok=True)
    for p in patients:
        rng = np.random.default_rng([seed, 2, p.number])
        stain, windows = patient_stain(rng), window_numbers(rng, int(rng.integers(22, 31)))
        write_patches(root / "HoldOut", p, rng, stain, size, windows, tally, "HoldOut")


# ----------------------------------------------------------------------------------------------- metadata
def workbook_bytes(rows: list) -> bytes:
    """The annotation workbook, with fixed timestamps (openpyxl stamps 'now' into it and into the zip)."""
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    for r in [("Pat_ID", "Section_ID", "Window_ID", "i", "j", "h", "w", "Presence")] + rows:
        ws.append(list(r))
    wb.properties.creator = CREATOR
    wb.properties.created = FIXED_TIME
    raw, out = io.BytesIO(), io.BytesIO()
    wb.save(raw)
    stamp = FIXED_TIME.strftime("%Y-%m-%dT%H:%M:%SZ").encode()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:modified[^>]*>)[^<]*", rb"\g<1>" + stamp, data)
            fixed = zipfile.ZipInfo(info.filename, date_time=FIXED_TIME.timetuple()[:6])
            fixed.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(fixed, data)
    return out.getvalue()


def write_diagnosis_csv(path: Path, patients: list) -> None:
    lines = [f"{p.pid},{p.diagnosis}\n" for p in sorted(patients, key=lambda p: p.number)]
    path.write_text("CODI,DENSITAT\n" + "".join(lines), newline="")   # as the real file: "\n", sorted by number


def build(root: Path, seed: int, n_cv: int, n_holdout: int, size: int) -> Counter:
    cv, holdout, csv_only = plan_patients(seed, n_cv, n_holdout)
    tally = Counter([f"patients CV {p.diagnosis}" for p in cv] + [f"patients HoldOut {p.diagnosis}" for p in holdout])
    tally["patients in CSV only"] = len(csv_only)
    rows = write_cross_validation(root, cv, seed, size, tally)
    write_holdout(root, holdout, seed, size, tally)
    (root / WORKBOOK).write_bytes(workbook_bytes(rows))
    write_diagnosis_csv(root / DIAGNOSIS_CSV, cv + holdout + csv_only)
    return tally


# ----------------------------------------------------------------------------------------------- output
def check_out_dir(out: Path, force: bool) -> None:
    """Refuse to touch anything but a missing folder, an empty one, or (with --force) an earlier demo."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"OUT_DIR {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise DemoError(f"OUT_DIR {out} is not empty; pass --force to replace an earlier demo dataset")
    try:
        wb = openpyxl.load_workbook(out / WORKBOOK, read_only=True)
        ours = wb.properties.creator == CREATOR
        wb.close()
    except Exception:  # missing or unreadable workbook: not ours
        ours = False
    if not ours:
        raise DemoError(f"--force: {out} was not written by make_demo_data.py (its {WORKBOOK} is missing or "
                        f"by another author); refusing to delete it, remove it yourself")


def move_into_place(tmp: Path, out: Path) -> None:
    """Swap the finished tree in; an earlier demo is moved aside first and deleted only afterwards."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    if out.exists():
        os.replace(out, old / "tree")
    os.replace(tmp, out)
    shutil.rmtree(old)


def summary(out: Path, tally: Counter, seconds: float) -> str:
    pngs = [f for f in out.rglob("*") if f.suffix == ".png"]
    mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    lines = [f"wrote {out}: {len(pngs)} PNGs, {mb:.1f} MB in {seconds:.1f} s"]
    for sub in ("CrossValidation/Annotated", "CrossValidation/Cropped", "HoldOut"):
        n_png = sum(1 for f in pngs if f.parent.parent == out / sub)
        lines.append(f"  {sub:27s} {sum(d.is_dir() for d in (out / sub).iterdir()):3d} folders {n_png:5d} PNGs")
    return "\n".join(lines + [f"  {k:27s} {v:5d}" for k, v in sorted(tally.items())])


def get_args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter, allow_abbrev=False)
    ap.add_argument("out_dir", metavar="OUT_DIR", help="folder to create; must be missing or empty unless --force")
    ap.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical dataset")
    ap.add_argument("--patients", type=int, default=36,
                    help=f"CrossValidation patients (minimum {len(SPECIAL_PATIENTS)}: the trap "
                         "patients); use the minimum for fast tests")
    ap.add_argument("--holdout-patients", type=int, default=6, help="HoldOut patients, disjoint from CV")
    ap.add_argument("--patch-size", type=int, default=256,
                    help="side in px of the PNG files written (256 as the real data; 64 makes tests ~15x faster, "
                         "rods then 1-2 px wide); not --image-size, the model input train.py resizes them to")
    ap.add_argument("--force", action="store_true",
                    help="replace OUT_DIR if it holds an earlier demo dataset (never any other folder)")
    return ap


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out_dir).absolute()
    limits = {"--patients": (args.patients, len(SPECIAL_PATIENTS), 200),   # minimum: every trap patient
              "--holdout-patients": (args.holdout_patients, 0, 150),  # with --patients, at most the ID pool:
              "--patch-size": (args.patch_size, 64, 1024),                      # bacteria vanish below 64 px
              "--seed": (args.seed, 0, 2 ** 63)}
    start = time.perf_counter()
    try:
        for flag, (value, lo, hi) in limits.items():
            if not lo <= value <= hi:
                raise DemoError(f"{flag} must be between {lo} and {hi}, got {value}")
        if args.patients + args.holdout_patients + CSV_ONLY_PATIENTS > ID_POOL:  # B22-1 ... B22-315, disjoint
            raise DemoError(f"--patients {args.patients} + --holdout-patients {args.holdout_patients} must be at most "
                            f"{ID_POOL - CSV_ONLY_PATIENTS}")
        check_out_dir(out, args.force)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700): the renamed tree gets what mkdir would give
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write beside OUT_DIR {out}: {e}", file=sys.stderr)
        return 2
    try:
        tally = build(tmp, args.seed, args.patients, args.holdout_patients, args.patch_size)
        move_into_place(tmp, out)
    except OSError as e:  # a full disk mid-build: exit 5 naming it, not a traceback
        return common.unexpected_fault(e)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(summary(out, tally, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
