"""The ledger of looks: runs/holdout_ledger.jsonl, one JSON line appended for every evaluation that read the labels of
a test part or of the HoldOut, so that no report can hide how often its numbers were looked at.

    entries = ledger.read(runs_dir)
    looks = ledger.looks(entries, sha256, ["test", "holdout"])      # before this look: what the report discloses
    ledger.append(runs_dir, {"kind": "evaluate", "sha256": sha256, "parts": ["test", "holdout"], ...})

Append-only: a line is written whole with O_APPEND (one write, so concurrent evaluations never interleave lines)
and fsynced, after a newline if a crash left the last line torn (that torn line is skipped when read); nothing here
rewrites or deletes the file. The runs folder is the one holding the checkpoint's run folder (runs/26/best.pt ->
runs/), so every run of a project shares one ledger. Kinds:
- evaluate: evaluate.py --checkpoint (the test part; with --holdout the HoldOut too);
- compare-test: evaluate.py --compare --compare-on test, which used the test part to choose among several models:
  each of them carries it in its later reports;
- cv: evaluate.py --cv (the pooled out-of-fold test parts); ensemble: evaluate.py --ensemble.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

NAME = "holdout_ledger.jsonl"


def path_for(checkpoint) -> Path:
    """runs/26/best.pt -> runs/holdout_ledger.jsonl."""
    return Path(checkpoint).absolute().parent.parent / NAME


def read(path) -> list[dict]:
    """Every entry of the ledger at `path` ([] when there is none yet; a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def append(path, entry: dict) -> dict:
    """Add one entry (time and command filled in), written in one O_APPEND write and fsynced."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv), **entry}
    line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a line torn by a crash: end it, keep this one whole
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def looks(entries: list[dict], sha256: str, parts) -> dict:
    """What a report about the checkpoint `sha256` must disclose, from the entries before its own look: per part,
    how many earlier looks this checkpoint had, the earlier looks of other models at that part, and the --compare
    runs on the test part that chose among models including this one."""
    out = {}
    for part in parts:
        mine = [e for e in entries if part in e.get("parts", []) and sha256 in e.get("sha256s", [e.get("sha256")])]
        others = [e for e in entries if part in e.get("parts", []) and sha256 not in
                  e.get("sha256s", [e.get("sha256")])]
        out[part] = {"look": len(mine) + 1, "earlier": [brief(e) for e in mine],
                     "other_models": [brief(e) for e in others]}
    chose = [e for e in entries if e.get("kind") == "compare-test" and sha256 in e.get("sha256s", [])]
    out["chosen_among"] = [{"time": e["time"], "models": len(e["sha256s"]), "checkpoints": e.get("checkpoints")}
                           for e in chose]
    return out


def group_look(entries: list[dict], kind: str, sha256s) -> int:
    """The number of this look by a group of checkpoints (--cv, --ensemble): 1 + earlier entries of `kind` by the
    same set of checkpoints."""
    mine = sorted(sha256s)
    return 1 + sum(1 for e in entries if e.get("kind") == kind and sorted(e.get("sha256s", [])) == mine)


def brief(entry: dict) -> dict:
    return {k: entry.get(k) for k in ("time", "kind", "checkpoint", "checkpoints", "parts", "headline")
            if entry.get(k) is not None}
