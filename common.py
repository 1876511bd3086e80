"""The conventions every script shares: bad input and its exit codes, the flags every command spells the same
(--device, --amp/--no-amp, the --help format), the --device rule, atomic file writes.

A top-level module (the design card's): scripts and the helico package import it; it imports nothing of the
project, and not torch at import time (the audit and the launcher's flag check stay fast).

    import common
    device = common.resolve_device("auto")              # cuda when available, else cpu; bad name: DataError
    common.atomic_write_text(run_dir / "split.json", text)  # all or nothing; a full disk: EnvironmentFault

Every bad input raises DataError with a one-line message naming the file, row or flag; scripts turn it into
`error: ...` on stderr and exit code 2 (EXIT_BAD_INPUT). An OSError or ImportError nothing caught becomes one line
and its exit code too (unexpected_fault), so the launcher reads every step from its exit code alone. The dataset
itself (patients, workbook, samples) is helico/helicodata.py.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import itertools
import json
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

# One meaning each, in every script and the launcher (README, "Exit codes"); 128 + N: killed by a second signal N.
EXIT_OK, EXIT_LEAK, EXIT_BAD_INPUT, EXIT_NAN, EXIT_STOPPED, EXIT_ENVIRONMENT = 0, 1, 2, 3, 4, 5


class DataError(Exception):
    """A bad input: the message is one line naming the file, row or flag."""


class EnvironmentFault(Exception):
    """The machine failed the run (no space left, I/O error): one line naming the folder; exit EXIT_ENVIRONMENT.
    `reason` is its FAULTS wording, so a caller can re-word the line for the folder the user knows."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def unexpected_fault(error: OSError | ImportError) -> int:
    """The one line and exit code of an OSError or ImportError that reached a script's main() uncaught, so that exit
    1 keeps meaning what each script documents (a leak, a dependent HoldOut) and never "Python crashed": a disk
    fault (errno in FAULTS) is EXIT_ENVIRONMENT naming the file or folder; another OSError (a missing or unreadable
    file) and a missing module are bad input (EXIT_BAD_INPUT) naming the file or the module."""
    if isinstance(error, ImportError):
        module = error.name or str(error)
        print(f"error: Python module {module} cannot be imported ({error}) by {sys.executable}: install the "
              f"project's requirements (pip install -r requirements.txt) or run the project's interpreter",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    where = error.filename2 or error.filename or "the disk"  # a failed os.replace(tmp, path) names path second
    where = shown_path(where) if where != "the disk" else where  # the folder the user knows, not a temp file
    if error.errno in FAULTS:
        remedy = REMEDIES.get(FAULTS[error.errno], "free space there or check that disk")
        print(f"error: {where}: {FAULTS[error.errno]}; {remedy}, then run the same command again", file=sys.stderr)
        return EXIT_ENVIRONMENT
    print(f"error: {where}: {error.strerror or error}", file=sys.stderr)
    return EXIT_BAD_INPUT


# ----------------------------------------------------------------------------------------------- flags
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every command's --help: each default shown, the description as written. A flag whose default is None says in
    its help what it then does, so "(default: None)", which says nothing, is left out."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def device_flag(text: str) -> str:
    """--device's type in every command: auto, cpu, cuda or cuda:N, checked when parsed (exit 2 naming the flag);
    resolve_device turns it into a device once torch is loaded."""
    if text not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {DEVICE_CHOICES}")
    return text


def add_device_flag(parser, default: str = "auto", what: str = "", note: str = "") -> None:
    """--device, spelled, typed and explained the same in every command; `what` says what runs there, `note` ends
    the help."""
    parser.add_argument("--device", type=device_flag, default=default, metavar="{auto,cpu,cuda,cuda:N}",
                        help=f"{what + ': ' if what else ''}auto (cuda when available, else cpu), cpu, cuda or "
                        f"cuda:N{'; ' + note if note else ''}")


def add_amp_flag(parser, default_means: str, advice: str = "") -> None:
    """--amp/--no-amp in every command: None (not given) is the command's automatic choice, `default_means`;
    `advice` ends the help."""
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision "
                        f"(autocast: bf16 on GPUs of compute capability 8.0+ and on the CPU, else fp16). Default: "
                        f"{default_means}{'. ' + advice if advice else ''}")


# ----------------------------------------------------------------------------------------------- devices
STOPS = (signal.SIGINT, signal.SIGTERM)


def _unwind(signum, frame):
    """Ctrl-C and SIGTERM end a command the same way, unwinding (temp files removed, workers stopped) whatever the
    inherited disposition: a shell script's background job starts with SIGINT ignored. A second signal gets the
    default action: at once."""
    for s in STOPS:
        signal.signal(s, signal.SIG_DFL)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def guarded_main(run, *, kept: str, again: str, cleanup=None, leak=()) -> int:
    """Run a command's body `run()` and turn what ends it into one line and the documented exit code: DataError 2
    (an instance of `leak`: 1), EnvironmentFault and disk faults 5, other OSError and ImportError by unexpected_fault,
    Ctrl-C 130 and SIGTERM 143 (signal handlers installed for the call). `kept` says what survives a stop or fault
    ("no report written (a previous one is kept)"), `again` how to go on ("run the same command again").
    cleanup() runs on every way out (DataLoader workers)."""
    previous = {s: signal.signal(s, _unwind) for s in STOPS}
    try:
        return run()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LEAK if isinstance(e, leak) else EXIT_BAD_INPUT
    except EnvironmentFault as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except OSError as e:  # a disk fault outside the writes that report their own folder (reading data, a checkpoint)
        if e.errno not in FAULTS:
            return unexpected_fault(e)
        where = shown_path(e.filename) if e.filename else "the disk"
        remedy = REMEDIES.get(FAULTS[e.errno], "check that disk")
        print(f"error: {where}: {FAULTS[e.errno]}; {kept}; {remedy}, then {again}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except ImportError as e:
        return unexpected_fault(e)
    except KeyboardInterrupt as e:
        name = e.args[0] if e.args else "SIGINT"
        print(f"stopped by {'Ctrl-C' if name == 'SIGINT' else name}: {kept}; {again}", file=sys.stderr)
        return 128 + signal.Signals[name].value
    finally:
        if cleanup:
            cleanup()
        for s, handler in previous.items():
            signal.signal(s, handler)


def resolve_device(name=None, local_rank: int = 0, world: int = 1):
    """Every script's --device: None or auto (cuda when available, else cpu), cpu, cuda (cuda:LOCAL_RANK, the
    process's GPU under torchrun) or cuda:N; a torch.device passes through the same checks. A bad name is a
    DataError naming --device (exit 2), and so is cuda:N among `world` > 1 torchrun processes: it would put every
    rank on GPU N, where NCCL fails. A CUDA device becomes the process's current device."""
    # torch is imported here, not at the top: the audit and the launcher's flag check (common, splits, no
    # tensors) would otherwise pay torch's import, ~4 s per process, at every job start.
    import torch
    name = "auto" if name is None else str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise DataError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name}: CUDA is not available (no GPU visible to this process; use --device cpu)")
    if world > 1 and name.startswith("cuda:"):
        raise DataError(f"--device {name}: under torchrun ({world} processes) every rank would use that one GPU; use "
                        f"--device cuda (each rank takes cuda:LOCAL_RANK)")
    device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if device.type == "cuda" and device.index is not None:
        # the current device too: whatever still uses it (an event, a stream, a kernel launched without a device)
        # then uses the chosen GPU, not GPU 0 (evaluate.py --device cuda:1); under torchrun, this rank's GPU
        torch.cuda.set_device(device)
    return device


# ----------------------------------------------------------------------------------------------- files
REFUSED = (errno.EACCES, errno.EPERM)  # a write the folder refuses: a failed write too (exit 5), naming the folder
FAULTS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EIO: "I/O error",
          errno.EROFS: "read-only file system",  # OSErrors that say the disk failed the run, not the user's input
          errno.EFBIG: "file too large for that file system or the file-size limit (ulimit -f)"}
REMEDIES = {FAULTS[errno.ENOSPC]: "free space there", FAULTS[errno.EDQUOT]: "free space there",
            FAULTS[errno.EFBIG]: "write to a file system without that limit (or raise ulimit -f)",
            **{os.strerror(e).lower(): "make that folder writable or write elsewhere" for e in REFUSED}}


def writable_folder(folder, flag: str) -> Path:
    """`folder` if this process can create files in it (or create it); else a DataError naming `flag`.
    os.access, not a test write: it creates nothing, and it reports a read-only file system even to root."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise DataError(f"{flag} {folder}: {existing} is not a folder; choose a folder you can write")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
        raise DataError(f"{flag} {folder}: cannot write in {existing} ({why}); choose a folder you can write")
    return folder


def disk_fault(folder, reason: str, writing: str) -> EnvironmentFault:
    """The one wording of a failed write: the folder, the reason (FAULTS' wording, or the system's: permission
    denied), what was being written, the remedy."""
    remedy = REMEDIES.get(reason, "check that disk")
    return EnvironmentFault(f"{folder}: {reason} while writing {writing} (any previous one is kept); {remedy}, then "
                            f"run the same command again", reason)


def write_failure(error: OSError, path: Path) -> bool:
    """Whether `error` is the failure of writing `path` itself (its folder, the file, the temp file beside it, or a
    write with no file name), not of another file read inside the writing block."""
    name = error.filename
    return name is None or shown_path(name) != Path(name) or Path(name) in (path, *path.parents)


def shown_path(path) -> Path:
    """`path` as a message shows it: the folder holding a temp file or folder of atomic_path or a replaced folder
    (.<name>.<random>.tmp), which the user never made, instead of the temp name or anything inside it."""
    path = Path(path)
    for k, part in enumerate(path.parts):
        if part.startswith(".") and part.endswith(".tmp"):
            return Path(*path.parts[:k]) if k else Path(".")
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds. A failed write (a full or
    failing disk, a file-size limit, a folder one may not write) raises EnvironmentFault naming the folder, never the
    temp file; the previous `path` is untouched either way."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files: give them the permissions open() would
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a size limit, a folder one may not write: exit 5 naming the folder
        if e.errno not in FAULTS and not (e.errno in REFUSED and write_failure(e, path)):
            raise  # another file's error inside the block, or a path that is a folder: the caller's to name
        raise disk_fault(path.parent, FAULTS.get(e.errno) or (e.strerror or str(e)).lower(), path.name) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_all(path, data) -> None:
    """Write bytes with os.write, so that a full disk is an OSError(ENOSPC) (what atomic_path reports)."""
    fd, view = os.open(path, os.O_WRONLY | os.O_TRUNC), memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_sha256(path) -> str:
    """The hex SHA-256 of a file's bytes (a checkpoint's identity in bag keys and the ledger of looks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def size_mtime(path) -> tuple[int, int]:
    """(size, mtime_ns) of a file, what every cache of this project keys a file on; OSError if it cannot be stat'ed."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def size_mtime_or_none(path) -> tuple[int, int] | None:
    """size_mtime, or None for a file that cannot be stat'ed (missing or unreadable)."""
    with contextlib.suppress(OSError):
        return size_mtime(path)
    return None


def files_digest(files) -> str:
    """The hex SHA-256 of "path\tsize\tmtime_ns\n" lines of (path, size, mtime_ns) triples: what a cache built from
    those files depends on. Hashed 8192 lines at a time: one update per line cost ~0.2 s at 220k files, one string
    of all of them ~20 MB."""
    h, files = hashlib.sha256(), iter(files)
    while chunk := list(itertools.islice(files, 8192)):
        h.update("".join(f"{p}\t{size}\t{mtime}\n" for p, size, mtime in chunk).encode())
    return h.hexdigest()


# parse function -> (file identity, what it returned): one file per parse function held, so memory stays one copy
_PARSED: dict = {}


def _identity(path) -> tuple:
    st = os.stat(path)
    return str(Path(path).absolute()), st.st_ino, st.st_size, st.st_mtime_ns


def parsed_once(path, parse):
    """parse(path), once per process while the file keeps its inode, size and mtime (an atomic rewrite is a new
    inode): an index several steps read (a packed cache's index.csv: the reuse check and each dataset) is parsed
    once, not per reader. The value is shared: read it, never change it. OSError if the file cannot be stat'ed."""
    identity = _identity(path)
    held = _PARSED.get(parse)
    if held is None or held[0] != identity:
        _PARSED[parse] = None  # the old value goes before the new one is built
        _PARSED[parse] = identity, parse(path)
    return _PARSED[parse][1]


def remember_parsed(path, parse, value) -> None:
    """What parse(path) would return for the file just written, so the writer's own next read parses nothing."""
    _PARSED[parse] = _identity(path), value


def remembered(where, key: str, name: str, compute, valid):
    """compute()'s JSON-able value, kept in the file `where` as {"key": key, name: value}: while the key is the same,
    later calls (later processes too) read it instead of computing. A missing, unreadable or stale file, or a value
    valid(value) refuses, is computed again and rewritten; where=None only computes. Keeping it is only a speed-up:
    a failed write is ignored."""
    if where is None:
        return compute()
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
        stored = json.loads(Path(where).read_text())
        if stored["key"] == key and valid(stored[name]):
            return stored[name]
    value = compute()
    with contextlib.suppress(OSError):
        atomic_write_text(where, json.dumps({"key": key, name: value}))
    return value


def atomic_torch_save(obj, path) -> None:
    """torch.save, atomically. Serialized in memory first (costs one checkpoint of host RAM, ~130 MB for a resnet18
    with AdamW): straight to a file, a full disk surfaces as torch's RuntimeError 'unexpected pos ...' instead of
    ENOSPC."""
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        write_all(tmp, buffer.getbuffer())


def bounded_map(pool, fn, items, ahead: int):
    """pool.map(fn, items) in order, with at most `ahead` calls submitted and not yet consumed: Executor.map
    submits every item at once, a Future each (at 220k files, hundreds of MB before the first result)."""
    items, pending = iter(items), []
    pending += [pool.submit(fn, x) for x in itertools.islice(items, ahead)]
    while pending:
        result = pending.pop(0).result()
        pending += [pool.submit(fn, x) for x in itertools.islice(items, 1)]
        yield result
