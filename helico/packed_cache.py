"""Packed patch cache: decode every patch once into a uint8 memory-mapped array, so no epoch decodes a PNG.

In code (what train.py / evaluate.py do with --cache DIR):
    cache = packed_cache.prepare("/local/cache256", data, 256, workers=16)        # build, resume or reuse
    ds = packed_cache.patch_dataset(data.root, samples, 256, cache=cache)         # PatchDataset's items
    if ds.normalized: skip Macenko (the pixels already are), and store ds.stain as the checkpoint's stain reference
    packed_cache.cache_folder("/local/caches", 256, True, reference)  # --cache-base: the folder of this kind

Owns where training and evaluation read patches from (patch_dataset: PNGs or the cache) and the cache's one entry
point (prepare); a module of its own because the cache is a file format with its own lifecycle, not part of the data.

CACHE_DIR holds:
    patches.u8    uint8 (N, 3, H, W), C order, no header (np.memmap); row r is index row r
    index.csv     row,path,patient,label,source,size,mtime_ns   (every patch of data.all_samples(), by path)
    meta.json     image size, count, normalized + stain reference, index checksum, source fingerprint, and
                  "complete": true, written last: a cache without it is never read
    progress.bin  one byte per chunk of rows, 1 once the chunk is decoded (and normalized) and written
    bad_rows.txt  rows PatchDataset could not decode (listed in meta.json as "bad_rows" when complete)
    .lock         flock'd while building, so two jobs (or DDP ranks) never build the same folder at once
The decode is PatchDataset's own (so items are byte-identical to it); labels always come from the caller's
Samples, never from the cache. A rebuild happens when the source files changed (paths, sizes or mtimes: the
fingerprint), the image size, the normalization or the stain reference differ, or verification fails; an
interrupted build resumes from its finished chunks. Only the files above are ever deleted in CACHE_DIR.
Size on disk: 196,608 bytes per 256x256 patch (~43 GB for the ~220k patches of HelicoDataSet, ~33 GB at 224).
The command that builds one by hand is the top-level patch_cache.py.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
from helico import staining
from common import DataError

VERSION = 1
CHUNK_ROWS = 64  # resume granularity: 64 rows of 256x256 = 12.6 MB per write
PATCHES, INDEX, META, PROGRESS, BAD_ROWS = "patches.u8", "index.csv", "meta.json", "progress.bin", "bad_rows.txt"
INDEX_COLUMNS = ("row", "path", "patient", "label", "source", "size", "mtime_ns")


# ----------------------------------------------------------------------------------------------- index
def unique_samples(samples) -> list:
    """One Sample per path (the first seen), sorted by path so the row order never depends on the workbook."""
    first = {s.path: s for s in reversed(list(samples))}  # the first seen is assigned last
    return [first[p] for p in sorted(first)]


class Index:
    """A cache's index.csv as its readers use it: each row's path in row order (`paths`), each path's (size,
    mtime_ns) as indexed (`stats`), the file's sha256; `row_of` (path -> row) is made on first use. Patients,
    labels and sources are in the file for people: labels always come from the caller's Samples."""

    def __init__(self, paths: list[str], stats: dict[str, tuple[int, int]], sha256: str):
        self.paths, self.stats, self.sha256, self._row_of = paths, stats, sha256, None

    def __len__(self):
        return len(self.paths)

    @property
    def row_of(self) -> dict[str, int]:
        if self._row_of is None:
            self._row_of = {p: r for r, p in enumerate(self.paths)}
        return self._row_of


def _needs_quotes(text: str, n_rows: int) -> bool:
    """Whether csv would quote a field of these joined lines: a comma, quote or line break in one of them (counted,
    not searched per field: every start-up makes the index it wants, ~220k rows)."""
    return '"' in text or "\r" in text or text.count("\n") != n_rows + 1 or \
        text.count(",") != (len(INDEX_COLUMNS) - 1) * (n_rows + 1)


def index_of(root: Path, samples, stats: dict | None = None) -> tuple[Index, bytes]:
    """(the Index of `samples` (unique_samples: one per path, in path order), index.csv's bytes, as csv.DictWriter
    writes them). `stats` (HelicoData.file_stats: path -> (size, mtime_ns)) spares a stat per file. Joined by hand
    (every start-up makes it), csv.writer only when a field needs quoting, so the bytes are always csv's."""
    stats = stats or {}
    try:  # the scan's own stats (HelicoData.file_stats) hold every sample's
        own = {s.path: stats[s.path] for s in samples}
    except KeyError:
        own = {s.path: stats.get(s.path) or common.size_mtime_or_none(root / s.path) for s in samples}
    unreadable = next((p for p, st in own.items() if st is None), None)
    if unreadable is not None:
        raise DataError(f"{root / unreadable}: cannot stat (missing or unreadable)")
    lines = [",".join(INDEX_COLUMNS)] + [f"{r},{s.path},{s.patient},{s.label},{s.source},{size},{mtime}"
                                         for r, (s, (size, mtime)) in enumerate(zip(samples, own.values()))]
    text = "\n".join(lines) + "\n"
    if _needs_quotes(text, len(samples)):
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(INDEX_COLUMNS)
        w.writerows((r, s.path, s.patient, s.label, s.source, *own[s.path]) for r, s in enumerate(samples))
        text = out.getvalue()
    data = text.encode()
    return Index([s.path for s in samples], own, hashlib.sha256(data).hexdigest()), data


def fingerprint(index: Index) -> str:
    """What the pixels depend on: each source file's path, size and mtime (relative paths, so a staged rsync -a
    copy of the dataset keeps the same fingerprint). A function of index.csv's bytes: the same index, the same one."""
    return common.files_digest((p, *index.stats[p]) for p in index.paths)


def _parse_index(path: Path) -> Index:
    data = path.read_bytes()
    text = data.decode()
    lines = text.split("\n")
    if '"' not in text and lines[0] == ",".join(INDEX_COLUMNS) and lines[-1] == "":  # nothing quoted: split by hand
        fields = [line.split(",") for line in lines[1:-1]]  # what csv.reader would give, without its cost per field
    else:
        fields = list(csv.reader(io.StringIO(text)))[1:]
    if any(len(f) != len(INDEX_COLUMNS) for f in fields):  # (an edited row number: the checksum differs, see problems)
        raise ValueError(f"{path}: a row without {len(INDEX_COLUMNS)} fields")
    stats = {f[1]: (int(f[5]), int(f[6])) for f in fields}
    return Index([f[1] for f in fields], stats, hashlib.sha256(data).hexdigest())


def read_index(cache_dir: Path) -> Index:
    """A cache's index.csv, parsed once per process while the file is unchanged (common.parsed_once): the reuse
    check, the training and the validation datasets each read it. The Index is shared: never change it."""
    return common.parsed_once(cache_dir / INDEX, _parse_index)


# ----------------------------------------------------------------------------------------------- meta
def read_meta(cache_dir: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((cache_dir / META).read_text())
        return meta if isinstance(meta, dict) else None
    return None


def write_meta(cache_dir: Path, meta: dict) -> None:
    common.atomic_write_text(cache_dir / META, json.dumps(meta, indent=1) + "\n")


def problems(cache_dir: Path, meta: dict | None) -> list[str]:
    """Why this cache cannot be read as it is (empty list: complete and verified)."""
    if meta is None:
        return [f"no readable {META}"]
    if meta.get("version") != VERSION:
        return [f"written by another patch_cache version ({meta.get('version')}, expected {VERSION})"]
    if meta.get("complete") is not True:
        return ["incomplete (a build was interrupted or is running)"]
    out = []
    try:
        index = read_index(cache_dir)
    except (OSError, ValueError, KeyError) as e:
        return [f"unreadable {INDEX} ({type(e).__name__})"]
    if index.sha256 != meta.get("index_sha256"):
        out.append(f"{INDEX} checksum differs from {META} (edited or corrupted)")
    if len(index) != meta.get("count"):
        out.append(f"{INDEX} has {len(index)} rows, {META} says {meta.get('count')}")
    want = meta.get("count", -1) * 3 * meta.get("image_size", 0) ** 2
    have = (cache_dir / PATCHES).stat().st_size if (cache_dir / PATCHES).is_file() else None
    if have != want:
        out.append(f"{PATCHES} holds {have} bytes, expected {want}")
    return out


# ----------------------------------------------------------------------------------------------- dataset
class CachedPatchDataset:
    """PatchDataset's items `(uint8 (3, H, W) tensor, label, idx)` read from a packed cache; label from `samples`.

    `root` (optional, recommended) re-checks each sample's source file size and mtime against the index, so a
    cache older than its PNGs is refused. The memmap is opened lazily in each process (fork/pickle safe)."""

    def __init__(self, cache_dir, samples, image_size: int, root=None, skip_bad: bool = False, stats=None):
        self.cache_dir, self.samples, self.image_size, self.skip_bad = Path(cache_dir), list(samples), image_size, skip_bad
        meta = read_meta(self.cache_dir)
        bad = problems(self.cache_dir, meta)
        if bad:
            raise DataError(f"--cache {self.cache_dir}: {bad[0]}; run patch_cache.py --out on it "
                            f"(an interrupted build resumes)")
        if meta["image_size"] != image_size:
            raise DataError(f"--cache {self.cache_dir}: holds {meta['image_size']}px patches, not {image_size}px; "
                            f"use a cache built with --image-size {image_size}")
        index = read_index(self.cache_dir)
        row_of = index.row_of
        missing = [s.path for s in self.samples if s.path not in row_of]
        if missing:
            raise DataError(f"--cache {self.cache_dir}: lacks {len(missing)} sample(s), e.g. {missing[0]}; "
                            f"it was built from another data root or file set: rebuild it")
        if root is not None:  # stats: HelicoData.file_stats, the scan's own (no stat per file here)
            now = lambda p: (stats or {}).get(p) or common.size_mtime_or_none(Path(root) / p)
            changed = [s.path for s in self.samples if now(s.path) != index.stats[s.path]]
            if changed:
                raise DataError(f"--cache {self.cache_dir}: stale: {len(changed)} source file(s) changed since it "
                                f"was built, e.g. {changed[0]}; rebuild it (prepare does so automatically)")
        self.rows = np.array([row_of[s.path] for s in self.samples], dtype=np.int64)
        self.bad = np.isin(self.rows, np.array(meta.get("bad_rows", []), dtype=np.int64))
        self.count, self.meta = meta["count"], meta
        self.normalized = bool(meta.get("normalized"))
        self.stain = staining.stain_from_meta(meta)
        self.reference = meta["stain"]["reference"] if self.normalized else None
        self._mm, self._pid = None, None

    def __len__(self):
        return len(self.samples)

    def _patches(self):
        if self._mm is None or self._pid != os.getpid():  # a forked worker maps the file itself
            s = self.image_size
            self._mm = np.memmap(self.cache_dir / PATCHES, np.uint8, "r", shape=(self.count, 3, s, s))
            self._pid = os.getpid()
        return self._mm

    def __getstate__(self):
        return {**self.__dict__, "_mm": None, "_pid": None}

    def __getitem__(self, idx: int):
        return self.__getitems__([idx])[0]

    def __getitems__(self, indices):
        """A whole batch in one gather from the memmap (DataLoader calls this with the batch's indices)."""
        indices = list(indices)
        if self.bad[indices].any():
            self._bad_rows(indices)
        images = torch.from_numpy(self._patches()[self.rows[indices]])  # fancy indexing copies: no mmap views escape
        out = []
        for k, i in enumerate(indices):
            label = common.BAD if self.bad[i] else self.samples[i].label
            out.append((images[k], label, i))
        return out

    def _bad_rows(self, indices):
        first = next(i for i in indices if self.bad[i])
        if not self.skip_bad:
            raise DataError(f"{self.samples[first].path}: unreadable image (recorded when the cache "
                            f"{self.cache_dir} was built); pass --skip-bad-images to skip and list it")


# ----------------------------------------------------------------------------------------------- build
def wanted_meta(index: Index, image_size: int, stain: dict | None, root: Path, old: dict | None = None) -> dict:
    """The meta.json a finished cache of this index must carry (with "complete" still false). `old` (the meta on
    disk) lends its fingerprint when its index is this one: the fingerprint is a function of the index."""
    same_index = old is not None and old.get("version") == VERSION and old.get("index_sha256") == index.sha256
    return {"version": VERSION, "image_size": image_size, "count": len(index), "dtype": "uint8",
            "shape": [len(index), 3, image_size, image_size], "layout": "NCHW C-order, row = index row",
            "normalized": stain is not None, "stain": stain, "index_sha256": index.sha256,
            "fingerprint": old["fingerprint"] if same_index and "fingerprint" in old else fingerprint(index),
            "chunk_rows": CHUNK_ROWS, "data_root": str(root.absolute()), "complete": False}


SAME_BUILD = ("version", "image_size", "count", "normalized", "index_sha256", "fingerprint", "chunk_rows")


def rebuild_reason(cache_dir: Path, old: dict | None, want: dict, index: Index) -> str | None:
    """Why the cache on disk cannot be reused or resumed for `want` (None: it can)."""
    if old is None:
        return "no cache yet" if not (cache_dir / PATCHES).exists() else f"no readable {META}"
    if old.get("version") == VERSION and old.get("fingerprint") != want["fingerprint"]:
        return "source files changed (" + _changes(cache_dir, index) + ")"
    for key in SAME_BUILD:
        if old.get(key) != want[key]:
            return f"{key} differs (cache {old.get(key)!r}, wanted {want[key]!r})"
    if want["normalized"] and staining.stain_key(old["stain"]) != staining.stain_key(want["stain"]):
        return f"built with another stain reference or normalizer settings ({old['stain']['reference']})"
    if old.get("complete"):
        bad = problems(cache_dir, old)
        return f"verification failed: {bad[0]}" if bad else None
    return None if _resumable(cache_dir, old) else "interrupted build cannot be resumed (files missing or resized)"


def _changes(cache_dir: Path, index: Index) -> str:
    try:
        old = read_index(cache_dir).stats
    except (OSError, ValueError, KeyError):
        return "old index unreadable"
    new = index.stats
    changed = sum(1 for p in new if p in old and old[p] != new[p])
    return f"{len(new.keys() - old.keys())} added, {len(old.keys() - new.keys())} removed, {changed} modified"


def _resumable(cache_dir: Path, meta: dict) -> bool:
    n_chunks = -(-meta["count"] // meta["chunk_rows"])
    try:
        sizes = (cache_dir / PATCHES).stat().st_size, (cache_dir / PROGRESS).stat().st_size
        digest = read_index(cache_dir).sha256
    except (OSError, ValueError, KeyError):
        return False
    return sizes == (meta["count"] * 3 * meta["image_size"] ** 2, n_chunks) and digest == meta["index_sha256"]


def start_fresh(cache_dir: Path, index_csv: bytes, want: dict) -> None:
    """Lay out an empty cache; meta (complete=false) goes first so no reader trusts what follows."""
    need = want["count"] * 3 * want["image_size"] ** 2
    old = (cache_dir / PATCHES).stat().st_blocks * 512 if (cache_dir / PATCHES).exists() else 0
    free = shutil.disk_usage(cache_dir).free
    if need > free + old:
        raise DataError(f"--out {cache_dir}: the cache needs {need / 1e9:.1f} GB, only {(free + old) / 1e9:.1f} GB "
                        f"free there; choose a disk with room (node-local scratch) or a smaller --image-size")
    write_meta(cache_dir, want)
    common.atomic_write_text(cache_dir / INDEX, index_csv.decode())
    common.atomic_write_text(cache_dir / BAD_ROWS, "")
    with open(cache_dir / PATCHES, "wb") as f:
        f.truncate(need)  # sparse: every chunk writes its own rows
    with common.atomic_path(cache_dir / PROGRESS) as tmp:
        tmp.write_bytes(bytes(-(-want["count"] // CHUNK_ROWS)))


def decode_chunk(dataset, lo: int, hi: int, fd: int, row_bytes: int) -> list[int]:
    """Decode rows lo..hi-1 exactly as PatchDataset does and write them at their offset; returns bad rows."""
    block = np.empty((hi - lo, row_bytes), dtype=np.uint8)
    bad = []
    for k, r in enumerate(range(lo, hi)):
        image, label, _ = dataset[r]
        block[k] = image.numpy().reshape(-1)
        if label == common.BAD:
            bad.append(r)
    os.pwrite(fd, block.data, lo * row_bytes)
    return bad


def normalize_chunk(normalizer, fd: int, lo: int, hi: int, size: int, bad) -> None:
    """Read back decoded rows, Macenko-normalize them in one batch on the normalizer's device, store uint8 levels
    (the normalizer's output is level/255, so nothing is lost). Undecodable rows stay zero."""
    row_bytes = 3 * size * size
    raw = np.frombuffer(os.pread(fd, (hi - lo) * row_bytes, lo * row_bytes), np.uint8).reshape(hi - lo, 3, size, size)
    keep = [k for k in range(hi - lo) if lo + k not in bad]
    out = raw.copy()
    if keep:
        x = torch.from_numpy(raw[keep]).to(normalizer.device)
        out[keep] = normalizer.normalize(x).mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
    os.pwrite(fd, out.data, lo * row_bytes)


def build_cache(data, cache_dir, image_size: int = 256, workers: int = 4, normalized: bool = False,
                reference=None, device=None, progress: bool = True, samples=None, on_chunk=None,
                rebuild: bool = True) -> dict:
    """Build, resume or reuse the cache of `samples` (default data.all_samples()); returns a report dict.

    rebuild=False refuses (DataError) a folder holding a cache that would have to be rebuilt (another size, kind,
    sample set or stale PNGs): for callers that did not create it (tools/bench.py). An empty folder is still built and an
    interrupted build still resumes. on_chunk(chunk, built, todo) runs after each chunk is recorded (tests interrupt
    a build by raising in it)."""
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {cache_dir}: cannot create the cache folder ({e.strerror})") from None
    root = Path(data.root)
    samples = unique_samples(data.all_samples() if samples is None else samples)
    if not samples:
        raise DataError(f"--data-root {root}: no patches to cache")
    index, index_csv = index_of(root, samples, data.file_stats)
    normalizer = stain = None
    if normalized:
        normalizer, stain = staining.fitted_record(root, reference or staining.DEFAULT_REFERENCE,
                                                  common.resolve_device(device))
    t0 = time.perf_counter()
    with _locked(cache_dir):
        old = read_meta(cache_dir)
        want = wanted_meta(index, image_size, stain, root, old)
        with contextlib.suppress(OSError):  # an index.csv of exactly these rows: its readers take this Index
            if common.file_sha256(cache_dir / INDEX) == index.sha256:  # (a parse: ~0.3 s at 220k rows)
                common.remember_parsed(cache_dir / INDEX, _parse_index, index)
        reason = rebuild_reason(cache_dir, old, want, index)
        if reason is None and old.get("complete"):
            return {"cache": str(cache_dir), "action": "reused", "count": len(index), "chunks_built": 0,
                    "undecodable": [index.paths[r] for r in old.get("bad_rows", [])],
                    "chunks": -(-len(index) // CHUNK_ROWS), "seconds": time.perf_counter() - t0}
        if reason is not None and reason != "no cache yet" and not rebuild:
            raise DataError(f"--cache {cache_dir}: {reason}; not rebuilding a cache this command did not create "
                            f"(give an empty folder, or this cache's own settings)")
        if reason is not None:
            if reason != "no cache yet":
                print(f"patch_cache: rebuilding {cache_dir}: {reason}", file=sys.stderr)
            start_fresh(cache_dir, index_csv, want)
        built = _fill(cache_dir, root, samples, image_size, workers, normalizer, progress, on_chunk)
        undecodable = [index.paths[r] for r in _finish(cache_dir, want)]
    for path in undecodable:  # once, when built: every decode happens here, so this is where they are found
        print(f"warning: undecodable {root / path}: stored as zeros; training stops at it unless --skip-bad-images",
              file=sys.stderr)
    return {"cache": str(cache_dir), "action": "built" if reason else "resumed", "count": len(index),
            "chunks_built": built, "chunks": -(-len(index) // CHUNK_ROWS), "seconds": time.perf_counter() - t0,
            "undecodable": undecodable}


def _fill(cache_dir, root, samples, size, workers, normalizer, progress, on_chunk) -> int:
    """Decode every unfinished chunk with `workers` threads (PIL releases the GIL while decoding and resizing);
    this thread normalizes (if asked) and records each finished chunk; `samples` in row order. Returns the number of chunks built."""
    dataset = common.PatchDataset(root, samples, size, skip_bad=True)
    n_chunks, row_bytes = -(-len(samples) // CHUNK_ROWS), 3 * size * size
    span = lambda c: (c * CHUNK_ROWS, min((c + 1) * CHUNK_ROWS, len(samples)))
    fd, pfd = os.open(cache_dir / PATCHES, os.O_RDWR), os.open(cache_dir / PROGRESS, os.O_RDWR)
    done = os.pread(pfd, n_chunks, 0)
    todo = [c for c in range(n_chunks) if not done[c]]
    bar = tqdm(total=len(samples), initial=len(samples) - sum(span(c)[1] - span(c)[0] for c in todo),
               desc=f"caching {size}px", unit="patch", disable=not progress, smoothing=0.05,
               mininterval=1 if sys.stderr.isatty() else 30)  # a SLURM log gets a line every 30 s, not every second
    built = 0
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool, open(cache_dir / BAD_ROWS, "a") as bad_file:
            # at most 2 x workers chunks in flight: waiting on every queued chunk at each finish is quadratic
            queue_ = iter(todo)
            submit = lambda n: {pool.submit(decode_chunk, dataset, *span(c), fd, row_bytes): c
                                for c in itertools.islice(queue_, n)}
            pending = submit(2 * max(1, workers))
            try:
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    pending.update(submit(len(finished)))
                    for future in finished:
                        c, bad = pending.pop(future), future.result()
                        if normalizer is not None:
                            normalize_chunk(normalizer, fd, *span(c), size, set(bad))
                        bad_file.write("".join(f"{r}\n" for r in bad))
                        bad_file.flush()
                        os.pwrite(pfd, b"\x01", c)  # recorded only once its rows (and bad rows) are written
                        built += 1
                        bar.update(span(c)[1] - span(c)[0])
                        if on_chunk is not None:
                            on_chunk(c, built, len(todo))
            finally:
                for future in pending:
                    future.cancel()  # interrupted: queued chunks never start, running ones end unrecorded
    finally:
        bar.close()
        os.close(fd)
        os.close(pfd)
    return built


def _finish(cache_dir: Path, want: dict) -> list[int]:
    """Verify (every chunk recorded, count, size, index checksum), then write meta with complete=true, last."""
    n_chunks = -(-want["count"] // CHUNK_ROWS)
    progress = (cache_dir / PROGRESS).read_bytes()
    if progress != b"\x01" * n_chunks:
        raise DataError(f"--out {cache_dir}: {n_chunks - progress.count(1)} chunk(s) unfinished after the build")
    bad_rows = sorted({int(line) for line in (cache_dir / BAD_ROWS).read_text().split()})
    meta = {**want, "bad_rows": bad_rows, "complete": True}
    bad = problems(cache_dir, meta)
    if bad:
        raise DataError(f"--out {cache_dir}: verification failed: {bad[0]}")
    write_meta(cache_dir, meta)  # from here on readers trust the cache
    return bad_rows


@contextlib.contextmanager
def _locked(cache_dir: Path):
    with open(cache_dir / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a second builder waits here, then finds the cache complete; close unlocks
        yield


# ----------------------------------------------------------------------------------------------- entry points
def prepare(cache_dir, data, image_size: int, workers: int, normalized: bool | None = None,
            reference=None, device=None) -> Path:
    """The one entry point of train.py, evaluate.py and the launcher's `--cache DIR`: build, resume or reuse the
    cache of every patch of `data` (build_cache), with one-line errors naming --cache; returns DIR.

    It refreshes a cache whose PNGs changed, but never turns a finished cache into another kind (size,
    normalization, stain reference): a job on this node may be reading it, and a rebuild truncates patches.u8
    under it. normalized=None (evaluate.py) takes the kind a finished cache in DIR already has."""
    where = Path(cache_dir)
    if where.exists() and not where.is_dir():
        raise DataError(f"--cache {where}: not a directory (give a folder for the packed patch cache)")
    meta = read_meta(where) or {}
    done = meta.get("complete") is True and meta.get("version") == VERSION
    if normalized is None:  # an interrupted build of either kind resumes as that kind
        normalized = bool(meta.get("normalized")) and meta.get("version") == VERSION
        reference = meta["stain"]["reference"] if normalized else None
    kind = lambda size, norm, ref: f"{size}px " + (f"patches Macenko-normalized to {ref}" if norm else "plain patches")
    have = kind(meta.get("image_size"), meta.get("normalized"), (meta.get("stain") or {}).get("reference"))
    given = " ".join(staining.reference_list(reference or staining.DEFAULT_REFERENCE))  # as meta.json spells it
    if done and have != kind(image_size, normalized, given):
        raise DataError(f"--cache {where}: holds {have}, but this run needs {kind(image_size, normalized, given)}; "
                        f"give another folder (or delete this one to rebuild it)")
    try:
        build_cache(data, where, image_size, workers, normalized, reference, device)
        return where
    except OSError as e:
        if e.errno in common.FAULTS:  # the disk failed the build, not the user: exit 5, and --cache-base falls back
            raise common.disk_fault(where, common.FAULTS[e.errno], "the patch cache") from None
        raise DataError(f"--cache {where}: {e.strerror or e}") from None


def cache_folder(base, image_size: int, normalized: bool, reference) -> Path:
    """The folder under `base` (train.py and evaluate.py --cache-base) for a cache of this kind: cache<size>, or
    cache<size>-macenko-<digest of the reference as given> when it holds Macenko's output, so jobs with another
    size or stain reference on a node use their own folder (prepare refuses to turn a finished cache into another
    kind)."""
    name = f"cache{image_size}"
    if normalized:
        given = " ".join(staining.reference_list(reference or staining.DEFAULT_REFERENCE))
        name += f"-macenko-{hashlib.sha1(given.encode()).hexdigest()[:10]}"
    return Path(base).absolute() / name


def prepare_in(base, data, image_size: int, workers: int, normalized: bool, reference,
               device=None) -> Path | None:
    """--cache-base: prepare the folder cache_folder names under `base`, or None when the disk fails there (no room
    for ~43 GB on a node costs speed, not the run), after one warning line: the caller then decodes PNGs."""
    folder = cache_folder(base, image_size, normalized, reference)
    try:
        return prepare(folder, data, image_size, workers, normalized, reference, device)
    except common.EnvironmentFault as e:
        print(f"warning: --cache-base {base}: {e.reason} while building {folder}; decoding PNGs instead (slower)",
              file=sys.stderr)
        return None


def for_checkpoint(ckpt: dict, data, device, workers: int, cache=None, cache_base=None) -> str | None:
    """The cache a trained checkpoint's patches are read from after training (evaluate.py, train_patient.py), built
    or checked once: `cache` (strict), or the folder train.py --cache-base names for it (the kind it trained from;
    after a PNG fallback, the kind it would have built), None with a warning when the disk fails there; None
    without either."""
    size = int(ckpt["image_size"])
    if cache:
        prepare(cache, data, size, workers, device=device)
        return str(cache)
    if cache_base:
        config = ckpt["config"]
        normalized = config["cache_normalized"] if config.get("cache") else config["macenko"]
        folder = prepare_in(cache_base, data, size, workers, normalized, config["reference_patch"], device)
        return None if folder is None else str(folder)
    return None


def holds_plain(cache_dir, image_size: int) -> bool:
    """Whether `cache_dir` holds a finished plain (not normalized) cache of `image_size` px: train.py then keeps
    using it (Macenko on the device, same pixels) instead of refusing it for its default --cache-normalized."""
    meta = read_meta(Path(cache_dir)) or {}
    return (meta.get("complete") is True and meta.get("version") == VERSION and not meta.get("normalized")
            and meta.get("image_size") == image_size)


def patch_dataset(root, samples, image_size: int, skip_bad: bool = False, cache=None, stats=None):
    """(uint8 image, label, index) items of `samples`: decoded PNGs, or with a prepared cache the same bytes from it
    (stats: HelicoData.file_stats, to check it is not stale without a stat per file)."""
    if cache is None:
        return common.PatchDataset(root, samples, image_size, skip_bad)
    return CachedPatchDataset(cache, samples, image_size, root=root, skip_bad=skip_bad, stats=stats)


def cache_bytes(cache_dir) -> int:
    """Bytes the cache's own files occupy on disk (allocated blocks, not apparent size)."""
    return sum((Path(cache_dir) / f).stat().st_blocks * 512 for f in (PATCHES, INDEX, META, PROGRESS, BAD_ROWS)
               if (Path(cache_dir) / f).exists())
