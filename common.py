"""What every script shares (the design card's common.py): the conventions (bad input and its exit codes, the flags
every command spells the same: --device, --amp/--no-amp and the --help format; atomic file writes and file
identity), the HelicoDataSet (patient IDs, the workbook and diagnosis readers, the samples of a data root,
PatchDataset) and the model (building it, the checkpoint schema, reading a checkpoint).

Scripts and the helico package import it; it imports nothing of the project, and torch only inside the
functions that need it (the audit and the launcher's flag check stay fast).

    import common
    data = common.load_data("HelicoDataSet")        # discover + join workbook rows to files
    train = common.select(data.labelled, ["B22-47", "B22-111"], include_aug=True)
    ds = common.PatchDataset(data.root, train, image_size=256)
    net = common.build_model("resnet18", "imagenet")
    device = common.resolve_device("auto")              # cuda when available, else cpu; bad name: DataError
    common.atomic_write_text(run_dir / "split.json", text)  # all or nothing; a full disk: EnvironmentFault

Every bad input raises DataError with a one-line message naming the file, row or flag; scripts turn it into
`error: ...` on stderr and exit code 2 (EXIT_BAD_INPUT). An OSError or ImportError nothing caught becomes one line
and its exit code too (unexpected_fault), so the launcher reads every step from its exit code alone.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import functools
import hashlib
import io
import itertools
import json
import os
import re
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
    # tensors) would otherwise pay torch's import at every job start.
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
    those files depends on. Hashed 8192 lines at a time: neither an update per line nor one string of all lines
    (both slow or large at the real dataset's ~220k files)."""
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
    submits every item at once, a Future each, which at the real dataset's size holds a lot of memory before the
    first result."""
    items, pending = iter(items), []
    pending += [pool.submit(fn, x) for x in itertools.islice(items, ahead)]
    while pending:
        result = pending.pop(0).result()
        pending += [pool.submit(fn, x) for x in itertools.islice(items, 1)]
        yield result


# --------------------------------------------------------------------------------------------- the HelicoDataSet
ANNOTATION_NAMES = ("HP_WSI-CoordAllAnnotatedPatches", "HP_WSI-CoordAnnotatedAllPatches",
                    "HP_WSI-CoordAnnotatedPatches")  # the names other copies of the dataset use; .xlsx or .csv
DIAGNOSIS_NAME = "PatientDiagnosis.csv"
DIAGNOSES = ("NEGATIVA", "BAIXA", "ALTA")  # BAIXA (low density) and ALTA (high) both mean infected


# ----------------------------------------------------------------------------------------------- names
_FOLDER = re.compile(r"^(?P<patient>.+?)_(?P<section>\d+)$")
_PATCH = re.compile(r"^(?P<window>\d+)(?:_Aug(?P<aug>\d+))?\.png$", re.IGNORECASE)
_WINDOW_ID = re.compile(r"^(?P<window>\d+)(?:_Aug(?P<aug>\d+))?$", re.IGNORECASE)


def patient_id(folder_name: str) -> str:
    """`B22-111_0` and `B22-111_1` -> `B22-111`: strip the section suffix. Exact parsing, never a prefix match."""
    name = Path(str(folder_name).strip()).name
    m = _FOLDER.match(name)
    return m.group("patient") if m else name


@functools.lru_cache(maxsize=4096)  # a few hundred folders, asked once per sample: a regex match each otherwise
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


# ----------------------------------------------------------------------------------------------- discovery
@dataclass(frozen=True, slots=True)  # slots: one per patch is held at once, so no per-instance dict
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
    # what later steps work out from this scan once per process (identity.identical_files), by their own keys
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
    """uint8 (3, H, W) tensors (RGBA/gray -> RGB, off-size -> resized), label and sample index.

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
                # convert drops alpha (RGBA patches are opaque) and expands gray/palette; on RGB it would only copy
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


# ------------------------------------------------------------------------------------------------------- the model
def build_model(arch: str = "resnet18", weights: str = "none"):
    """Any torchvision classifier by name, its last Linear layer replaced by a one-logit head.

    weights: 'imagenet' (torchvision's download cache), a path to a state dict or checkpoint, or 'none'."""
    # Imported here: torchvision's import loads torch._dynamo, seconds of CPU that every --help, bad-flag exit and
    # the audit would pay for nothing.
    import torch
    import torchvision
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise DataError(f"--arch {arch}: not a torchvision classifier (e.g. resnet18, resnet50, convnext_tiny)")
    model = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        w = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            model.load_state_dict(w.get_state_dict(progress=False))
        except Exception as e:  # URLError, socket errors, hash mismatch: all mean 'could not get the file'
            cache = Path(torch.hub.get_dir()) / "checkpoints" / w.url.rsplit("/", 1)[-1]
            fetch = f"import torchvision; torchvision.models.get_model_weights('{arch}').DEFAULT.get_state_dict()"
            raise DataError(f"--weights imagenet: {arch}'s weights are not in torchvision's cache {cache} and could "
                            f"not be downloaded ({type(e).__name__}; compute nodes are often offline): on a login "
                            f"node with the same $TORCH_HOME run python -c \"{fetch}\", or pass --weights none/FILE"
                            ) from None
    _one_logit_head(model)
    if weights not in ("none", "imagenet", None):
        path = checkpoint_path(weights, "--weights") if Path(weights).is_dir() else Path(weights)
        if not path.is_file():
            raise DataError(f"--weights {weights}: file not found (use imagenet, none or a .pt path)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        own = model.state_dict()
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}  # foreign heads drop out
        if not state:
            raise DataError(f"--weights {weights}: no tensor matches {arch}'s layers")
        model.load_state_dict(state, strict=False)
    return model


def head_slot(model) -> tuple:
    """(parent module, attribute) of the classifier's last Linear layer: fc, classifier[-1], heads.head."""
    import torch
    name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr  # Sequential children are named "0", "1"


def _one_logit_head(model) -> None:
    import torch
    parent, attr = head_slot(model)
    setattr(parent, attr, torch.nn.Linear(getattr(parent, attr).in_features, 1))


CHECKPOINT_VERSION = 1
TRAINING_KEYS = ("progress", "best_score", "optimizer", "scheduler", "scaler", "rng")  # what resumes training
REQUIRED_KEYS = ("model", "arch", "config", "split", "stain", "threshold", "image_size")  # what evaluate.py rebuilds from


def checkpoint(*, model_state, arch, config, split, stain, threshold, threshold_rule, image_size, epoch, val_metrics,
               training: dict) -> dict:
    """The checkpoint schema: plain tensors and Python values only, so torch.load(weights_only=True) reads it.
    `training` holds TRAINING_KEYS (optimizer, scheduler, scaler and RNG states, progress, best score)."""
    if set(training) != set(TRAINING_KEYS):
        raise ValueError(f"training state needs exactly {TRAINING_KEYS}, got {sorted(training)}")
    return {"model": model_state, "arch": arch, "config": config, "split": split, "stain": stain,
            "threshold": threshold, "threshold_rule": threshold_rule, "image_size": image_size, "epoch": epoch,
            "val_metrics": val_metrics, **training, "version": CHECKPOINT_VERSION}


def slim(ckpt: dict, decision: dict | None = None) -> dict:
    """best.pt: what rebuilds and runs the model (weights, config, split, stain, thresholds) and the stored
    decision (helico/decision.py), without the optimizer, scheduler, scaler and RNG states only a resume needs
    (last.pt keeps them)."""
    out = {k: v for k, v in ckpt.items() if k not in TRAINING_KEYS}
    if decision is not None:
        out["decision"] = decision
    return out


def checkpoint_path(path, named: str = "--checkpoint") -> Path:
    """`path` when it is a file; else a DataError naming the flag and, for a run folder (`--checkpoint runs/demo`),
    the checkpoints inside it: every command that reads a checkpoint says the same."""
    path = Path(path)
    if path.is_dir():
        inside = [path / n for n in ("best.pt", "last.pt") if (path / n).is_file()]
        which = (f"pass {inside[0]}" + (f" (the best validation epoch) or {inside[1]} (the last)" if len(inside) > 1
                 else "") if inside else "it holds neither best.pt nor last.pt: pass a checkpoint file")
        raise DataError(f"{named} {path}: a folder, not a checkpoint; {which}")
    if not path.is_file():
        raise DataError(f"{named} {path}: file not found")
    return path


def load_checkpoint(path, training: bool = False, named: str = "--checkpoint") -> dict:
    """A checkpoint() dict, loaded with weights_only=True; one-line errors naming the file otherwise.
    training=True also requires the state that resumes training; `named` is what the user gave that led here, for
    the message (train.py: the run it resumes)."""
    import torch
    path = checkpoint_path(path, named)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, ...
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        why = next((ln for ln in lines if "Unsupported global" in ln), lines[0])  # torch's weights_only verdict
        why = why.split(". ")[0].rstrip(".") or "file ends early"  # its first sentence, whole; the rest is advice
        raise DataError(f"{named} {path}: unreadable checkpoint ({type(e).__name__}: {why}); truncated or not "
                        f"written by train.py") from None
    required = REQUIRED_KEYS + (TRAINING_KEYS if training else ())
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise DataError(f"{named} {path}: not a train.py checkpoint (missing {', '.join(missing)})")
    return ckpt
