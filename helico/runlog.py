"""The run log, runs/<id>/log.jsonl: one JSON line per finished epoch, written by train.py and read back by train.py
(on resume), evaluate.py (the epochs the best one was chosen among) and tools/bench.py (train.py's logged img/s).

    runlog.write(run_dir, records)     # every epoch: the whole log, replaced atomically
    records = runlog.read(run_dir)     # [] without a log
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import common

NAME = "log.jsonl"


def write(run_dir, records: list[dict]) -> None:
    """The whole log, one line per record, replaced atomically: a resumed run drops the epochs after its checkpoint."""
    common.atomic_write_text(Path(run_dir) / NAME, "".join(json.dumps(r) + "\n" for r in records))


def read(run_dir) -> list[dict]:
    """The epoch records of a run folder (unparsable lines skipped; [] without a log)."""
    path, records = Path(run_dir) / NAME, []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            r = json.loads(line)
            if isinstance(r, dict) and "epoch" in r:
                records.append(r)
    return records
