"""The ledger of looks: runs/holdout_ledger.jsonl, one JSON line appended for every evaluation that showed numbers
from the labels of a test part or of the HoldOut, so that no report can hide how often its numbers were looked at.

    entries = ledger.read(where)                                            # damaged lines: warned, kept as unknown
    keys = {"test": ledger.key(kind="evaluate", sha256=sha, part="test", flags=..., data=...)}
    seen = ledger.looks(entries, [sha], ["test", "holdout"], keys)          # what the report discloses
    ledger.append(where, {"kind": "evaluate", "sha256": sha, "parts": [...], "keys": keys, **ledger.repeats(seen)})

A look is a new number seen, counted once:
- it is recorded when its numbers are written or printed (the caller appends just before they become visible),
  never when the command refuses or fails before that;
- the same evaluation again (same checkpoint, same flags that change a number, same data: the same `key` of a
  part) is appended as a repeat of look N (`repeat_of`), listed, and not counted again;
- a line that cannot be read (torn by a crash, edited, bytes that are not UTF-8) is named with its line number in a
  warning and counted as a look of unknown origin by every checkpoint at every part: a damaged ledger can raise a
  report's look number, never lower it, and never stops a command.

Append-only: a line is written whole with O_APPEND (one write, so concurrent evaluations never interleave lines)
and fsynced, after a newline if a crash left the last line torn; nothing here rewrites or deletes the file. The
runs folder is the one holding the checkpoint's run folder (runs/26/best.pt -> runs/), so every run of a project
shares one ledger. Kinds:
- evaluate: evaluate.py --checkpoint (the test part; with --holdout the HoldOut too);
- compare-test: evaluate.py --compare --compare-on test, which used the test part to choose among several models:
  each of them carries it in its later reports;
- cv: evaluate.py --cv (the pooled out-of-fold test parts);
- ensemble: evaluate.py --holdout --ensemble: a HoldOut look by every fold model, whose `uses` records each fold's
  test part read against that fold's checkpoint (the out-of-fold predictions);
- unknown: not a line of the file, what read() makes of a damaged one.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

NAME = "holdout_ledger.jsonl"
UNKNOWN = "unknown"
_WARNED: set = set()


def path_for(checkpoint) -> Path:
    """runs/26/best.pt -> runs/holdout_ledger.jsonl."""
    return Path(checkpoint).absolute().parent.parent / NAME


def read(path) -> list[dict]:
    """Every entry of the ledger at `path` ([] when there is none yet). Read as bytes: a line that is not a JSON
    object in UTF-8 is warned about (stderr, its line number) and becomes {"kind": "unknown", "line": n}."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is a ValueError
            entry = None
        if not isinstance(entry, dict) or entry.get("kind") == UNKNOWN:
            if (str(path), n, raw) not in _WARNED:  # once a command (--cv reads the ledger once a fold)
                _WARNED.add((str(path), n, raw))
                print(f"warning: {path} line {n}: damaged, not a ledger entry; counted as a look of unknown origin",
                      file=sys.stderr)
            entry = {"kind": UNKNOWN, "line": n}
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


def key(**what) -> str:
    """The identity of an evaluation of one part: a digest of everything its numbers depend on (checkpoint digest,
    the flags that change a number, the data), so the same evaluation again is recognised as a repeat."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def data_digest(rows, diagnosis: dict) -> str:
    """What an evaluation read of the data: each scored patch (path under the data root, label) and the diagnosis of
    each of their patients; the same files with the same labels under another root (a staged copy) are the same."""
    rows = sorted((str(path), int(label), str(patient)) for path, label, patient in rows)
    return key(rows=rows, diagnoses={p: diagnosis.get(p) for p in sorted({r[2] for r in rows})})


def shas_of(entry: dict) -> list[str]:
    return entry.get("sha256s") or ([entry["sha256"]] if entry.get("sha256") else [])


def involves(entry: dict, sha256s, part: str) -> bool:
    return part in entry.get("parts", []) and bool(set(shas_of(entry)) & set(sha256s))


def looks(entries: list[dict], sha256s, parts, keys: dict | None = None) -> dict:
    """What a report about the checkpoint(s) `sha256s` (one, or the members of an ensemble) must disclose, from the
    entries before its own look, per part: this look's number (1 + the earlier counted looks involving any of them +
    the damaged lines), whether it repeats an earlier evaluation with the same key (then its number is that look's
    and it is not counted), the earlier looks, the damaged lines, the other models' looks, and the other evaluations
    that used the part's labels against these checkpoints (`uses`); and the --compare runs on the test part that
    chose among models including one of them."""
    sha256s = [sha256s] if isinstance(sha256s, str) else list(sha256s)
    keys = keys or {}
    out = {}
    for part in parts:
        number, numbered, earlier, others, unknown, repeat_of = 0, {}, [], [], [], None
        for e in entries:
            if e.get("kind") == UNKNOWN:
                number += 1
                unknown.append(e["line"])
                continue
            if not involves(e, sha256s, part):
                if part in e.get("parts", []):
                    others.append(brief(e, part))
                continue
            again = (e.get("repeat_of") or {}).get(part)
            if not again:
                number += 1
            shown = again or number
            earlier.append({**brief(e, part), "look": shown, **({"repeat": True} if again else {})})
            k = (e.get("keys") or {}).get(part)
            if k:
                numbered.setdefault(k, shown)
            if keys.get(part) and keys[part] == k and repeat_of is None:
                repeat_of = shown
        out[part] = {"look": repeat_of or number + 1, "repeat_of": repeat_of, "earlier": earlier,
                     "unknown_origin": unknown, "other_models": others,
                     "used_by": [brief(e, part) for e in entries if e.get("kind") != UNKNOWN and
                                 set((e.get("uses") or {}).get(part, [])) & set(sha256s)]}
    chose = [e for e in entries if e.get("kind") == "compare-test" and set(e.get("sha256s", [])) & set(sha256s)]
    out["chosen_among"] = [{"time": e.get("time"), "models": len(e["sha256s"]), "checkpoints": e.get("checkpoints")}
                           for e in chose]
    return out


def repeats(seen: dict) -> dict:
    """The `repeat_of` field of the entry to append, from looks(): {part: look number} of the parts this evaluation
    repeats ({} when it is a new look at every part)."""
    again = {p: v["repeat_of"] for p, v in seen.items() if isinstance(v, dict) and v.get("repeat_of")}
    return {"repeat_of": again} if again else {}


def new_numbers(seen: dict) -> bool:
    """Whether this evaluation shows a number not seen before at some part (not a repeat everywhere)."""
    return any(isinstance(v, dict) and "look" in v and not v.get("repeat_of") for v in seen.values())


def brief(entry: dict, part: str | None = None) -> dict:
    out = {k: entry.get(k) for k in ("time", "kind", "checkpoint", "checkpoints", "parts", "headline")
           if entry.get(k) is not None}
    again = (entry.get("repeat_of") or {}).get(part) if part else None
    return {**out, **({"repeat_of": again} if again else {})}
