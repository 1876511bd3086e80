"""The run folder runs/<run-id>/ as train.py keeps it: who may write it, and what a stop signal does to a run.

Owns: the lock (one train.py per folder: rank 0 flocks .train.lock for the whole run, its pid and host inside), the
refusal of a folder holding a model this run did not write (an earlier run's best.pt, config.json or evaluation,
with no last.pt to resume from), what --force does to such a folder (the earlier model's files removed, its
evaluation folders renamed <name>.stale), the resume check (config.json's flags against this run's), the stop
signals (finish the step, save, exit 4) and the SLURM requeue. Torch-free: train.py's Trainer trains, validates and
checkpoints; this module decides whether it may start and how it ends.

    run_folder.claim(run_dir, force)            # lock; DataError if the folder is in use or holds an earlier model
    run_folder.check_resume(run_dir, config, force)
    run_folder.retire_earlier_run(run_dir)       # with --force, before the new run writes anything
    previous = run_folder.catch_stop_signals()   # ... training reads STOP between steps ...
    run_folder.release(); run_folder.restore_signals(previous)
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import common
from helico import staining

LOCK = ".train.lock"  # flock-ed by rank 0 for the whole run; holds its pid and host
SKIPPED = "skipped_images.txt"  # --skip-bad-images: the undecodable files left out, one path per line
# What train.py writes in a run folder. Before its first checkpoint a run has written only the first four.
STARTED = (LOCK, "config.json", "split.json", "stain_survey.json", SKIPPED)
RUN_FILES = (*STARTED[1:], "best.pt", "last.pt", "log.jsonl", "learning_curves.png")
STALE = ".stale"  # an earlier model's evaluation folder, kept under this suffix by a --force run replacing it

# Flags that may change between a run and its resumption without changing what is trained (--cache and
# --cache-normalized give the same pixels: Macenko's output is 8-bit levels, stored without loss).
RESUME_IGNORES = {"run_id", "runs_dir", "data_root", "hash_cache", "device", "workers", "pin_memory", "force",
                  "persistent_workers", "prefetch_factor", "amp", "channels_last", "environment", "cache",
                  "cache_base", "cache_normalized", "resident_max_frac", "compile", "deterministic"}
# flags newer than some run folders: their value in runs made before them
ADDED_FLAGS = {"hed_jitter": [0.0, 0.0], "easy_negatives": "all"}


# ----------------------------------------------------------------------------------------------- an earlier model
def earlier_run(run_dir: Path) -> list[str]:
    """The entries of `run_dir` an earlier run left there that this run would replace (folders with a trailing /),
    or [] when there is nothing to lose: a new or empty folder, a last.pt to resume from, or only what this same SLURM
    job wrote before its first checkpoint (a requeue after a node failure starts that run again)."""
    if (run_dir / "last.pt").is_file() or not run_dir.is_dir():
        return []
    names = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(run_dir) if e.name != LOCK)
    job = os.environ.get("SLURM_JOB_ID")
    if job and set(names) <= set(STARTED) and _config_job(run_dir) == job:
        return []
    return names


def _config_job(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "config.json").read_text())["environment"]["slurm_job_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def refuse_earlier_run(run_dir: Path, force: bool) -> None:
    """DataError naming what `run_dir` holds, when it holds an earlier run's files and --force was not given."""
    names = earlier_run(run_dir)
    if names and not force:
        model = "a model" if {"best.pt", "config.json"} & set(names) else "files"
        raise common.DataError(f"{run_dir} holds {model} of an earlier run ({', '.join(names[:8])}"
                               f"{', ...' if len(names) > 8 else ''}) and no last.pt to resume from: use another "
                               f"--run-id, or --force to replace it (its evaluation folders are kept as <name>{STALE})")


def retire_earlier_run(run_dir: Path) -> str:
    """--force on a folder holding an earlier model: remove that model's files (so the folder never mixes two runs'),
    rename each evaluation folder (eval/, patient/, ...) to <name>.stale (replacing an older one), leave other
    files alone. Returns one line saying what was done, or "" when there was nothing to retire."""
    names = earlier_run(run_dir)
    if not names:
        return ""
    removed, stale = [], []
    try:
        for name in names:
            path = run_dir / name.rstrip("/")
            if name.endswith("/") and not name.rstrip("/").endswith(STALE):
                target = path.with_name(path.name + STALE)
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                path.rename(target)
                stale.append(target.name + "/")
            elif name in RUN_FILES:
                path.unlink()
                removed.append(name)
    except OSError as e:
        raise common.EnvironmentFault(f"{run_dir}: cannot replace the earlier run ({e.strerror or e}: "
                                      f"{e.filename}); nothing trained") from None
    return (f"{run_dir}: --force: replacing an earlier run: removed {', '.join(removed) or 'nothing'}"
            + (f"; its evaluation now in {', '.join(stale)}" if stale else ""))


# ----------------------------------------------------------------------------------------------- resume check
def as_stored(config: dict) -> dict:
    """A config as today's config.json spells it: runs written before a flag existed, or before --reference-patch
    took several entries, resume as what they trained with."""
    config = {**ADDED_FLAGS, **json.loads(json.dumps(config))}
    config["reference_patch"] = staining.reference_list(config.get("reference_patch"))
    return config


def changed_flags(old: dict, new: dict) -> list[str]:
    old, new = as_stored(old), as_stored(new)  # compare as config.json stores them
    keys = sorted((set(old) | set(new)) - RESUME_IGNORES)
    return [f"--{k.replace('_', '-')} {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k)]


def check_resume(run_dir: Path, config: dict, force: bool) -> None:
    """DataError when the run folder's config.json holds other flags than `config` that change what is trained,
    unless --force (the new flags win)."""
    if not (run_dir / "config.json").is_file():
        return
    changed = changed_flags(json.loads((run_dir / "config.json").read_text()), config)
    if changed and not force:
        raise common.DataError(f"{run_dir} holds a run with other flags ({'; '.join(changed[:4])}): use another "
                               f"--run-id, or --force to resume with the new flags")


# ----------------------------------------------------------------------------------------------- the lock
HELD: list[tuple[int, Path, bool]] = []  # this process's lock: (file descriptor, run folder, whether it created it)


def claim(run_dir: Path, force: bool) -> None:
    """Rank 0, before any work: lock the run folder (lock()), refusing one that holds an earlier run's model unless
    --force. A folder without a lock file is checked before one is made in it, so a refusal changes nothing."""
    if not (run_dir / LOCK).exists():
        refuse_earlier_run(run_dir, force)
    lock(run_dir)
    refuse_earlier_run(run_dir, force)  # main() releases the lock on the way out


def lock(run_dir: Path) -> None:
    """Hold the run folder until release(), so that a second train.py on the same --run-id is refused (exit 2)
    rather than both writing it. The kernel drops a flock with its process, so a requeued, preempted or killed run
    never leaves a stale lock: the next run on the folder resumes."""
    common.writable_folder(run_dir.parent, "--runs-dir")  # before any work: a read-only one is bad input (exit 2)
    common.writable_folder(run_dir, "--run-id")  # a file of that name there
    created = not run_dir.exists()
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise common.disk_fault(run_dir, common.FAULTS.get(e.errno, e.strerror), LOCK) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid not yet recorded"
            os.close(fd)
            raise common.DataError(f"{run_dir} is in use by another train.py ({holder}): wait for it to end, or use "
                                   f"another --run-id") from None
        except OSError as e:  # a file system without flock (Lustre mounted without it): train, unguarded
            print(f"warning: {run_dir}: cannot lock ({e.strerror}); a second train.py on this --run-id would not "
                  f"be refused", file=sys.stderr)
            os.close(fd)
            return
        try:  # the file locked must still be the folder's: a refused run may have just removed what it created
            same = os.path.samestat(os.fstat(fd), os.stat(run_dir / LOCK))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)  # for the second one's message
    HELD.append((fd, run_dir, created))


def release() -> None:
    """Unlock; a folder the run created and left holding nothing but the lock (refused before training: bad input,
    a leaky split) is removed, as if the run had never started."""
    while HELD:
        fd, run_dir, created = HELD.pop()
        try:
            if created and [p.name for p in run_dir.iterdir()] == [LOCK]:
                (run_dir / LOCK).unlink()
                run_dir.rmdir()
        except OSError:  # left as it is: the next run locks it all the same
            pass
        os.close(fd)


def previously_skipped(run_dir: Path) -> set[str]:
    """--skip-bad-images: the files an earlier part of this run left out (kept across resumes)."""
    skipped = run_dir / SKIPPED
    return set(skipped.read_text().splitlines()) if skipped.is_file() else set()


class Skipped:
    """--skip-bad-images: each undecodable file named once on stderr and listed in the run folder's
    skipped_images.txt (kept across resumes); only the process that writes the run folder writes the list."""

    def __init__(self, run_dir: Path, writes: bool):
        self.run_dir, self.writes, self.paths = run_dir, writes, previously_skipped(run_dir)

    def note(self, paths) -> None:
        from tqdm import tqdm  # tqdm.write: on a line of its own, not onto the progress bar
        new = sorted(set(paths) - self.paths)
        if not new:
            return
        self.paths.update(new)
        for path in new:
            tqdm.write(f"warning: skipped unreadable {path} (--skip-bad-images; listed in "
                       f"{self.run_dir / SKIPPED})", file=sys.stderr)
        if self.writes:
            common.atomic_write_text(self.run_dir / SKIPPED, "".join(f"{p}\n" for p in sorted(self.paths)))


# ----------------------------------------------------------------------------------------------- stop signals
STOP = threading.Event()  # set by the signal handler, read between steps
STOPPED_BY: list[str] = []  # the signal that set it, for the closing line


def on_signal(signum, frame):
    """First SIGUSR1/SIGTERM (SLURM's warning before preemption) or Ctrl-C: finish the step, save, exit 4.
    Second: exit now with 128 + its number."""
    if STOP.is_set():
        os._exit(128 + signum)
    STOPPED_BY.append(signal.Signals(signum).name)
    STOP.set()  # no printing here: the handler may interrupt a write to stderr


def catch_stop_signals() -> dict:
    """Install on_signal for the stop signals (Ctrl-C too: it checkpoints); returns the handlers to restore."""
    from helico import loaders  # imports torch: only a training process gets here
    STOP.clear()
    STOPPED_BY.clear()
    return {s: signal.signal(s, on_signal) for s in loaders.STOP_SIGNALS}


def restore_signals(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


def stopped_line(run_dir: Path, epoch: int, step: int) -> str:
    """The closing line of a run stopped by a signal after writing last.pt, with what requeue() did."""
    return (f"stopped by signal {STOPPED_BY[0] if STOPPED_BY else ''} at epoch {epoch} step {step}: saved "
            f"{run_dir / 'last.pt'}; {requeue()}")


def requeue() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not under SLURM: re-run the same command to resume"
    if shutil.which("scontrol") is None:
        return f"SLURM job {job}, but scontrol is not on PATH: not requeued"
    r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    return f"requeued SLURM job {job}" if r.returncode == 0 else f"scontrol requeue {job} failed: {r.stderr.strip()}"
