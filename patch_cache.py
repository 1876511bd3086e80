"""Build (or resume, or check) the packed patch cache by hand: every patch decoded once into a uint8 memmap.

Usage:
    python patch_cache.py --data-root HelicoDataSet --out /local/cache256 --workers 16
    python patch_cache.py --data-root HelicoDataSet --out /local/cache256n --normalized      # Macenko pre-applied

train.py and evaluate.py build the same cache themselves with --cache DIR; run this to build it ahead of a job
or on another node. What the folder holds, and when it is rebuilt: helico/packed_cache.py.

Exit codes: 0 built or reused (undecodable PNGs are named on stderr, stored as zeros), 2 bad input (missing data
root, bad reference, too little free space for the cache before it starts), 4 stopped by Ctrl-C (rerun the same
command to resume), 5 the disk filled up or failed during the build (free space, rerun to resume).
"""
from __future__ import annotations

import argparse
import os
import sys

import common
from common import DataError
from helico import packed_cache, staining


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter,
                                epilog="Rerunning the same command resumes an interrupted build and only checks a "
                                       "finished one; it rebuilds by itself when the PNGs changed.",
                                allow_abbrev=False)
    p.add_argument("--data-root", default=os.environ.get("HELICO_DATA"),
                   help="HelicoDataSet folder (default $HELICO_DATA); stage it to node-local disk first on a cluster")
    p.add_argument("--out", required=True, metavar="CACHE_DIR",
                   help="cache folder, ideally on node-local scratch (~0.2 MB per 256px patch, ~43 GB for the full "
                        "dataset); only the cache's own files are ever written or deleted there")
    p.add_argument("--image-size", type=int, default=256, help="side in pixels; must equal train.py's --image-size "
                   "(patches of another size are resized exactly as PatchDataset does)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: all CPU cores of this job)")
    p.add_argument("--normalized", action="store_true", help="store patches already Macenko-normalized, so "
                   "training skips the normalizer (it is recorded in meta.json; a GPU makes this fast)")
    staining.add_reference_argument(p, "for --normalized; use the same one train.py uses")
    common.add_device_flag(p, what="where --normalized runs Macenko")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.data_root:
        print("error: --data-root is required (or set HELICO_DATA)", file=sys.stderr)
        return common.EXIT_BAD_INPUT
    if args.image_size < 8:
        print(f"error: --image-size {args.image_size}: must be at least 8", file=sys.stderr)
        return common.EXIT_BAD_INPUT
    workers = args.workers or len(os.sched_getaffinity(0))
    try:
        report = packed_cache.build_cache(common.load_data(args.data_root), args.out, args.image_size, workers,
                                          args.normalized, args.reference_patch, args.device, progress=not args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return common.EXIT_BAD_INPUT
    except (OSError, common.EnvironmentFault) as e:  # a disk filling up or failing mid-build
        if isinstance(e, OSError) and e.errno not in common.FAULTS:
            return common.unexpected_fault(e)
        why = str(e) if isinstance(e, common.EnvironmentFault) else common.FAULTS[e.errno]
        print(f"error: --out {args.out}: {why}; free space there (or check that disk), then run the same command "
              f"again to resume the build", file=sys.stderr)
        return common.EXIT_ENVIRONMENT
    except ImportError as e:
        return common.unexpected_fault(e)
    except KeyboardInterrupt:
        print(f"stopped by Ctrl-C: {args.out} is incomplete and will not be used; rerun the same command to resume",
              file=sys.stderr)
        return common.EXIT_STOPPED
    rate = report["count"] / report["seconds"] if report["action"] != "reused" and report["seconds"] else None
    print(f"{report['action']} {args.out}: {report['count']} patches of {args.image_size}px"
          f"{', Macenko-normalized' if args.normalized else ''}, "
          f"{packed_cache.cache_bytes(args.out) / 1e9:.2f} GB on disk"
          + (f", {report['chunks_built']}/{report['chunks']} chunks in {report['seconds']:.1f} s "
             f"({rate:.0f} patches/s)" if rate else ""))
    return common.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
