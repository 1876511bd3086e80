"""Every way a run can stop, tried as users meet it: the real scripts in their own process, DataLoader workers on,
a time limit, and then the exit code, the one line that says why, and what is left on disk."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helico import analysis
import common

ROOT = Path(__file__).resolve().parents[1]
# 48 training samples at 32 px, no Macenko: seconds of work, so a hang is unmistakable.
FAST = ["--device", "cpu", "--image-size", "32", "--batch-size", "16", "--weights", "none", "--seed", "0",
        "--limit-samples", "48", "--no-macenko"]
LIMIT = 90  # seconds: a healthy run of these scripts takes ~10-20 s here (mostly imports); the hang was for ever


def child_env(**extra) -> dict:
    """Every script started here: the project on PYTHONPATH, one BLAS thread (main process and 2 workers, 2 cores)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def script(name, *argv, timeout=LIMIT, env=()):
    """Run ROOT/name as its own process group, as a shell or SLURM starts it; the group is killed on timeout."""
    proc = subprocess.Popen([sys.executable, str(ROOT / name), *map(str, argv)], env=child_env(**dict(env)),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{name} still running after {timeout} s (hang): {err[-2000:]}")
    return proc.returncode, out, err


def signal_once_workers_run(argv: list, signum: int, settle: float, **popen) -> tuple[int, str]:
    """Start `python argv` as its own process group; once its DataLoader workers exist and `settle` s more have
    passed, send `signum` to the whole group (a terminal's Ctrl-C, SLURM's TERM). Its exit code and stderr; failed
    if it never starts workers or does not exit LIMIT s after the signal."""
    proc = subprocess.Popen([sys.executable, *map(str, argv)], env=child_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + LIMIT
    while not children.read_text().strip():  # the workers start with the first batch
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(settle)
    os.killpg(proc.pid, signum)
    try:
        _, err = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"no exit {LIMIT} s after {signal.Signals(signum).name}: {proc.communicate()[1][-2000:]}")
    return proc.returncode, err


def stop_lines(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("stopped by")]


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


# ----------------------------------------------------------------------------------------------- stops
def test_ctrl_c_saves_last_pt_and_exits_4_in_one_line(demo_root, tmp_path):
    import torch
    # a terminal's Ctrl-C: the whole foreground group; 2 s settle: the workers are past their worker_init_fn
    code, err = signal_once_workers_run([ROOT / "train.py", "--data-root", demo_root, "--runs-dir", tmp_path,
                                         "--run-id", "interrupted", *FAST, "--workers", "2", "--epochs", "50"],
                                        signal.SIGINT, settle=2)
    assert code == common.EXIT_STOPPED, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    stopped = stop_lines(err)
    assert len(stopped) == 1 and "SIGINT" in stopped[0] and "resume" in stopped[0], err[-2000:]
    ckpt = torch.load(tmp_path / "interrupted" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] * 3 + ckpt["progress"]["step"] >= 1


# ----------------------------------------------------------------------------------------------- the disk
FULL_DISK = """
import errno, os, sys
real_write = os.write

def full_once_a_last_pt_exists(fd, data):  # the disk fills up while epoch 2 saves its checkpoint
    name = os.readlink(f"/proc/self/fd/{fd}")
    if "/.last.pt." in name and os.path.exists(os.path.join(os.path.dirname(name), "last.pt")):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(fd, data)

os.write = full_once_a_last_pt_exists
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_full_disk_while_saving_exits_5_naming_the_folder_and_keeps_the_previous_checkpoints(demo_root, tmp_path):
    import torch
    run = subprocess.run([sys.executable, "-c", FULL_DISK, "--data-root", str(demo_root), "--runs-dir", str(tmp_path),
                          "--run-id", "full", *FAST, "--workers", "2", "--epochs", "2"], env=child_env(),
                         capture_output=True, text=True, timeout=LIMIT * 2)
    assert run.returncode == common.EXIT_ENVIRONMENT, run.stderr[-2000:]
    lines = error_lines(run.stderr)
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert str(tmp_path / "full") in lines[0] and "no space left" in lines[0] and "free space" in lines[0]
    load = lambda name: torch.load(tmp_path / "full" / name, map_location="cpu", weights_only=True)
    assert load("last.pt")["epoch"] == 1  # epoch 1's, whole: epoch 2's never replaced it
    assert load("best.pt")["epoch"] in (1, 2)  # whole (epoch 2's is written before last.pt when it improved)
    assert not list((tmp_path / "full").glob(".*.tmp"))  # nothing half-written left behind


def test_an_unwritable_runs_dir_exits_2_in_one_line_before_any_work(demo_root, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    runs = tmp_path / "a-file" / "runs"  # root ignores chmod; a path through a file fails for everyone
    code, _, err = script("train.py", "--data-root", demo_root, "--runs-dir", runs, "--run-id", "x", *FAST,
                          "--workers", "2", "--epochs", "1")
    assert code == common.EXIT_BAD_INPUT, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err and f"--runs-dir {runs}" in lines[0], err[-2000:]


def test_a_folder_access_refuses_is_bad_input_naming_the_flag_and_why(tmp_path, monkeypatch):
    monkeypatch.setattr(common.os, "access", lambda path, mode: False)  # access(2) on a read-only mount, or no rights
    with pytest.raises(common.DataError, match=r"--runs-dir .* cannot write in .* \((read-only file system|permission "
                                               r"denied)\)"):
        common.writable_folder(tmp_path / "runs", "--runs-dir")


# ----------------------------------------------------------------------------------------------- --skip-bad-images
def warned(err: str) -> set[str]:
    return set(re.findall(r"^warning: skipped unreadable (\S+)", err.replace("\r", "\n"), re.MULTILINE))


def test_skip_bad_images_names_every_skipped_file_on_stderr_and_in_the_run_folder(truncated_root, tmp_path):
    from helico import unseen
    root, broken = truncated_root
    code, _, err = script("train.py", "--data-root", root, "--runs-dir", tmp_path, "--run-id", "skip", *FAST,
                          "--workers", "2", "--epochs", "1", "--skip-bad-images")
    assert code == 0, err[-2000:]
    run_dir = tmp_path / "skip"
    split, data = json.loads((run_dir / "split.json").read_text()), common.load_data(root)
    trained = unseen.encoder_training_samples(data, split["train"], "half", 48, 0)  # what train.py trains on
    seen = {s.path for s in trained} | {s.path for s in common.select(data.labelled, split["val"])}
    expected = seen & set(broken)
    assert expected, "the test data must put a broken file in this run"
    assert warned(err) == expected
    assert set((run_dir / "skipped_images.txt").read_text().splitlines()) == expected


def test_evaluate_skip_bad_images_names_every_skipped_file_and_lists_them(tiny_run, empty_root, tmp_path):
    import torch
    root, broken = empty_root
    out = tmp_path / "eval"
    code, _, err = script("evaluate.py", "--checkpoint", tiny_run / "best.pt", "--data-root", root, "--out", out,
                          "--device", "cpu", "--workers", "2", "--bootstrap", "0", "--gradcam", "0",
                          "--skip-bad-images")
    assert code == 0, err[-2000:]
    split = torch.load(tiny_run / "best.pt", map_location="cpu", weights_only=True)["split"]
    parts = {part: split[part] for part in ("val", "test") if split.get(part)}  # what evaluate.py scores
    expected = {r.sample.path for r in analysis.evaluation_rows(common.load_data(root), parts)} & set(broken)
    assert expected and warned(err) == expected
    assert set((out / "skipped_images.txt").read_text().splitlines()) == expected


# ----------------------------------------------------------------------------------------------- evaluate.py
def test_compare_of_runs_sharing_fewer_than_5_validation_patients_is_refused(tiny_run, tmp_path):
    import torch
    ckpt = torch.load(tiny_run / "best.pt", map_location="cpu", weights_only=True)
    other = dict(ckpt, split={"train": ckpt["split"]["train"][4:] + ckpt["split"]["val"][1:],
                              "val": ckpt["split"]["val"][:1] + ckpt["split"]["train"][:4]})  # another split
    torch.save(other, tmp_path / "other.pt")
    code, out, err = script("evaluate.py", "--compare", tiny_run / "best.pt", tmp_path / "other.pt", "--out",
                            tmp_path / "compare", "--device", "cpu", "--workers", "2", "--bootstrap", "50")
    assert code == common.EXIT_BAD_INPUT, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "share 1 val patient" in lines[0] and "at least 5" in lines[0], err[-2000:]
    assert "noise" not in out and not (tmp_path / "compare").exists()


def run_with_a_previous_report(tiny_run, tmp_path) -> Path:
    """A run folder holding tiny_run's best.pt and an earlier eval/ report that a failed evaluation must keep."""
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    shutil.copy(tiny_run / "best.pt", run / "best.pt")
    (run / "eval" / "metrics.json").write_text('{"previous": true}\n')
    (run / "eval" / "report.md").write_text("the previous report\n")
    return run


def previous_report_kept(run: Path) -> bool:
    return (sorted(p.name for p in run.iterdir()) == ["best.pt", "eval"]  # no temp folder left behind
            and (run / "eval" / "report.md").read_text() == "the previous report\n")


# os.write alone would miss it: the report's files are written through Python file objects and matplotlib.
FULL_DISK_REPORT = """
import errno, os, pathlib, sys
real_write_text = pathlib.Path.write_text

def full_in_the_new_report(self, *args, **kwargs):  # the disk fills up while evaluate.py writes its report
    if self.parent.name.startswith(".eval."):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name
    return real_write_text(self, *args, **kwargs)

pathlib.Path.write_text = full_in_the_new_report
import evaluate
sys.exit(evaluate.main(sys.argv[1:]))
"""


def test_a_full_disk_while_evaluate_writes_its_report_exits_5_naming_the_folder_and_keeps_the_previous_one(
        tiny_run, tmp_path):
    run = run_with_a_previous_report(tiny_run, tmp_path)
    r = subprocess.run([sys.executable, "-c", FULL_DISK_REPORT, "--checkpoint", str(run / "best.pt"), "--device",
                        "cpu", "--workers", "2", "--bootstrap", "0", "--gradcam", "0"], env=child_env(),
                       capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode == common.EXIT_ENVIRONMENT, r.stderr[-2000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith(f"error: {run}: no space left while writing eval/"), lines[0]  # not the temp folder
    assert "previous one is kept" in lines[0] and "free space there" in lines[0]
    assert previous_report_kept(run)


# Scoring made slow on purpose (50 ms a batch, whatever the CPU), so the Ctrl-C surely lands while workers decode.
SLOW_SCORING = """
import sys, time
import evaluate
real_model_input = evaluate.model.model_input

def slow_model_input(*args, **kwargs):
    time.sleep(0.05)
    return real_model_input(*args, **kwargs)

evaluate.model.model_input = slow_model_input
sys.exit(evaluate.main(sys.argv[1:]))
"""


def ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum, says", [(signal.SIGINT, "stopped by Ctrl-C"), (signal.SIGTERM, "stopped by SIGTERM")])
def test_ctrl_c_or_sigterm_during_evaluation_with_workers_keeps_the_previous_report(tiny_run, tmp_path, signum, says):
    # SIGTERM: SLURM's time limit, and the launcher's form of Ctrl-C. The process starts with SIGINT ignored, as a
    # shell script's background job does (CI ran the suite so once, and evaluate.py then shrugged Ctrl-C off).
    run = run_with_a_previous_report(tiny_run, tmp_path)
    code, err = signal_once_workers_run(["-c", SLOW_SCORING, "--checkpoint", run / "best.pt", "--device", "cpu",
                                         "--workers", "2", "--batch-size", "2", "--bootstrap", "0", "--gradcam", "0"],
                                        signum, settle=1, preexec_fn=ignore_sigint)
    assert code == 128 + signum, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    stopped = stop_lines(err)
    assert len(stopped) == 1 and stopped[0].startswith(says) and "no report written" in stopped[0], err[-2000:]
    assert previous_report_kept(run)


# ----------------------------------------------------------------------------------------------- messages
def test_a_truncated_last_pt_is_one_whole_line_naming_the_run_not_a_flag_train_lacks(demo_root, tmp_path, capsys):
    import torch
    import train
    torch.save({"weights": torch.zeros(10_000)}, tmp_path / "whole.pt")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "last.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:20_000])
    argv = ["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-id", "cut", *FAST, "--workers", "0"]
    assert train.main(argv) == common.EXIT_BAD_INPUT
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert "--run-id cut" in lines[0] and "--checkpoint" not in lines[0] and str(tmp_path / "cut" / "last.pt") in lines[0]
    assert "unreadable checkpoint (" in lines[0] and lines[0].endswith("not written by train.py")  # whole, not cut


def test_imagenet_weights_offline_say_where_the_cache_is_and_how_to_fill_it(demo_root, tmp_path):
    offline = {"TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy":
               "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}  # nothing listens on port 9: no network
    code, _, err = script("train.py", "--data-root", demo_root, "--runs-dir", tmp_path, "--run-id", "offline",
                          *FAST, "--weights", "imagenet", "--workers", "2", "--epochs", "1",
                          env=offline)
    assert code == common.EXIT_BAD_INPUT, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-") in lines[0]  # the file it looked for
    assert "login node" in lines[0] and "get_state_dict()" in lines[0]


def test_the_cache_build_names_every_undecodable_png(truncated_root, tmp_path):
    root, broken = truncated_root
    code, out, err = script("patch_cache.py", "--data-root", root, "--out", tmp_path / "cache", "--image-size", "32",
                            "--workers", "2", "--quiet")
    assert code == 0, err[-2000:]
    named = set(re.findall(r"^warning: undecodable (\S+):", err, re.MULTILINE))
    assert named == {str(root / p) for p in broken}


# ----------------------------------------------------------------------------------------------- uncaught faults
FAULTS_RAISED = {  # what reached main() uncaught -> (exit code, what its one line names)
    "io": (OSError(5, "Input/output error", "/node/disk/patches.u8"), common.EXIT_ENVIRONMENT,
           "I/O error"),  # naming the file, or the folder the command knows it by (patch_cache: --out)
    "missing file": (FileNotFoundError(2, "No such file or directory", "/data/x.csv"), common.EXIT_BAD_INPUT,
                     "/data/x.csv: No such file or directory"),
    "missing module": (ModuleNotFoundError("No module named 'openpyxl'", name="openpyxl"), common.EXIT_BAD_INPUT,
                       "openpyxl"),
}


@pytest.mark.parametrize("command, entry", [("audit_leakage", "audit_all"), ("train", "run"), ("evaluate",
                                            "run_evaluation"), ("patch_cache", "packed_cache.build_cache")])
@pytest.mark.parametrize("fault", list(FAULTS_RAISED))
def test_an_uncaught_os_or_import_error_is_one_line_and_its_documented_code_never_1(command, entry, fault, monkeypatch,
                                                                                     capsys, tmp_path):
    # Python's own exit 1 is the audit's "leak" and train.py's "dependent HoldOut": the launcher reads exit codes only
    import importlib
    module = importlib.import_module(command)
    error, code, named = FAULTS_RAISED[fault]

    def crash(*args, **kwargs):
        raise error
    target = module if "." not in entry else getattr(module, entry.split(".")[0])
    monkeypatch.setattr(target, entry.split(".")[-1], crash)
    monkeypatch.setattr(common, "load_data", lambda root: None)
    argv = {"audit_leakage": ["--data-root", str(tmp_path)],
            "train": ["--data-root", str(tmp_path), "--device", "cpu", "--runs-dir", str(tmp_path)],
            "evaluate": ["--checkpoint", str(tmp_path / "best.pt"), "--device", "cpu"],
            "patch_cache": ["--data-root", str(tmp_path), "--out", str(tmp_path / "c"), "--workers", "1"]}[command]
    assert module.main(argv) == code
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("error: ") and named in line
    if fault == "missing module":
        assert "pip install -r requirements.txt" in line


# ----------------------------------------------------------------------------------------------- messages
@pytest.mark.parametrize("command, flag", [("train_patient", "--checkpoint"), ("evaluate", "--checkpoint"),
                                           ("evaluate", "--compare")])
def test_a_run_folder_given_as_checkpoint_names_the_checkpoints_inside_it(command, flag, tiny_run, capsys):
    import importlib
    argv = [flag, str(tiny_run)] + ([str(tiny_run / "best.pt")] if flag == "--compare" else []) + ["--device", "cpu"]
    assert importlib.import_module(command).main(argv) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == (f"error: {flag} {tiny_run}: a folder, not a checkpoint; pass {tiny_run / 'best.pt'} (the best "
                   f"validation epoch) or {tiny_run / 'last.pt'} (the last)\n")


def test_a_folder_the_user_may_not_write_exits_5_naming_it_never_a_temp_file(tmp_path, monkeypatch, capsys):
    # what mkstemp raises in a read-only bag folder (root ignores chmod, so the system's answer is reproduced here)
    def refused(prefix, suffix, dir):
        raise PermissionError(13, "Permission denied", os.path.join(dir, f"{prefix}k3j9x{suffix}"))
    monkeypatch.setattr(common.tempfile, "mkstemp", refused)
    bags = tmp_path / "patient" / "bags" / "0123456789abcdef"
    code = common.guarded_main(lambda: common.atomic_write_text(bags / "B22-03.pt", "x"), kept="the bags extracted "
                               "so far are kept", again="run the same command again")
    err = capsys.readouterr().err
    assert code == common.EXIT_ENVIRONMENT and err.count("\n") == 1 and ".tmp" not in err
    assert err.startswith(f"error: {bags}: permission denied while writing B22-03.pt (any previous one is kept);")


def test_a_file_size_limit_while_saving_exits_5_naming_the_run_folder(demo_root, tmp_path):
    import resource
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, resource.RLIM_INFINITY))  # ulimit -f 8192
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data-root", str(demo_root), "--runs-dir",
                           str(tmp_path), "--run-id", "big", *FAST, "--workers", "0", "--epochs", "1"],
                          env=child_env(), preexec_fn=limit, capture_output=True, text=True, timeout=LIMIT)
    assert proc.returncode == common.EXIT_ENVIRONMENT, proc.stderr[-2000:]
    [line] = error_lines(proc.stderr)
    assert line.startswith(f"error: {tmp_path / 'big'}: file too large for that file system or the file-size limit "
                           f"(ulimit -f) while writing best.pt") and ".tmp" not in line, line
    assert not list((tmp_path / "big").glob(".*.tmp"))
