"""What every job pays before it trains, at the real dataset's folder counts: the audit (first run and again),
train.py's start-up and evaluate.py's, with their os.stat calls and peak memory.

Usage:
    python tools/bench_startup.py --root /tmp/helico-full --make            # write the dataset (~2 min), then measure
    python tools/bench_startup.py --root /tmp/helico-alike --make --look-alike --measures audit_first,audit_again
    python tools/bench_startup.py --root /tmp/helico-full --json startup.json

The dataset (--make): make_demo_data.py's layout and traps with the real patient counts (147 CrossValidation, 116
HoldOut patients), every Cropped and HoldOut folder then filled with synthetic patches to the real totals (about
127,841 Cropped and 88,794 HoldOut PNGs; Annotated as the demo writes them), all --patch-size px (default 64: real
256 px PNGs take ~1.1 ms each to decode, these far less, so decoding's share is smaller here than on real data).
--look-alike fills them with look-alike patches instead: half flat colors (blank and background tiles), half one
pattern over a color offset (one perceptual hash for all, not a blank tile);
--scale writes a fraction of the totals at the same folder counts.
Each measurement runs in a fresh process (`--measure NAME`), so memory peaks and caches are its own, twice: once
plain for the seconds and the peak memory, once counting (wrapping every os.stat and directory entry costs ~1 s at
218k files, so counted runs are not timed):
    audit_first    audit_leakage.py with empty hash and decode caches
    audit_again    the same command again: what every job start and requeue pays
    train_startup  train.py --cache (built beforehand by patch_cache.py) from process start to its first step, as a
                   new run: its stain survey read from the memo an earlier run on these files left (a resumed run
                   skips the survey)
    train_startup_first  the same with no survey memo: the first new run on a dataset (or after a surveyed patch
                   changed)
    eval_startup   evaluate.py --cache of a checkpoint, from process start to its first scored batch
Printed: seconds, stat calls (os.stat, Path.stat and a directory entry's stat(); is_file() on an entry costs
none), opens of each .json/.csv/.tsv index file, peak RSS. Exit codes: 0 measured, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the workflow's commands and modules, one folder up
sys.path.insert(0, str(REPO))
import common  # torch-free: what start-up costs is measured in the processes this one starts

START = time.perf_counter()
REAL = {"cv_patients": 147, "holdout_patients": 116, "cropped": 127_841, "holdout": 88_794}
MEASURES = ("audit_first", "audit_again", "train_startup", "train_startup_first", "eval_startup")


class Reached(Exception):
    """Raised where a start-up measurement ends (the first training step, the first scored batch)."""


# ----------------------------------------------------------------------------------------------- the dataset
def fill_folder(args) -> int:
    """Add synthetic PNGs to one folder until it holds `target`, numbered after the folder's highest window
    (Cropped/HoldOut names are not zero-padded): unique noise over a pale background, or with `look_alike` patches
    that look alike but are never byte-identical (`first` numbers them in the dataset): every other one a flat color
    (a blank or background tile), the rest one block pattern over a color offset (one perceptual hash for all)."""
    import numpy as np
    from PIL import Image
    folder, target, size, seed, look_alike, first = args
    folder = Path(folder)
    have = sorted(int(p.stem.split("_")[0]) for p in folder.glob("*.png"))
    rng = np.random.default_rng(seed)
    number = (have[-1] if have else 0) + 1
    blocks = np.random.default_rng(0).integers(40, 141, (8, 9, 1), dtype=np.uint8)
    pattern = np.asarray(Image.fromarray(np.repeat(blocks, 3, axis=2)).resize((size, size), Image.NEAREST))
    for k in range(max(0, target - len(have))):
        unique = first + k  # spelt in the color, so no two files of the dataset are alike byte for byte
        if look_alike and unique % 2:
            offset = np.array([unique // 2 // 116 ** c % 116 for c in range(3)], dtype=np.uint8)
            pixels = pattern + offset
        elif look_alike:
            pixels = np.broadcast_to(np.frombuffer(unique.to_bytes(4, "big")[1:], dtype=np.uint8), (size, size, 3))
        else:
            pixels = (220 - rng.integers(0, 90, (size, size, 3))).astype(np.uint8)
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{number}.png", compress_level=1)
        number += 1
    return max(0, target - len(have))


def make_dataset(root: Path, size: int, workers: int, look_alike: bool = False, scale: float = 1.0) -> dict:
    from concurrent.futures import ProcessPoolExecutor
    subprocess.run([sys.executable, str(REPO / "make_demo_data.py"), str(root), "--seed", "0",
                    "--patients", str(REAL["cv_patients"]), "--holdout-patients", str(REAL["holdout_patients"]),
                    "--patch-size", str(size), "--force"], check=True)
    jobs, first = [], 1  # first: the number of a folder's first flat color, so that no two files share one
    for tree, total in (("CrossValidation/Cropped", REAL["cropped"]), ("HoldOut", REAL["holdout"])):
        folders = sorted(p for p in (root / tree).iterdir() if p.is_dir())
        per = -(-round(total * scale) // len(folders))
        for f in folders:  # unique pixels
            jobs.append((str(f), per, size, zlib.crc32(f"{tree}/{f.name}".encode()), look_alike, first))
            first += per
    with ProcessPoolExecutor(workers) as pool:
        added = sum(pool.map(fill_folder, jobs, chunksize=4))
    return {"added": added, "look_alike": look_alike, **counts(root)}


def counts(root: Path) -> dict:
    return {tree: sum(1 for _ in (root / path).rglob("*.png")) for tree, path in
            (("annotated", "CrossValidation/Annotated"), ("cropped", "CrossValidation/Cropped"), ("holdout", "HoldOut"))}


# ----------------------------------------------------------------------------------------------- one measurement
def counting_stats() -> dict:
    """Count os.stat calls (Path.stat goes through it) and opens of index files from here on."""
    import builtins
    tally = {"stat": 0, "opens": {}}
    real_stat, real_open = os.stat, builtins.open

    def stat(*a, **kw):
        tally["stat"] += 1
        return real_stat(*a, **kw)

    def opened(file, *a, **kw):
        name = Path(str(file)).name if isinstance(file, (str, os.PathLike)) else None
        if name and (name.endswith(".json") or name.endswith(".csv") or name.endswith(".tsv")):
            tally["opens"][name] = tally["opens"].get(name, 0) + 1
        return real_open(file, *a, **kw)
    class Entry:  # a directory entry whose stat() is counted too (the scan's one stat per file)
        def __init__(self, entry):
            self._entry = entry

        def __getattr__(self, name):
            return getattr(self._entry, name)

        def stat(self, *a, **kw):
            tally["stat"] += 1
            return self._entry.stat(*a, **kw)

    class Scan:
        def __init__(self, it):
            self._it = it

        def __iter__(self):
            return (Entry(e) for e in self._it)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._it.close()

    import io
    real_scandir = os.scandir
    os.stat, builtins.open, io.open = stat, opened, opened  # io.open: Path.read_text and Path.open
    os.scandir = lambda *a, **kw: Scan(real_scandir(*a, **kw))
    return tally


def measure(name: str, root: str, work: str, size: int, count: bool) -> dict:
    tally = counting_stats() if count else None
    work_dir = Path(work)
    # every command uses its default hash and decode caches, under the work folder (environment: XDG_CACHE_HOME)
    if name.startswith("audit"):
        import audit_leakage
        code = audit_leakage.main(["--data-root", root, "--no-progress", "--patch-size", str(size), "--json",
                                   str(work_dir / f"{name}.json")])
    elif name.startswith("train_startup"):
        import train

        def reached(self):
            raise Reached
        train.Trainer.train_epoch = reached
        try:
            code = train.main(["--data-root", root, "--runs-dir", str(work_dir / "runs"), "--run-id", "startup",
                               "--device", "cpu", "--image-size", "32", "--workers", "0", "--weights", "none",
                               "--cache", str(work_dir / "cache"), "--force"])
        except Reached:
            code = 0
    else:
        import evaluate
        from helico import inference

        def reached(*a, **kw):
            raise Reached
        inference.run = reached
        try:
            code = evaluate.main(["--checkpoint", str(work_dir / "ckpt" / "best.pt"), "--data-root", root,
                                  "--device", "cpu", "--cache", str(work_dir / "cache"), "--gradcam", "0",
                                  "--out", str(work_dir / "eval")])
        except Reached:
            code = 0
    if count:
        return {"measure": name, "exit": code, "stat_calls": tally["stat"], "index_opens": tally["opens"]}
    return {"measure": name, "exit": code, "seconds": round(time.perf_counter() - START, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def environment(work: Path) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(work / "xdg")}


def run_measure(name: str, root: Path, work: Path, size: int, counted: bool = True, code: str | None = None) -> dict:
    """The plain run's seconds and peak memory, then (`counted`) the counting run's stat calls and index opens;
    `code`: the checkout whose commands are measured (default this one)."""
    result = {}
    for count in (False, True) if counted else (False,):
        if name == "audit_first":  # no hash or decode cache of this root yet, for either run
            shutil.rmtree(work / "xdg", ignore_errors=True)
        if name.startswith("train_startup"):  # a new run each time
            shutil.rmtree(work / "runs" / "startup", ignore_errors=True)
        if name == "train_startup_first":  # ... that surveys the slides' stain, as a first run on the data does
            for memo in (work / "xdg").rglob("*.survey.json"):
                memo.unlink()
        done = subprocess.run([sys.executable, __file__, "--root", str(root), "--work", str(work), "--measure", name,
                               "--patch-size", str(size), *(["--count"] if count else []),
                               *(["--code", code] if code else [])], capture_output=True,
                              text=True, env=environment(work))
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return result


def prepare(root: Path, work: Path) -> None:
    """A packed cache for the start-up runs and a checkpoint for evaluate.py (a 1-epoch run on 64 patches)."""
    if not (work / "cache" / "meta.json").is_file():
        subprocess.run([sys.executable, "patch_cache.py", "--data-root", str(root), "--out", str(work / "cache"),
                        "--image-size", "32", "--quiet"], check=True, cwd=REPO)
    if not (work / "ckpt" / "best.pt").is_file():
        subprocess.run([sys.executable, "train.py", "--data-root", str(root), "--runs-dir", str(work), "--run-id",
                        "ckpt", "--device", "cpu", "--image-size", "32", "--epochs", "1", "--limit-samples", "64",
                        "--weights", "none", "--workers", "0", "--cache", str(work / "cache")], check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL, env=environment(work))


def get_args_parser():
    p = argparse.ArgumentParser(description="Start-up costs at the real dataset's folder counts (a table; "
                                "--make writes the dataset first).", allow_abbrev=False,
                                formatter_class=common.HelpFormatter,
                                epilog="exit codes: 0 measured, 2 bad input")
    p.add_argument("--root", required=True, help="the generated dataset's folder (written with --make)")
    p.add_argument("--make", action="store_true", help="write the dataset at --root first (replaces it)")
    p.add_argument("--look-alike", action="store_true", help="with --make: fill the Cropped and HoldOut folders with "
                   "patches that look alike, never two byte-identical: half flat colors (blank tiles), half one "
                   "pattern over a color offset (one perceptual hash for all): the audit's near-duplicate search at "
                   "its worst (default: distinct noise patches)")
    p.add_argument("--scale", type=float, default=1.0, help="with --make: this fraction of the real Cropped and "
                   "HoldOut totals, at the real folder counts (default 1.0: about 233k PNGs in all)")
    p.add_argument("--patch-size", type=int, default=64, help="side of the generated patches in px (make_demo_data.py's minimum)")
    p.add_argument("--work", help="caches, runs and reports of the measurements (default ROOT.work)")
    p.add_argument("--measures", default=",".join(MEASURES), help=f"comma-separated subset of {','.join(MEASURES)}")
    p.add_argument("--json", metavar="OUT", help="also write the results here")
    p.add_argument("--no-count", action="store_true", help="seconds and peak memory only: skip each measurement's "
                   "second, counting run (stat calls, index opens), which doubles the time")
    p.add_argument("--code", metavar="DIR", help="measure the commands of another checkout of the project (say a "
                   "`git worktree` of an earlier commit) with this script: before and after from one tool; it must "
                   "accept the same command lines (default: this checkout)")
    p.add_argument("--measure", choices=MEASURES, help=argparse.SUPPRESS)  # one measurement, in its own process
    p.add_argument("--count", action="store_true", help=argparse.SUPPRESS)  # ... counting stats, not timed
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    root = Path(args.root).absolute()
    work = Path(args.work).absolute() if args.work else root.with_name(root.name + ".work")
    if args.measure:
        if args.code:  # its modules before this checkout's
            sys.path.insert(0, str(Path(args.code).absolute()))
        print(json.dumps(measure(args.measure, str(root), str(work), args.patch_size, args.count)))
        return 0
    if args.make:
        print(json.dumps({"dataset": make_dataset(root, args.patch_size, os.cpu_count() or 1, args.look_alike,
                                                  args.scale)}), flush=True)
    if not (root / "CrossValidation").is_dir():
        print(f"error: --root {root}: no dataset there (add --make)", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in [m for m in args.measures.split(",") if m]:
        if name.startswith("train_startup") or name == "eval_startup":
            prepare(root, work)
        results.append(run_measure(name, root, work, args.patch_size, not args.no_count, args.code))
        print(json.dumps(results[-1]), flush=True)
    print("| measure | seconds | os.stat calls | index files opened | peak RSS (MB) |\n|---|---|---|---|---|")
    for r in results:
        opens = ", ".join(f"{k} x{v}" for k, v in sorted(r.get("index_opens", {}).items()))
        stats = f"{r['stat_calls']:,}" if "stat_calls" in r else "-"
        print(f"| {r['measure']} | {r['seconds']} | {stats} | {opens or '-'} | {r['peak_rss_mb']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": counts(root), "cpus": len(os.sched_getaffinity(0)),
                                               "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
