"""Session fixtures: one demo dataset and one tiny trained run, shared read-only by every test file.

Tests that need to break the data copy `demo_root` into their tmp_path first (shutil.copytree)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tools"))  # the developer tools import as modules too
os.environ.setdefault("XDG_CACHE_HOME", str(ROOT / ".pytest_cache" / "xdg"))  # hash caches stay out of ~
META = ROOT.parent / "shared" / "helico-metadata"  # the real workbook and PatientDiagnosis.csv, beside the clone
# CI has META; a bare clone does not: its tests then skip, saying which folder is missing (never fail obscurely).
needs_meta = pytest.mark.skipif(not META.is_dir(), reason=f"needs the real metadata folder {META} (missing here)")

# The tiny run every evaluation test shares: small images and few epochs so it trains in well under a minute.
TINY_TRAIN_FLAGS = ["--device", "cpu", "--epochs", "2", "--image-size", "64", "--batch-size", "32", "--weights", "none",
                    "--workers", "0", "--seed", "0", "--limit-samples", "64"]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    import make_demo_data
    out = tmp_path_factory.mktemp("demo") / "HelicoDataSet"
    assert make_demo_data.main([str(out), "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def small_demo_root(tmp_path_factory):
    """A 12-patient demo (~490 PNGs, a third of the default): for tests that need the real format, every trap and a
    valid three-part split, but not the size (the launcher's: each copies, stages, audits and caches it)."""
    import make_demo_data
    out = tmp_path_factory.mktemp("small-demo") / "HelicoDataSet"
    assert make_demo_data.main([str(out), "--seed", "0", "--patients", "12", "--holdout-patients", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_run(demo_root, tmp_path_factory):
    import train
    runs = tmp_path_factory.mktemp("runs")
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(runs), "--run-id", "tiny",
                       *TINY_TRAIN_FLAGS]) == 0
    return runs / "tiny"


def flipped_diagnoses(root, patients, where):
    """The dataset at `root` seen through links, with `patients`' diagnoses turned over in a PatientDiagnosis.csv of
    its own (NEGATIVA <-> ALTA, BAIXA -> NEGATIVA): what must change no weight and no prediction of a model that was
    never given those labels."""
    where.mkdir()
    for entry in root.iterdir():
        if entry.name != "PatientDiagnosis.csv":
            (where / entry.name).symlink_to(entry)
    lines = (root / "PatientDiagnosis.csv").read_text().splitlines()
    swap = {"NEGATIVA": "ALTA", "ALTA": "NEGATIVA", "BAIXA": "NEGATIVA"}
    body = [f"{p},{swap[d]}" if p in patients else line for line in lines[1:] for p, d in [line.split(",")[:2]]]
    (where / "PatientDiagnosis.csv").write_text("\n".join([lines[0], *body]) + "\n")
    return where
