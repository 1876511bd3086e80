"""Patient-level splits and the content hashes that keep them honest (shared by train.py and audit_leakage.py).

Owns which patient goes where: the split flags, the deterministic stratified split, duplicate-content groups, and the
checks a split must pass wherever it is loaded. It is the "splits" part of the design card's common.py, a module of
its own because training and the audit must resolve the very same split; it imports nothing but common.

    import common, splits
    data = common.load_data(root)
    groups = splits.duplicate_groups(splits.shared_content(data))   # patients sharing byte-identical images
    split = splits.make_split(data, seed=0, keep_in_train=["B22-47"], groups=groups)
    problems = splits.split_problems(split, data, groups, reference=common.DEFAULT_REFERENCE)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import DEFAULT_REFERENCE, DataError, HelicoData, atomic_write_text, patient_id


# ----------------------------------------------------------------------------------------------- content hashes
def default_hash_cache(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "helico-hp"
    return base / f"hashes-{hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]}.json"


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


def file_digests(root: Path, rel_paths, cache: Path | None = None, workers: int = 8, progress: bool = True,
                 only_size_collisions: bool = True) -> dict[str, str]:
    """Content hash of each file. Files whose size no other file shares cannot have a byte-identical twin and
    are skipped when `only_size_collisions`; results are cached by (path, size, mtime)."""
    from tqdm import tqdm
    stats = {p: os.stat(root / p) for p in rel_paths}
    if only_size_collisions:
        sizes: dict[int, int] = {}
        for st in stats.values():
            sizes[st.st_size] = sizes.get(st.st_size, 0) + 1
        stats = {p: st for p, st in stats.items() if sizes[st.st_size] > 1}
    known = {}
    if cache is not None and cache.is_file():
        with contextlib.suppress(ValueError, OSError):
            known = json.loads(cache.read_text())
    out, todo = {}, []
    for p, st in stats.items():
        hit = known.get(p)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            out[p] = hit[2]
        else:
            todo.append(p)
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL: threads read and hash in parallel
        for p, d in tqdm(zip(todo, pool.map(lambda q: _digest(str(root / q)), todo)), total=len(todo),
                         desc="hashing", unit="file", disable=not progress or not todo, mininterval=1):
            out[p] = d
    if cache is not None and todo:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps({p: [stats[p].st_size, stats[p].st_mtime_ns, d] for p, d in out.items()}))
        except OSError as e:
            raise DataError(f"--hash-cache {cache}: cannot write ({e.strerror}); pass a writable path") from None
    return out


def shared_content(data: HelicoData, cache: Path | None = None, progress: bool = True) -> dict[str, list[str]]:
    """digest -> paths, for content that occurs in more than one patient's folders."""
    by_digest: dict[str, list[str]] = {}
    for p, d in file_digests(data.root, data.image_paths(), cache=cache, progress=progress).items():
        by_digest.setdefault(d, []).append(p)
    return {d: sorted(ps) for d, ps in by_digest.items()
            if len(ps) > 1 and len({patient_id(Path(p).parent.name) for p in ps}) > 1}


def duplicate_groups(shared: dict[str, list[str]]) -> list[list[str]]:
    """Patients linked by any byte-identical file, as connected components (union-find)."""
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for paths in shared.values():
        pats = [patient_id(Path(p).parent.name) for p in paths]
        for p in pats[1:]:
            parent[find(p)] = find(pats[0])
    groups: dict[str, list[str]] = {}
    for p in parent:
        groups.setdefault(find(p), []).append(p)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def split_args_parser():
    """The split flags, defined once and shared by train.py and audit_leakage.py via `parents=`."""
    import argparse
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data and patient-level split")
    g.add_argument("--data-root", default=os.environ.get("HELICO_DATA"),
                   help="HelicoDataSet folder (holds CrossValidation/, HoldOut/, the xlsx and the csv); "
                        "default $HELICO_DATA. Stage it to node-local disk first on a cluster.")
    g.add_argument("--split", metavar="FILE", help="a split.json from an earlier run: reuse it exactly (it is "
                   "re-checked against the data, not trusted). Without it a split is made from the flags below.")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the patient shuffle; change it to get a "
                   "different but equally stratified split")
    g.add_argument("--val-frac", type=float, default=0.2, help="fraction of patients (per diagnosis) for validation")
    g.add_argument("--folds", type=int, default=None, help="k-fold cross-validation: number of folds (use with --fold)")
    g.add_argument("--fold", type=int, default=None, help="which fold (0..K-1) is the validation fold")
    g.add_argument("--reference-patch", default=DEFAULT_REFERENCE, help="stain reference PNG, relative to the data "
                   "root or absolute; its patient is kept in training so validation never shapes the normalizer")
    g.add_argument("--hash-cache", default=None, help="content-hash cache file (default ~/.cache/helico-hp/...); "
                   "re-runs only hash new or changed files")
    return p


def reference_patient(reference_patch: str | None) -> str | None:
    return patient_id(Path(reference_patch).parent.name) if reference_patch else None


def make_split(data: HelicoData, seed: int = 0, val_frac: float = 0.2, folds: int | None = None,
               fold: int | None = None, keep_in_train=(), groups: list[list[str]] = ()) -> dict:
    """Deterministic patient-level split, stratified by diagnosis; duplicate-content groups move together."""
    if (folds, fold) != (None, None) and (folds is None or folds < 2 or fold is None or not 0 <= fold < folds):
        raise DataError(f"--folds {folds} --fold {fold}: need K >= 2 and 0 <= fold < K")
    if folds is None and not 0 < val_frac < 1:
        raise DataError(f"--val-frac {val_frac}: must be between 0 and 1")
    patients = data.cv_patients
    member = {p: p for p in patients}
    for g in groups:
        for p in g:
            if p in member:
                member[p] = g[0]
    units: dict[str, list[str]] = {}
    for p in patients:
        units.setdefault(member[p], []).append(p)
    forced = {member[p] for p in keep_in_train if p in member}
    rank = {"ALTA": 0, "BAIXA": 1, "NEGATIVA": 2}
    strata: dict[str, list[str]] = {}
    for u, ps in sorted(units.items()):
        if u not in forced:
            dx = min((data.diagnosis.get(p, "UNKNOWN") for p in ps), key=lambda d: rank.get(d, 3))
            strata.setdefault(dx, []).append(u)
    rng = random.Random(seed)
    val_units, offset = [], 0
    for dx in sorted(strata):
        us = strata[dx]
        rng.shuffle(us)
        if folds:  # round-robin continues across strata so fold sizes stay balanced
            val_units += [u for k, u in enumerate(us) if (k + offset) % folds == fold]
            offset += len(us)
        else:
            val_units += us[:int(round(len(us) * val_frac))]
    val = sorted(p for u in val_units for p in units[u])
    return {"train": sorted(set(patients) - set(val)), "val": val, "seed": seed, "val_frac": val_frac,
            "folds": folds, "fold": fold, "stratified_by": "diagnosis", "duplicate_groups": [list(g) for g in groups],
            "kept_in_train": sorted(keep_in_train), "version": 1}


SPLIT_PARTS = ("train", "val", "test")


def split_problems(split: dict, data: HelicoData, groups=(), reference: str | None = None) -> list[str]:
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
    ref = reference_patient(reference)
    if ref and seen.get(ref) not in (None, "train"):
        problems.append(f"stain reference patient {ref} is in {seen[ref]}, not train")
    return problems


def load_split(path) -> dict:
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"--split {path}: file not found") from None
    except ValueError as e:
        raise DataError(f"--split {path}: not valid JSON ({e})") from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "val")):
        raise DataError(f"--split {path}: expected an object with 'train' and 'val' lists of patient IDs")
    if not split["train"] or not split["val"]:
        raise DataError(f"--split {path}: empty 'train' or 'val' list")
    return split


def split_options(args) -> dict:
    """The values of split_args_parser's flags (bar --data-root) as resolve_split's keyword arguments."""
    return {"split_file": args.split, "seed": args.split_seed, "val_frac": args.val_frac, "folds": args.folds,
            "fold": args.fold, "reference_patch": args.reference_patch, "hash_cache": args.hash_cache}


def resolve_split(data: HelicoData, split_file=None, seed: int = 0, val_frac: float = 0.2, folds: int | None = None,
                  fold: int | None = None, reference_patch: str | None = DEFAULT_REFERENCE, hash_cache=None,
                  progress: bool = True) -> tuple[dict, list[list[str]], dict[str, list[str]]]:
    """The split asked for: split_file reloaded, else made from the rest; the one path train.py and the audit take.
    Returns (split, duplicate groups, shared content as from shared_content)."""
    cache = Path(hash_cache) if hash_cache else default_hash_cache(data.root)
    shared = shared_content(data, cache=cache, progress=progress)
    groups = duplicate_groups(shared)
    if split_file:
        split = load_split(split_file)
    else:
        split = make_split(data, seed, val_frac, folds, fold, keep_in_train=[reference_patient(reference_patch)],
                           groups=groups)
    return split, groups, shared


