"""Every way a run can stop, tried as users meet it: the real scripts in their own process, DataLoader workers on,
a time limit, and then the exit code, the one line that says why, and what is left on disk (issue 9)."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parents[1]
# 48 training samples at 64 px, no Macenko: seconds of work, so a hang is unmistakable.
FAST = ["--device", "cpu", "--image-size", "64", "--batch-size", "16", "--weights", "none", "--seed", "0",
        "--limit-samples", "48", "--no-macenko"]
LIMIT = 90  # seconds: a healthy run of these scripts takes ~10-20 s here (mostly imports); the hang was for ever


def script(name, *argv, timeout=LIMIT, **popen):
    """Run ROOT/name as its own process group, as a shell or SLURM starts it; the group is killed on timeout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / name), *map(str, argv)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{name} still running after {timeout} s (hang): {err[-2000:]}")
    return proc.returncode, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]


def broken_copy(demo_root, where: Path, break_file) -> tuple[Path, list[str]]:
    """A hard-linked copy of the demo data in which every positive annotated window is broken by break_file
    (positives are ~half of a --limit-samples 48 training set, so the first batch meets one). Broken files are
    new inodes: the shared demo data stays intact."""
    root = where / "HelicoDataSet"
    shutil.copytree(demo_root, root, copy_function=os.link)
    broken = [s.path for s in common.load_data(root).labelled if s.label == 1]
    for rel in broken:
        path = root / rel
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(break_file(data))
    return root, broken


def truncated(png: bytes) -> bytes:
    return png[: len(png) // 2]  # header and size intact: only decoding the pixels finds it


def zero_bytes(png: bytes) -> bytes:
    return b""


@pytest.fixture(scope="module")
def truncated_root(demo_root, tmp_path_factory):
    return broken_copy(demo_root, tmp_path_factory.mktemp("truncated"), truncated)


@pytest.fixture(scope="module")
def empty_root(demo_root, tmp_path_factory):
    return broken_copy(demo_root, tmp_path_factory.mktemp("empty"), zero_bytes)


# ----------------------------------------------------------------------------------------------- bad images
@pytest.mark.parametrize("kind", ["truncated_root", "empty_root"])
def test_a_bad_png_in_training_with_workers_exits_2_promptly_in_one_line_naming_it(kind, request, tmp_path):
    root, broken = request.getfixturevalue(kind)
    start = time.monotonic()
    code, _, err = script("train.py", "--data-root", root, "--runs-dir", tmp_path, "--run-id", "bad", *FAST,
                          "--workers", "2", "--epochs", "1")
    assert code == common.EXIT_BAD_INPUT, err[-2000:]
    assert time.monotonic() - start < LIMIT
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    named = re.match(r"error: (\S+\.png): unreadable image", lines[0])
    assert named and os.path.relpath(named.group(1), root) in broken, lines[0]
    assert "--skip-bad-images" in lines[0]


def test_a_zero_byte_validation_png_in_evaluate_with_workers_is_one_line_naming_it(tiny_run, empty_root, tmp_path):
    root, broken = empty_root
    code, _, err = script("evaluate.py", "--checkpoint", tiny_run / "best.pt", "--data-root", root, "--out",
                          tmp_path / "eval", "--device", "cpu", "--workers", "2", "--bootstrap", "0", "--gradcam", "0")
    assert code == common.EXIT_BAD_INPUT, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    named = re.match(r"error: (\S+\.png): unreadable image", lines[0])
    assert named and os.path.relpath(named.group(1), root) in broken, lines[0]
    assert not (tmp_path / "eval").exists()
