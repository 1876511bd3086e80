"""Patient-level splits and their checks (shared by train.py and audit_leakage.py).

Owns which patient goes where: the split flags, the deterministic stratified split (duplicate-patient groups move
as one), and the checks a split must pass wherever it is loaded: no patient in two parts, groups kept together, the
stain reference in train, K folds that are one cross-validation, a HoldOut independent of the CrossValidation data.
Which files are identical, and the caches that say so, are helico/identity.py's; resolve_split asks it. A module of
its own because training and the audit must resolve the very same split.

    import common
    from helico import identity, splits, staining
    data = common.load_data(root)
    groups = identity.duplicate_groups(identity.shared_content(data))   # patients sharing byte-identical images
    split = splits.make_split(data, seed=0, keep_in_train=["B22-47"], groups=groups)
    problems = splits.split_problems(split, data, groups, reference=staining.DEFAULT_REFERENCE)
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from helico import identity, staining
from common import TREES, DataError, HelicoData, patient_id
from helico.staining import DEFAULT_REFERENCE, reference_patients


def split_args_parser():
    """The split flags, defined once and shared by train.py and audit_leakage.py via `parents=`."""
    import argparse
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # the parsers using it refuse prefixes too
    g = p.add_argument_group("data and patient-level split (train / val / test)")
    g.add_argument("--data-root", default=os.environ.get("HELICO_DATA"),
                   help="HelicoDataSet folder (holds CrossValidation/, HoldOut/, the xlsx and the csv); "
                        "default $HELICO_DATA. Stage it to node-local disk first on a cluster.")
    g.add_argument("--split", metavar="FILE", help="a split.json from an earlier run: reuse it exactly (it is "
                   "re-checked against the data, not trusted). Without it a split is made from the flags below.")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the patient shuffle; change it to get a "
                   "different but equally stratified split")
    g.add_argument("--val-frac", type=float, default=0.2, help="fraction of patients (per diagnosis) for validation, "
                   "the part that chooses the epoch, the patch threshold and the patient rule")
    g.add_argument("--test-frac", type=float, default=None, help=f"fraction of patients (per diagnosis) for the test "
                   f"part nothing touches before evaluate.py (default {TEST_FRAC}; with --folds the fold is the test "
                   f"part). 0 makes a two-part train/val split: the report then says there is no untouched set")
    g.add_argument("--folds", type=int, default=None, help="k-fold cross-validation: number of folds (use with --fold; "
                   "one run per fold, then evaluate.py --cv runs/ID-f*)")
    g.add_argument("--fold", type=int, default=None, help="which fold (0..K-1) is the test part; val is carved from "
                   "the other folds' patients (--val-frac of each diagnosis)")
    staining.add_reference_argument(g, "their patients (a file's folder, a folder's own name) are kept in "
                                      "training so validation never shapes the normalizer")
    g.add_argument("--hash-cache", default=None, help="content-hash cache file (default ~/.cache/helico-hp/...); "
                   "re-runs only hash new or changed files. Beside it: <name>.decoded.tsv (the audit's decode "
                   "answers), <name>.identical.json (the duplicate groups of the last file set) and "
                   "<name>.survey.json (train.py's last stain survey)")
    return p


TEST_FRAC = 0.2     # default test share without --folds: 20% test, 20% val, 60% train per diagnosis
RANK = {"ALTA": 0, "BAIXA": 1, "NEGATIVA": 2}


def _take(n_units: int, frac: float) -> int:
    """Units of a stratum for a part: round(n * frac), but at least one when the stratum can spare it (>= 3 units),
    so a small stratum still reaches every part (a test part without infected patients measures nothing)."""
    k = int(round(n_units * frac))
    return max(k, 1) if frac > 0 and n_units >= 3 else k


def make_split(data: HelicoData, seed: int = 0, val_frac: float = 0.2, folds: int | None = None,
               fold: int | None = None, keep_in_train=(), groups: list[list[str]] = (),
               test_frac: float | None = None) -> dict:
    """Deterministic patient-level split into train / val / test, stratified by diagnosis; duplicate-content groups
    move together and `keep_in_train` patients (the stain reference) stay in train.

    Without folds: per diagnosis, shuffle, test = the first test_frac, val = the next val_frac. With folds: the
    units are dealt round-robin into K folds (continuing across diagnoses so fold sizes stay balanced); fold
    `fold` is test and val is the first val_frac of each diagnosis among the other folds. test_frac 0: a two-part
    split (with folds, fold `fold` is then val), flagged `untouched_test: false`."""
    if (folds, fold) != (None, None) and (folds is None or folds < 2 or fold is None or not 0 <= fold < folds):
        raise DataError(f"--fold {fold}: give the number of folds too (--folds K)" if folds is None else
                        f"--folds {folds}: give the fold too (--fold i, 0 <= i < {folds}; under sbatch --array the "
                        f"task ID)" if fold is None else
                        f"--folds {folds} --fold {fold}: need K >= 2 and 0 <= fold < K")
    if folds and test_frac not in (None, 0):
        raise DataError(f"--test-frac {test_frac} with --folds: the fold is the test part; only --test-frac 0 "
                        f"(fold = val, no untouched set) goes with --folds")
    two_part = test_frac == 0
    test_frac = TEST_FRAC if test_frac is None else test_frac
    if not 0 <= test_frac < 1 or not 0 < val_frac < 1 or test_frac + val_frac >= 1:
        raise DataError(f"--val-frac {val_frac} --test-frac {test_frac}: need 0 < val-frac, 0 <= test-frac and "
                        f"val-frac + test-frac < 1")
    units = _units(data.cv_patients, groups)
    forced = {u for u, ps in units.items() if set(ps) & set(keep_in_train)}
    strata: dict[str, list[str]] = {}
    for u, ps in sorted(units.items()):
        if u not in forced:
            dx = min((data.diagnosis.get(p, "UNKNOWN") for p in ps), key=lambda d: RANK.get(d, 3))
            strata.setdefault(dx, []).append(u)
    rng = random.Random(seed)
    part_of: dict[str, str] = {}
    offset = 0
    for dx in sorted(strata):
        us = strata[dx]
        rng.shuffle(us)
        if folds:
            in_fold = [u for k, u in enumerate(us) if (k + offset) % folds == fold]
            offset += len(us)
            rest = [u for u in us if u not in in_fold]
            part_of.update({u: "val" if two_part else "test" for u in in_fold})
            if not two_part:
                part_of.update({u: "val" for u in rest[:_take(len(us), val_frac)]})
        else:
            n_test = _take(len(us), test_frac)
            part_of.update({u: "test" for u in us[:n_test]})
            part_of.update({u: "val" for u in us[n_test:n_test + _take(len(us), val_frac)]})
    parts = {part: sorted(p for u, ps in units.items() if part_of.get(u, "train") == part for p in ps)
             for part in SPLIT_PARTS}
    for part in ("train", "val") if two_part else SPLIT_PARTS:
        if not parts[part]:
            raise DataError(f"split: no patient left for {part} ({len(data.cv_patients)} patients, --val-frac "
                            f"{val_frac}, --test-frac {test_frac}{f', --folds {folds}' if folds else ''})")
    return {**parts, "untouched_test": not two_part, "seed": seed, "val_frac": val_frac,
            "test_frac": None if folds else test_frac, "folds": folds, "fold": fold, "stratified_by": "diagnosis",
            "duplicate_groups": [list(g) for g in groups], "kept_in_train": sorted(keep_in_train), "version": 2}


def _units(patients: list[str], groups) -> dict[str, list[str]]:
    """Patients that must move together (a duplicate-content group) as one unit, keyed by its first patient."""
    member = {p: p for p in patients}
    for g in groups:
        for p in g:
            if p in member:
                member[p] = g[0]
    units: dict[str, list[str]] = {}
    for p in patients:
        units.setdefault(member[p], []).append(p)
    return units


SPLIT_PARTS = ("train", "val", "test")


def has_untouched_test(split: dict) -> bool:
    """True when the split has a test part nothing chose anything on (a two-part split, or an old one, has not)."""
    return bool(split.get("test")) and split.get("untouched_test", True) is not False


def split_problems(split: dict, data: HelicoData, groups=(), reference=None) -> list[str]:
    """What makes a split leaky or unusable on this data root (empty list: fine)."""
    problems, seen = [], {}
    for part in SPLIT_PARTS:
        for p in split.get(part, []):
            if patient_id(p) != p:
                problems.append(f"{part} lists folder name {p!r}, not a patient ID ({patient_id(p)!r})")
            if seen.setdefault(patient_id(p), part) != part:
                problems.append(f"patient {patient_id(p)} is in both {seen[patient_id(p)]} and {part}")
    known = set(data.cv_patients)
    missing = sorted(p for p in seen if p not in known)
    if missing:
        problems.append(f"data root {data.root} lacks patient(s) of the split: {', '.join(missing[:10])}")
    for g in groups:
        parts = {seen.get(p) for p in g if p in seen}
        if len(parts) > 1:
            problems.append(f"patients with byte-identical images are split across {sorted(parts)}: {', '.join(g)}")
    for ref in reference_patients(reference):
        if seen.get(ref) not in (None, "train"):
            problems.append(f"stain reference patient {ref} is in {seen[ref]}, not train")
    return problems


def fold_problems(fold_splits: list[dict], patients: list[str]) -> list[str]:
    """What keeps the splits of K runs from being one cross-validation (empty list: fine): not folds 0..K-1 of one
    seed, test parts that overlap, or patients that no fold tests (other than the kept_in_train ones:
    the stain reference and its duplicate group)."""
    problems = []
    kinds = {(s.get("folds"), s.get("seed")) for s in fold_splits}
    folds = sorted(s.get("fold") for s in fold_splits if s.get("fold") is not None)
    k = next(iter(kinds))[0] if len(kinds) == 1 else None
    if len(kinds) != 1 or not k or folds != list(range(k)):
        problems.append(f"not the folds 0..K-1 of one --folds K --split-seed S: (folds, seed) {sorted(kinds, key=str)}"
                        f", folds {folds}")
    tested: dict[str, object] = {}
    for s in fold_splits:
        if not s.get("test"):
            problems.append(f"fold {s.get('fold')} has no test part (a two-part split): nothing out-of-fold to pool")
        for p in s.get("test", []):
            if p in tested:
                problems.append(f"patient {p} is in the test parts of folds {tested[p]} and {s.get('fold')}")
            tested.setdefault(p, s.get("fold"))
    kept = {p for s in fold_splits for p in s.get("kept_in_train") or [] if p}  # the stain reference and its group
    kept |= {p for s in fold_splits for g in s.get("duplicate_groups") or [] if kept & set(g) for p in g}
    untested = sorted(set(patients) - set(tested) - kept)
    if untested:
        problems.append(f"{len(untested)} patient(s) in no fold's test part: {', '.join(untested[:10])}")
    return problems


class IndependenceError(DataError):
    """The HoldOut is not independent of the CrossValidation data: scripts exit 1 (a leak), not 2."""


def holdout_overlap(data: HelicoData, shared: dict[str, list[str]]) -> dict[str, str]:
    """HoldOut patients that share an ID or a byte-identical image (`shared`, from identity.shared_content) with the
    CrossValidation data: patient -> why, in words."""
    why = {p: "also a CrossValidation patient ID" for p in sorted(set(data.holdout_patients) & set(data.cv_patients))}
    holdout_tree = TREES["holdout"] + "/"
    for paths in shared.values():
        held = {patient_id(Path(p).parent.name) for p in paths if p.startswith(holdout_tree)}
        cv = sorted({patient_id(Path(p).parent.name) for p in paths if not p.startswith(holdout_tree)})
        for p in sorted(held) if cv else ():
            why.setdefault(p, f"byte-identical image(s) with CrossValidation patient(s) {', '.join(cv)}")
    return why


def check_holdout_independent(data: HelicoData, shared: dict[str, list[str]]) -> None:
    """Raise IndependenceError naming every HoldOut patient that overlaps the CrossValidation data."""
    bad = holdout_overlap(data, shared)
    if bad:
        raise IndependenceError(f"{data.root}: HoldOut not independent of CrossValidation ({len(bad)} patient(s)): "
                                + "; ".join(f"{p}: {why}" for p, why in bad.items())
                                + " (audit_leakage.py lists the files); remove them from HoldOut/")


def load_split(path) -> dict:
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"--split {path}: file not found") from None
    except ValueError as e:
        raise DataError(f"--split {path}: not valid JSON ({e})") from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "val")) \
            or not isinstance(split.get("test", []), list):
        raise DataError(f"--split {path}: expected an object with 'train', 'val' (and 'test') lists of patient IDs")
    if not split["train"] or not split["val"]:
        raise DataError(f"--split {path}: empty 'train' or 'val' list")
    split.setdefault("test", [])  # a version-1 (two-part) split: no untouched set
    split.setdefault("untouched_test", bool(split["test"]))
    return split


def split_options(args) -> dict:
    """The values of split_args_parser's flags (bar --data-root) as resolve_split's keyword arguments."""
    return {"split_file": args.split, "seed": args.split_seed, "val_frac": args.val_frac, "test_frac": args.test_frac,
            "folds": args.folds, "fold": args.fold, "reference_patch": args.reference_patch,
            "hash_cache": args.hash_cache}


def resolve_split(data: HelicoData, split_file=None, seed: int = 0, val_frac: float = 0.2,
                  test_frac: float | None = None, folds: int | None = None, fold: int | None = None,
                  reference_patch=DEFAULT_REFERENCE, hash_cache=None, progress: bool = True) -> tuple[dict, list[list[str]], dict[str, list[str]]]:
    """The split asked for: split_file reloaded, else made from the rest; the one path train.py and the audit take.
    Returns (split, duplicate groups, shared content as from identity.shared_content)."""
    cache = identity.hash_cache_path(hash_cache, data.root)
    shared = identity.shared_content(data, cache=cache, progress=progress)
    groups = identity.duplicate_groups(shared)
    if split_file:
        split = load_split(split_file)
    else:
        split = make_split(data, seed, val_frac, folds, fold, keep_in_train=reference_patients(reference_patch),
                           groups=groups, test_frac=test_frac)
    return split, groups, shared


