"""File identity and what is remembered about files between runs: which files hold the same bytes, which look
alike, and the caches that spare re-reading them.

Owns the content hashes and their cache (--hash-cache, default ~/.cache/helico-hp/hashes-<root>.json), the files
that are byte-identical and the duplicate-patient groups they make, the decode check of every PNG (its header size,
whether its pixels decode, its perceptual hash) and the decode cache beside the hash cache, the near-duplicate search
on perceptual hashes, and where the keyed memos of a file set live (beside the hash cache). Every cache is keyed by
each file's path, size and mtime (common.size_mtime), so a changed file is read again and an unreadable cache is an
empty one. The generic memo helpers (common.remembered, common.files_digest) stay in common: the stain survey and
the packed cache use them too. Imports only common and metrics; no torch.

    from helico import identity
    cache = identity.hash_cache_path(None, data.root)
    shared = identity.shared_content(data, cache)             # content held by several patients
    groups = identity.duplicate_groups(shared)                  # the patients that must stay in one part
    keep = identity.first_copies(paths, identity.identical_files(data, cache))  # each content counted once
    checked = identity.decode_images(data.root, data.image_paths(), data.file_stats,
                                     identity.decode_cache_path(cache))  # path -> Decoded
    hashes = {p: d.dhash for p, d in checked.items() if d.informative}    # near-uniform images left out
    near = identity.near_duplicates(hashes, where, owner, concern, listed=("holdout_vs_crossvalidation",))
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

import common
from common import DataError, HelicoData, patient_id
from helico import metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- content hashes
def default_hash_cache(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "helico-hp"
    return base / f"hashes-{hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]}.json"


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


def read_hash_cache(cache: Path) -> dict:
    """path -> [size, mtime_ns, digest] of the hash cache file (empty when missing or unreadable). Read once per
    file set: identical_files keeps what it derives, so nothing holds one entry per file past the hashing."""
    with contextlib.suppress(ValueError, OSError):
        return json.loads(cache.read_text())
    return {}


def file_digests(root: Path, rel_paths, cache: Path | None = None, workers: int = 8, progress: bool = True,
                 only_size_collisions: bool = True, stats: dict | None = None) -> dict[str, str]:
    """Content hash of each file. Files whose size no other file shares cannot have a byte-identical twin and
    are skipped when `only_size_collisions`; results are cached by (path, size, mtime). `stats` (path -> (size,
    mtime_ns), HelicoData.file_stats) spares a stat per file; files it lacks are stat'ed."""
    from tqdm import tqdm
    given = stats or {}
    stats = {p: given.get(p) or common.size_mtime(root / p) for p in rel_paths}
    # An empty file holds no image, so it is no copy of anything: grouping empty files would drop all but one of
    # them as "identical" before decoding, and --skip-bad-images would then name only that one.
    stats = {p: st for p, st in stats.items() if st[0] > 0}
    if only_size_collisions:
        sizes: dict[int, int] = {}
        for st in stats.values():
            sizes[st[0]] = sizes.get(st[0], 0) + 1
        stats = {p: st for p, st in stats.items() if sizes[st[0]] > 1}
    known = read_hash_cache(cache) if cache is not None else {}
    out, todo = {}, []
    for p, st in stats.items():
        hit = known.get(p)
        if hit and hit[0] == st[0] and hit[1] == st[1]:
            out[p] = hit[2]
        else:
            todo.append(p)
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL: threads read and hash in parallel
        digests = common.bounded_map(pool, lambda q: _digest(str(root / q)), todo, 4 * workers)
        for p, d in tqdm(zip(todo, digests), total=len(todo), desc="hashing", unit="file",
                         disable=not progress or not todo, mininterval=1):
            out[p] = d
    if cache is not None and todo:
        try:
            write_hash_cache(cache, out, stats)
        except OSError as e:
            raise DataError(f"--hash-cache {cache}: cannot write ({e.strerror}); pass a writable path") from None
    return out


def write_hash_cache(cache: Path, digests: dict[str, str], stats: dict) -> None:
    """{path: [size, mtime_ns, digest]} as JSON, written in pieces: neither a dict of lists nor the whole text is
    ever held at once, which would raise the audit's peak memory with every file."""
    with common.atomic_path(cache) as tmp, open(tmp, "w") as f:
        items = list(digests.items())
        for k in range(0, len(items), 8192):
            f.write(("{" if k == 0 else ", ") + ", ".join(f"{json.dumps(p)}: [{stats[p][0]}, {stats[p][1]}, \"{d}\"]"
                                                          for p, d in items[k:k + 8192]))
        f.write("}" if items else "{}")


def hash_cache_path(hash_cache: str | None, root: Path) -> Path:
    """--hash-cache, else the default cache file of this data root."""
    return Path(hash_cache) if hash_cache else default_hash_cache(root)


def beside_hash_cache(cache: Path, suffix: str) -> Path:
    """A file kept beside the hash cache (--hash-cache): hashes-<root>.json -> hashes-<root><suffix>."""
    return cache.with_name(cache.stem + suffix)


def _identical_groups(data: HelicoData, cache: Path | None, progress: bool) -> dict[str, list[str]]:
    by_digest: dict[str, list[str]] = {}
    for p, d in file_digests(data.root, list(data.file_stats), cache=cache, progress=progress,
                             stats=data.file_stats).items():  # every PNG scanned (image_paths() lists the same)
        by_digest.setdefault(d, []).append(p)
    return {d: sorted(ps) for d, ps in by_digest.items() if len(ps) > 1}


def identical_files(data: HelicoData, cache: Path | None = None, progress: bool = True) -> dict[str, list[str]]:
    """digest -> sorted paths of every content that more than one of data's images holds (any patients).

    Remembered beside the hash cache (`<cache stem>.identical.json`), keyed by every scanned PNG's path, size and
    mtime (HelicoData.file_stats): while no file changes, a start-up reads that small file, not the much larger hash
    cache, and within a process it is worked out once per scan. Any change
    of any file, or a missing, unreadable or malformed memo, recomputes it from file_digests."""
    memo = data.derived.get(("identical_files", cache))
    if memo is not None:
        return memo
    key = common.files_digest((p, size, mtime) for p, (size, mtime) in data.file_stats.items())  # in scan order
    known = common.remembered(beside_hash_cache(cache, ".identical.json") if cache is not None else None, key,
                              "groups", lambda: _identical_groups(data, cache, progress),
                              lambda groups: isinstance(groups, dict))
    data.derived[("identical_files", cache)] = known
    return known


def first_copies(paths: list[str], identical: dict[str, list[str]]) -> list[bool]:
    """For each path, whether it counts: the first (in path order) of the files among `paths` with its content
    (`identical`: identical_files), so a byte-identical patch (a slide filed under two patient IDs) is scored and
    counted once."""
    content = {p: d for d, group in identical.items() for p in group}
    order = sorted(range(len(paths)), key=lambda i: paths[i])
    first = metrics.first_of_identical([content.get(paths[i]) for i in order])
    keep = [True] * len(paths)
    for j, i in enumerate(order):
        keep[i] = bool(first[j])
    return keep


def shared_content(data: HelicoData, cache: Path | None = None, progress: bool = True) -> dict[str, list[str]]:
    """digest -> paths, for content that occurs in more than one patient's folders."""
    return {d: ps for d, ps in identical_files(data, cache, progress).items()
            if len({patient_id(Path(p).parent.name) for p in ps}) > 1}


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


# ----------------------------------------------------------------------------------------------- decoding

class Known:
    """What evaluation knows of a dataset's files, worked out once per command (the hash cache beside the data):
    `shared` (shared_content), `groups` (duplicate_groups: one resampling cluster each) and, on first use,
    `identical` (identical_files: each content counted once)."""

    def __init__(self, data: HelicoData, progress: bool = False):
        self.data, self.progress = data, progress
        self.hash_cache = hash_cache_path(None, data.root)
        self.shared = shared_content(data, cache=self.hash_cache, progress=progress)
        self.groups = duplicate_groups(self.shared)
        self._identical = None

    @property
    def identical(self) -> dict[str, list[str]]:
        if self._identical is None:  # after the HoldOut check: a dependent HoldOut stops before this hashing
            self._identical = identical_files(self.data, self.hash_cache, progress=self.progress)
        return self._identical

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


class Decoded(NamedTuple):
    """What decoding one file tells: its header size, whether its pixels decode, how it looks."""
    size: tuple[int, int] | None    # (width, height) from the PNG header; None: no PNG header
    error: str | None               # why the pixels do not decode; None when they do (or there is no header)
    dhash: int | None               # the 64-bit perceptual hash of a decoded image
    stable_bits: int | None         # how many of its bits the image decides (see dhash)

    @property
    def informative(self) -> bool:
        """Whether the perceptual hash says anything of the image: a near-uniform one (blank glass, background) has
        a hash of noise or of all zeros, alike across unrelated images, and is left out of perceptual matching."""
        return self.dhash is not None and self.stable_bits >= MIN_STABLE_BITS


FLAT = 2              # gray levels: thumbnail neighbors this close are ordered by noise (re-encoding moves them)
MIN_STABLE_BITS = 16  # of 64: fewer decided by the image itself (under a quarter), and its hash is noise or constant


def decode_check(path: Path) -> Decoded:
    """The Decoded answer of one file. A truncated PNG keeps a valid header: only decoding finds it."""
    from PIL import Image
    size, error, fingerprint, stable = png_size(path), None, None, None
    if size is not None:
        try:
            with Image.open(path) as im:
                im.load()  # every pixel: what PatchDataset does before it trains on the file
                fingerprint, stable = dhash(im)
        except (OSError, SyntaxError, ValueError) as e:
            error = str(e) or type(e).__name__
    return Decoded(size, error, fingerprint, stable)


def dhash(im) -> tuple[int, int]:
    """(a 64-bit perceptual difference hash, how many of its bits are stable): the image in grey, shrunk to 9x8, one
    bit per horizontal neighbor pair (left brighter than right). A re-encoded, recompressed or slightly re-colored
    copy keeps nearly every bit; two different tissue patches differ in about half of them. A bit is stable when its
    neighbors differ by more than FLAT gray levels: in a near-uniform image most are not, and its hash is noise."""
    from PIL import Image
    g = np.asarray(im.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    step = g[:, :-1] - g[:, 1:]
    return int(np.packbits((step > 0).ravel()).view(">u8")[0]), int((np.abs(step) > FLAT).sum())


DECODE_CACHE_HEADER = "helico decode cache v2\tpath\tsize\tmtime_ns\twidth\theight\tdhash\tstable_bits\terror"


def decode_cache_path(hash_cache: Path) -> Path:
    """The decode cache beside the hash cache (--hash-cache names both): hashes-<root>.json -> .decoded.tsv."""
    return beside_hash_cache(hash_cache, ".decoded.tsv")


def read_decode_cache(path: Path, stats: dict) -> dict[str, Decoded]:
    """path -> decode_check's answer, for the files of `stats` (path -> (size, mtime_ns)) whose size and mtime
    still match; an unreadable or foreign file, or one of an earlier version, is an empty cache (everything is
    decoded again)."""
    known = {}
    number = lambda text: int(text) if text else None
    try:
        with open(path, encoding="utf-8") as f:
            if f.readline().rstrip("\n") != DECODE_CACHE_HEADER:
                return {}
            for line in f:
                p, size, mtime, w, h, fingerprint, stable, error = line.rstrip("\n").split("\t")
                if stats.get(p) == (int(size), int(mtime)):
                    known[p] = Decoded((int(w), int(h)) if w else None, error or None, number(fingerprint),
                                       number(stable))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return known


def write_decode_cache(path: Path, checked: dict[str, Decoded], stats: dict) -> None:
    clean = lambda text: " ".join(str(text).split())  # an error message on one line, no tabs
    text = lambda value: "" if value is None else str(value)
    lines = [DECODE_CACHE_HEADER] + [
        f"{p}\t{stats[p][0]}\t{stats[p][1]}\t{d.size[0] if d.size else ''}\t{d.size[1] if d.size else ''}\t"
        f"{text(d.dhash)}\t{text(d.stable_bits)}\t{clean(d.error) if d.error else ''}"
        for p, d in sorted(checked.items()) if p in stats]
    try:
        common.atomic_write_text(path, "\n".join(lines) + "\n")  # (atomic_path makes the folder)
    except OSError as e:
        raise DataError(f"--hash-cache {path}: cannot write the decode cache ({e.strerror}); pass a writable "
                        f"--hash-cache") from None


def decode_images(root: Path, paths, stats: dict, cache: Path | None = None, workers: int = 16, chunk: int = 256,
                  progress: bool = True) -> dict[str, Decoded]:
    """path -> decode_check's answer, every image decoded once and the answers kept in `cache` (a TSV keyed by path,
    size and mtime, beside the hash cache): an audit at every job start decodes only new or changed files. Decoding
    runs in a thread pool (PIL releases the GIL while it inflates and unfilters), at most 4 x workers chunks of
    `chunk` paths in flight, so memory does not grow with a Future per file. Decoding is most of a first audit's
    time."""
    from tqdm import tqdm
    paths = sorted(paths)
    checked = read_decode_cache(cache, stats) if cache is not None else {}
    todo = [p for p in paths if p not in checked]
    chunks = (todo[k:k + chunk] for k in range(0, len(todo), chunk))
    nothing = Decoded(None, None, None, None)  # a path the scan did not stat: not read
    decode = lambda ps: [(p, decode_check(root / p) if p in stats else nothing) for p in ps]
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(todo), desc="decoding PNGs", unit="file",
                                                   disable=not progress or not todo, mininterval=1) as bar:
        for part in common.bounded_map(pool, decode, chunks, 4 * workers):
            checked.update(part)
            bar.update(len(part))
    if cache is not None and todo:
        write_decode_cache(cache, checked, stats)
    return checked  # the listing's files only: the cache was read for them, todo is the rest


# ----------------------------------------------------------------------------------------------- near-duplicates
NEAR = 6  # bits of 64: at most this many differ for a near-duplicate (a re-encoded copy keeps all but a few)
BANDS = NEAR + 1  # pigeonhole: two hashes within NEAR bits agree exactly on at least one of NEAR + 1 bands
BLOCK = 1024  # rows of a band's group compared at once: a BLOCK x group matrix of XORs
MAX_LISTED = 1000  # pairs listed per concern: the report stays readable however alike a dataset's images are


def near_hash_pairs(values: np.ndarray):
    """(i, j, differing bits) arrays, one batch at a time, of every pair i < j of the distinct uint64 `values` that
    differ in at most NEAR bits, each pair once. Candidates agree exactly on one of BANDS bit bands (pigeonhole: no
    near pair is missed); each band's groups are compared in numpy, BLOCK rows at a time, and only near pairs are
    kept (random hashes put hundreds of values in every band group: a record of each candidate pair would not fit).
    Distinct values only: a hash that many images share is one value here, so a look-alike group costs nothing."""
    h = np.asarray(values, dtype=np.uint64)
    edges = [round(64 * b / BANDS) for b in range(BANDS + 1)]  # 9-10 bits each: a 4-bit band would hold ~1/16
    masks = [np.uint64((1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]  # of all images in each group
    band = lambda v, e: (v >> np.uint64(edges[e])) & masks[e]
    for b in range(BANDS):
        key = band(h, b)
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.zeros(0, dtype=np.int64)
        for lo, hi in zip(starts, np.r_[starts[1:], len(k)]):
            if hi - lo < 2:
                continue
            members = np.sort(order[lo:hi])
            for a in range(0, len(members) - 1, BLOCK):  # each row against the members after it
                rows = members[a:a + BLOCK]
                xor = h[rows][:, None] ^ h[members][None, :]
                later = np.arange(len(members))[None, :] > np.arange(a, a + len(rows))[:, None]
                i, j = np.nonzero((np.bitwise_count(xor) <= NEAR) & later)
                x = xor[i, j]
                first = np.ones(len(x), dtype=bool)  # a pair agreeing on several bands counts in the first only
                for e in range(b):
                    first &= band(x, e) != 0
                if first.any():
                    yield rows[i[first]], members[j[first]], np.bitwise_count(x[first])


class NearDuplicates(NamedTuple):
    """What near_duplicates found among images of different owners (patients or duplicate-patient groups)."""
    pairs: dict[str, int]                   # concern -> pairs of images of different owners, counted, never listed all
    listed: list[tuple[str, str, str, int]]  # (concern, path, path, differing bits): one per pair of patients and
    #                                          hashes, at most MAX_LISTED per concern
    patients: set                           # patients of the pairs of the listed concerns
    shared_hashes: int                      # hashes that several images share exactly
    largest_share: int                      # images of the most shared hash


def near_duplicates(hashes: dict[str, int], where, owner, concern, listed=(),
                    limit: int = MAX_LISTED) -> NearDuplicates:
    """Pairs of images whose hashes differ in at most NEAR bits, counted by concern, without listing every pair.

    where(path) -> (place, patient), or None for an image of no patient (left out); owner(patient) -> what must
    differ for a pair to count (the patient, or its duplicate-patient group); concern(place, place) -> the name a
    pair of places is counted under. Pairs of the `listed` concerns are listed, in that order: one pair of images
    for each pair of patients and of hashes, `limit` of each concern.
    Images are grouped by hash and, within a hash, by (place, patient): a hash that n images share adds its pairs
    as products of those groups' sizes, so time and memory grow with the images and the distinct near hashes, not
    with the square of a look-alike group."""
    paths = sorted(hashes)
    h = np.fromiter((hashes[p] for p in paths), dtype=np.uint64, count=len(paths))
    order = np.argsort(h, kind="stable")
    values, starts, sizes = np.unique(h[order], return_index=True, return_counts=True)
    counted: dict[str, int] = {}
    kept: dict[str, list] = {c: [] for c in listed}
    patients: set = set()
    groups: dict[int, list] = {}

    def placed(u: int) -> list:
        """[(place, patient, owner, [path, ...])] of the images of distinct hash u (built once, only when asked)."""
        if u not in groups:
            by: dict[tuple, list[str]] = {}
            for k in order[starts[u]:starts[u] + sizes[u]].tolist():
                at = where(paths[k])
                if at is not None:
                    by.setdefault(at, []).append(paths[k])
            groups[u] = [(place, patient, owner(patient), ps) for (place, patient), ps in sorted(by.items(), key=str)]
        return groups[u]

    def count(u: int, v: int, bits: int) -> None:
        a_side, b_side = placed(u), placed(v)
        for x, (pa, ta, oa, fa) in enumerate(a_side):
            for y, (pb, tb, ob, fb) in enumerate(b_side):
                if (u == v and y <= x) or oa == ob:  # one hash: each pair of groups once; one owner: not a pair
                    continue
                c = concern(pa, pb)
                counted[c] = counted.get(c, 0) + len(fa) * len(fb)
                if c in kept:
                    patients.update((ta, tb))
                    if len(kept[c]) < limit:  # one example per pair of patients and hashes: the list shows them all
                        kept[c].append((c, *sorted((fa[0], fb[0])), bits))

    shared = np.flatnonzero(sizes > 1)
    for u in shared.tolist():
        count(u, u, 0)
    for i, j, bits in near_hash_pairs(values):
        for u, v, d in zip(i.tolist(), j.tolist(), bits.tolist()):
            count(u, v, d)
    rows = [row for c in listed for row in sorted(kept[c])]
    return NearDuplicates(counted, rows, patients, len(shared), int(sizes.max()) if len(sizes) else 0)
