"""runlog.py: log.jsonl is written whole, one JSON line per epoch, and read back leniently."""
from helico import runlog


def test_written_records_read_back_equal_and_a_missing_log_reads_empty(tmp_path):
    records = [{"epoch": 1, "train_loss": 0.5, "pr_auc": float("nan")}, {"epoch": 2, "train_loss": 0.25}]
    assert runlog.read(tmp_path) == []
    runlog.write(tmp_path, records)
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 2
    back = runlog.read(tmp_path)
    assert [r["epoch"] for r in back] == [1, 2] and back[1] == records[1] and back[0]["pr_auc"] != back[0]["pr_auc"]


def test_reading_skips_unparsable_lines_and_lines_without_an_epoch(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "trunc\n[1, 2]\n{"loss": 1}\n{"epoch": 3}\n')
    assert runlog.read(tmp_path) == [{"epoch": 1}, {"epoch": 3}]
