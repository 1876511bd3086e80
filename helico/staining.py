"""The stain reference and what is measured against it: the --reference-patch flag and the files it names, the
normalizer fitted to them, the record that pins them in a cache or checkpoint (the stain fingerprint), whether two
normalizer states normalize alike, and the DAB-hue survey of the slides. The batched math is macenko_gpu.py's.

    normalizer = staining.fit_stain_reference(data.root, ["CrossValidation/Annotated/B22-47_0/01653.png"])
    survey = staining.dab_hue_survey(data.root, samples, normalizer)   # slides whose DAB lies far from it

Importing it costs no torch: the audit reads the reference's patients from here.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import common
from common import DataError

DEFAULT_REFERENCE = "CrossValidation/Annotated/B22-47_0/01653.png"  # the original pipeline's stain reference
MAX_REFERENCE_PATCHES = 64  # a reference fitted from more pooled patches would need chunking (~60 bytes per pixel)


# ---------------------------------------------------------------------------------------------- the reference
def add_reference_argument(parser, purpose: str) -> None:
    """--reference-patch, as every command spells it (train.py, the audit, patch_cache.py, stain.py, the tools): one PNG or more, or folders of them; `purpose` ends its help."""
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
    return sorted({common.patient_id(p.parent.name if p.suffix.lower() == ".png" else p.name) for p in paths})


def fit_stain_reference(root, reference):
    """The Macenko normalizer (on the CPU) fitted to --reference-patch: one PNG, several, or folders of them
    (reference_files), their pixels pooled."""
    import macenko_gpu  # torch: only where a normalizer is made
    files = reference_files(root, reference)
    if not files:
        raise DataError("--reference-patch: none given (Macenko needs a stain reference tile, or --no-macenko)")
    try:
        return macenko_gpu.MacenkoNormalizer().fit([macenko_gpu.load_rgb(f) for f in files])
    except ValueError as e:
        where = files[0] if len(files) == 1 else f"{len(files)} PNGs ({files[0].parent}, ...)"
        raise DataError(f"--reference-patch {where}: {e}") from None


# -------------------------------------------------------------------------------------------- the fingerprint
def stain_from_meta(meta: dict):
    """The stored MacenkoNormalizer state with tensors again (weights_only-safe for a checkpoint), or None."""
    import torch
    if not meta.get("normalized"):
        return None
    state = dict(meta["stain"]["state"])
    for k in ("stain_matrix", "max_concentrations"):
        state[k] = torch.tensor(state[k], dtype=torch.float32)
    return state


def fitted_record(root: Path, reference, device):
    """(normalizer on `device`, the record a cache's meta.json keeps of it); the record pins the reference files' bytes (one
    file: its sha256, as caches built before several files were allowed; several: a digest of theirs in order)."""
    normalizer = fit_stain_reference(root, reference)
    digests = [common.file_sha256(f) for f in reference_files(root, reference)]
    digest = digests[0] if len(digests) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest()
    state = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in normalizer.state_dict().items()}
    record = {"reference": " ".join(reference_list(reference)), "sha256": digest, "state": state}
    return normalizer.to(device), record


def stain_key(stain: dict) -> list:
    """What two fitted_record()s must share for one cache to serve both: reference file and normalizer settings; not the fitted tensors, whose last bits differ across devices."""
    fitted = ("stain_matrix", "max_concentrations")
    return [stain["reference"], stain["sha256"], {k: v for k, v in stain["state"].items() if k not in fitted}]


def same_stain(a: dict | None, b: dict | None) -> bool:
    """Whether two MacenkoNormalizer states normalize alike: equal settings, and reference stain vectors and maxima
    equal up to float noise (a reference fitted on another device differs in the last bits)."""
    import torch
    import macenko_gpu
    if a is None or b is None:
        return a is None and b is None
    try:  # states saved before the stain modes existed, in today's form (they normalize as they did)
        a, b = (macenko_gpu.MacenkoNormalizer.from_state_dict(s).state_dict() for s in (a, b))
    except ValueError:
        return False
    for k in a:
        if torch.is_tensor(a[k]) or torch.is_tensor(b[k]):
            x, y = (torch.as_tensor(v, dtype=torch.float64) for v in (a[k], b[k]))
            if x.shape != y.shape or not torch.allclose(x, y, rtol=1e-4, atol=1e-6):
                return False
        elif a[k] != b[k]:
            return False
    return True


# ----------------------------------------------------------------------------------------- the DAB-hue survey
SURVEY_PATCHES = 8  # per slide: ~0.5 M pixels pooled, enough for a DAB direction where a slide shows rods
# Between the true hue's reading and that of DAB turned 5 degrees on synthetic slides (tools/stain_check.py).
DAB_HUE_WARN_DEG = 4.0


def readable(path):
    """The image, or None for an undecodable one: the survey leaves it out, training names it (or stops at it)."""
    import macenko_gpu
    try:
        return macenko_gpu.load_rgb(path)
    except (ValueError, OSError):
        return None


def dab_hue_survey(root, samples, normalizer, per_slide: int = SURVEY_PATCHES, memo: Path | None = None) -> dict:
    """How far each slide's DAB hue lies from the reference's (macenko_gpu.MacenkoNormalizer.dab_angles), from up
    to per_slide patches per slide folder spread over its sorted paths (no labels read). The ihc mode keeps the
    reference's DAB vector, so a far slide's DAB amount changes. {"threshold_deg", "patches_per_slide",
    "angles": {slide: degrees or None (too little DAB to measure)}, "far": [slides above the threshold]}.

    `memo` (a JSON file) keeps the last survey, keyed by the patches read (path, size, mtime) and the normalizer's
    state: a new run on unchanged files reads it instead of decoding a few patches of every slide. A missing, unreadable or stale memo is surveyed again and rewritten."""
    by_slide: dict[str, list[str]] = {}
    for s in samples:
        by_slide.setdefault(s.path.rsplit("/", 2)[-2], []).append(s.path)
    picks = {}  # slide -> per_slide paths spread evenly over its sorted paths
    for slide in sorted(by_slide):
        paths = sorted(set(by_slide[slide]))
        step = max(1.0, len(paths) / per_slide)
        picks[slide] = [paths[int(k * step)] for k in range(min(per_slide, len(paths)))]
    key = _survey_key(root, picks, normalizer, per_slide) if memo is not None else None
    return common.remembered(memo, key, "survey", lambda: _surveyed(root, picks, normalizer, per_slide),
                      lambda survey: isinstance(survey["angles"], dict))


def survey_run(where: Path, root, samples, stain_state: dict, device, memo: Path | None) -> None:
    """A training run's survey, once: `where` (stain_survey.json) and one warning line naming the slides whose DAB
    hue lies far from the reference's; nothing when `where` already exists."""
    import sys
    import macenko_gpu
    if where.is_file():
        return
    normalizer = macenko_gpu.MacenkoNormalizer.from_state_dict(stain_state).to(device)
    survey = dab_hue_survey(root, samples, normalizer, memo=memo)
    common.atomic_write_text(where, json.dumps(survey, indent=1) + "\n")
    if survey["far"]:
        unmeasured = sum(a is None for a in survey["angles"].values())
        print(far_warning(survey, "slides", "normalization keeps the reference's DAB vector, so their DAB amount "
                          "changes; consider --reference-patch with tiles of several slides "
                          f"({unmeasured} slides show too little DAB to measure; {where})"), file=sys.stderr)


def far_warning(survey: dict, slides: str, advice: str) -> str:
    """The one warning line naming the surveyed slides whose DAB hue lies far from the reference's."""
    far, angles = survey["far"], survey["angles"]
    return (f"warning: stain: {len(far)} of {len(angles)} {slides} have a DAB hue more than "
            f"{survey['threshold_deg']:g} degrees from the reference's ("
            + ", ".join(f"{s} {angles[s]:.1f}" for s in far[:10]) + f"{', ...' if len(far) > 10 else ''}): {advice}")


def _surveyed(root, picks: dict, normalizer, per_slide: int) -> dict:
    """dab_hue_survey's survey of `picks` (slide -> paths), decoded here."""
    slides, angles = list(picks), {}
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes with the GIL released
        for lo in range(0, len(slides), 16):  # 16 slides decoded at a time: memory stays ~25 MB at 256 px
            chunk = slides[lo:lo + 16]
            images = [pool.map(readable, [Path(root) / p for p in picks[s]]) for s in chunk]
            readable_ones = [[image for image in decoded if image is not None] for decoded in images]
            angles.update(zip(chunk, normalizer.dab_angles(readable_ones)))
    return {"threshold_deg": DAB_HUE_WARN_DEG, "patches_per_slide": per_slide, "angles": angles,
            "far": [s for s, a in angles.items() if a is not None and a > DAB_HUE_WARN_DEG]}


def _survey_key(root, picks: dict, normalizer, per_slide: int) -> str:
    """What a survey depends on: the patches it reads (an unreadable one as such), the normalizer's exact state,
    the sampling and the threshold."""
    files = common.files_digest((p, *(common.size_mtime_or_none(Path(root) / p) or (-1, -1))) for ps in picks.values() for p in ps)
    state = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in normalizer.state_dict().items()}
    what = {"files": files, "stain": state, "per_slide": per_slide, "threshold": DAB_HUE_WARN_DEG}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
