"""run_h_pylori.sh, run with bash outside SLURM the way a user tries it before `sbatch`.

Each test copies the demo dataset to a "shared" folder in tmp_path and points TMPDIR (the node-local disk when
SLURM_TMPDIR is absent) at another tmp folder, so staging, the audit gate and the run folder are all observable.
Staging tests use --stage-only (stage, print the staged path, exit) so they do not pay for training."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY_TRAIN_FLAGS
import common
from helico import staining

SCRIPT = ROOT / "run_h_pylori.sh"
TRAIN_FLAGS = [*TINY_TRAIN_FLAGS, "--epochs", "1", "--limit-samples", "64"]
# the caller's settings must not leak into the script under test (SLURM_* are dropped too)
CLEARED = ("HELICO_DATA", "PYTHON", "RUNS_DIR", "STAGE_DIR", "STAGE_RESERVE_MB", "STAGE_LOCK_TIMEOUT", "EVAL_ARGS",
           "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SRUN_CPUS_PER_TASK", "CACHE")


@pytest.fixture
def demo_root(small_demo_root):
    """Every test here copies the dataset, and most stage, audit and cache it: the 12-patient demo serves."""
    return small_demo_root


@pytest.fixture
def node(tmp_path):
    """A shared dataset folder (empty until copy_demo), a node-local disk, a runs folder; run()/stage() launch."""
    shared = tmp_path / "shared" / "HelicoDataSet"
    return Node(tmp_path, shared)


class Node:
    def __init__(self, tmp_path: Path, shared: Path):
        self.tmp, self.shared = tmp_path, shared
        self.local = tmp_path / "node-local"
        self.runs = tmp_path / "runs"
        self.local.mkdir()

    def copy_demo(self, demo_root):
        shutil.copytree(demo_root, self.shared)
        return self

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.startswith("SLURM_")}
        env.update(HELICO_DATA=str(self.shared), TMPDIR=str(self.local), PYTHON=sys.executable,
                   RUNS_DIR=str(self.runs))
        env.update(extra)
        return {k: v for k, v in env.items() if v is not None}

    def run(self, *args, timeout=300, **extra) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *map(str, args)], env=self.env(**extra), cwd=self.tmp,
                              capture_output=True, text=True, timeout=timeout)

    def stage(self, **extra) -> tuple[subprocess.CompletedProcess, Path]:
        r = self.run("--stage-only", **extra)
        assert r.returncode == 0, r.stderr
        return r, Path(r.stdout.strip().splitlines()[-1])

    def staged_dirs(self) -> list[Path]:
        return sorted(p for p in (self.local / "helico-stage").glob("*") if p.is_dir() and "-cache" not in p.name)

    def cache_dirs(self) -> list[Path]:
        """The caches train.py built under the launcher's --cache-base (<staged copy>-cache)."""
        return sorted(p for base in (self.local / "helico-stage").glob("*-cache") for p in base.iterdir() if p.is_dir())


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def marker_of(staged: Path) -> Path:
    return staged.with_name(staged.name + ".complete")


def path_without_rsync(tmp_path: Path) -> str:
    """A PATH holding every command of the current PATH except rsync (symlinks), like a node without rsync."""
    bin_dir = tmp_path / "bin-without-rsync"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            target = os.path.join(d, name)
            if name != "rsync" and not (bin_dir / name).exists() and os.access(target, os.X_OK):
                (bin_dir / name).symlink_to(target)
    return str(bin_dir)


def require_rsync():
    # Not a skip: the rsync path is the one clusters use, so a machine without rsync must fail loudly here.
    assert shutil.which("rsync"), "rsync is not installed (apt-get install -y rsync): the rsync path is untested"


# ----------------------------------------------------------------------------------------------- staging
def test_staging_copies_the_dataset_with_rsync_and_writes_a_verified_marker(node, demo_root):
    require_rsync()
    r, staged = node.copy_demo(demo_root).stage()
    assert staged.parent == node.local / "helico-stage"
    assert "with rsync" in r.stderr
    assert files(staged) == files(node.shared)
    n_files, n_bytes, _ = marker_of(staged).read_text().split()
    assert int(n_files) == len(files(node.shared)) and int(n_bytes) == sum(files(node.shared).values())


def test_second_run_reuses_the_marked_copy_without_copying(node, demo_root):
    _, staged = node.copy_demo(demo_root).stage()
    marker_time = marker_of(staged).stat().st_mtime_ns
    r, again = node.stage()
    assert again == staged
    assert "reusing verified copy" in r.stderr and "copying" not in r.stderr
    assert marker_of(staged).stat().st_mtime_ns == marker_time


def test_a_file_deleted_from_a_marked_copy_is_not_trusted_and_is_resynced(node, demo_root):
    _, staged = node.copy_demo(demo_root).stage()
    (staged / "PatientDiagnosis.csv").unlink()
    r, again = node.stage()
    assert "not trusted" in r.stderr and "reusing" not in r.stderr
    assert files(again) == files(node.shared)


def test_a_marker_that_mismatches_the_source_is_not_trusted(node, demo_root):
    _, staged = node.copy_demo(demo_root).stage()
    marker_of(staged).write_text("1 2 3\n")
    r, _ = node.stage()
    assert "not trusted" in r.stderr and "copying" in r.stderr
    assert marker_of(staged).read_text().split()[0] == str(len(files(node.shared)))


def test_a_changed_source_is_resynced_including_deletions(node, demo_root):
    _, staged = node.copy_demo(demo_root).stage()
    (node.shared / "PatientDiagnosis.csv").write_text((node.shared / "PatientDiagnosis.csv").read_text() + "\n")
    removed = next((node.shared / "HoldOut").rglob("*.png"))
    removed.unlink()
    r, _ = node.stage()
    assert "not trusted" in r.stderr
    assert files(staged) == files(node.shared)


def test_a_partial_copy_without_marker_is_resumed_and_verified(node, demo_root):
    require_rsync()
    node.copy_demo(demo_root)
    _, staged = node.stage()
    # what a job killed mid-copy leaves: no marker, a truncated file, a folder not copied yet
    marker_of(staged).unlink()
    png = next((staged / "CrossValidation" / "Annotated").rglob("*.png"))
    png.write_bytes(png.read_bytes()[:100])
    shutil.rmtree(staged / "HoldOut")
    r, again = node.stage()
    assert "with rsync" in r.stderr and "verified" in r.stderr
    assert files(again) == files(node.shared) and marker_of(again).exists()


def test_without_rsync_staging_falls_back_to_cp_with_a_warning(node, demo_root):
    node.copy_demo(demo_root)
    r, staged = node.stage(PATH=path_without_rsync(node.tmp))
    assert "WARNING: rsync not found" in r.stderr
    assert staged.parent == node.local / "helico-stage" and files(staged) == files(node.shared)
    assert marker_of(staged).exists()


def test_not_enough_node_disk_falls_back_to_the_shared_path_with_a_warning(node, demo_root):
    node.copy_demo(demo_root)
    r, used = node.stage(STAGE_RESERVE_MB=str(10 ** 12))  # ask to keep an exabyte free
    assert "WARNING: not enough space" in r.stderr and "training from the shared path" in r.stderr
    assert used == node.shared
    assert not any(marker_of(d).exists() for d in node.staged_dirs())


def test_two_jobs_on_one_node_copy_the_data_once(node, demo_root):
    node.copy_demo(demo_root)
    jobs = [subprocess.Popen(["bash", str(SCRIPT), "--stage-only"], env=node.env(), cwd=node.tmp,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [j.communicate(timeout=120) for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0]
    logs = "".join(err for _, err in outs)
    assert logs.count("staging: copying") == 1, logs
    assert len({out.strip().splitlines()[-1] for out, _ in outs}) == 1


def test_stage_dir_off_reads_the_shared_path(node, demo_root):
    node.copy_demo(demo_root)
    r, used = node.stage(STAGE_DIR="off")
    assert used == node.shared and not (node.local / "helico-stage").exists()


# ----------------------------------------------------------------------------------------------- bad input
def test_unset_helico_data_exits_2_with_a_clear_error(node):
    r = node.run("--run-id", "x", HELICO_DATA=None)
    assert r.returncode == 2 and "HELICO_DATA is not set" in r.stderr


def test_missing_dataset_root_exits_2(node):
    r = node.run("--run-id", "x", HELICO_DATA=str(node.tmp / "nowhere"))
    assert r.returncode == 2 and "is not a directory" in r.stderr


def test_missing_run_id_exits_2_before_staging(node, demo_root):
    r = node.copy_demo(demo_root).run("--epochs", "1")
    assert r.returncode == 2 and "--run-id is required outside SLURM" in r.stderr
    assert not (node.local / "helico-stage").exists()


def test_help_prints_usage_and_environment(node):
    r = node.run("--help")
    assert r.returncode == 0 and "HELICO_DATA" in r.stdout and "sbatch run_h_pylori.sh" in r.stdout
    assert "torch.hub.get_dir()" in r.stdout and "--clean-stage" in r.stdout


def help_example(help_text: str) -> list[str]:
    line = next(line for line in help_text.splitlines() if line.strip().startswith("HELICO_DATA=demo_data bash"))
    return line.split()[3:]  # after "HELICO_DATA=demo_data bash run_h_pylori.sh"


def recording_python(node, stop_train: bool = True) -> tuple[str, Path]:
    """An interpreter that appends each audit_leakage.py and train.py command line to calls.txt (the audit then runs
    for real; train.py, with stop_train, exits 2 at once)."""
    calls = node.tmp / "calls.txt"
    wrapper = node.tmp / "python-recorder"
    train = "exit 2" if stop_train else f'exec {sys.executable} "$@"'
    wrapper.write_text(f'#!/bin/bash\ncase ${{1:-}} in */audit_leakage.py|*/train.py) echo "$*" >>{calls};; esac\n'
                       f'[[ ${{1:-}} == */train.py ]] && {train}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), calls


def test_the_audit_gets_train_pys_very_arguments(node, demo_root):
    # the launcher once copied only the split flags it had read from argparse's private _actions; now the audit takes
    # train.py's whole command line, so whatever reaches train.py reaches the audit
    python, calls = recording_python(node)
    split = ["--val-frac", "0.3", "--split-seed", "4", "--folds", "3", "--fold", "1", "--test-frac=0"]
    r = node.copy_demo(demo_root).run("--run-id", "same", *split, *TRAIN_FLAGS, CACHE="off", PYTHON=python)
    assert r.returncode == 2, r.stderr[-3000:]
    check, audit, train = (line.split()[1:] for line in calls.read_text().splitlines())
    assert check[0] == "--check-flags" and audit == train, (audit, train)
    assert train[train.index("--val-frac") + 1] == "0.3" and "--test-frac=0" in train and "--fold" in train
    assert "audit: checking the split" in r.stderr and "train/validation/test" in r.stderr


@pytest.mark.parametrize("abbreviated", [["--val", "0.3"], ["--epoch", "1"]])
def test_an_abbreviated_flag_is_refused_in_one_line_before_staging(node, demo_root, abbreviated):
    r = node.copy_demo(demo_root).run("--run-id", "abbrev", *TRAIN_FLAGS, *abbreviated)
    assert r.returncode == 2, r.stderr[-3000:]
    [line] = [line for line in r.stderr.splitlines() if "error" in line]
    assert line.startswith(f"error: unrecognized arguments: {' '.join(abbreviated)}"), r.stderr
    assert not (node.local / "helico-stage").exists() and not node.runs.exists()


def test_a_run_folder_holding_a_finished_model_without_last_pt_is_refused_in_one_line_before_staging(node):
    run_dir = node.runs / "nopm"  # a finished run whose last.pt was deleted to save space, evaluated
    (run_dir / "eval").mkdir(parents=True)
    for name in ("best.pt", "config.json", "log.jsonl", "eval/metrics.json"):
        (run_dir / name).write_text("kept\n")
    before = {p: p.read_text() for p in run_dir.rglob("*") if p.is_file()}
    r = node.run("--run-id", "nopm", "--epochs", "20")
    assert r.returncode == 2, r.stderr[-3000:]
    [line] = [line for line in r.stderr.splitlines() if "error" in line]
    assert line == (f"error: {node.runs}/nopm holds a model of an earlier run (best.pt, "
                    f"config.json, eval/, log.jsonl) and no last.pt to resume from: use another --run-id, or --force "
                    f"to replace it (its evaluation folders are kept as <name>.stale)"), r.stderr
    assert {p: p.read_text() for p in run_dir.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "config.json", "eval", "log.jsonl"]
    assert not (node.local / "helico-stage").exists()


# ----------------------------------------------------------------------------------------------- pipeline
def leaky_split(node, tmp_path) -> Path:
    """A split file whose validation part repeats a training patient."""
    from helico import splits
    data = common.load_data(node.shared)
    split = splits.make_split(data, seed=0, keep_in_train=staining.reference_patients(staining.DEFAULT_REFERENCE))
    split["val"].append(next(p for p in split["train"] if p != "B22-47"))
    path = tmp_path / "leaky_split.json"
    path.write_text(json.dumps(split))
    return path


@pytest.mark.parametrize("form", ["--split FILE", "--split=FILE"])
def test_a_leaky_split_stops_the_job_with_exit_1_before_training(node, demo_root, form):
    node.copy_demo(demo_root)
    split = leaky_split(node, node.tmp)
    flag = ["--split", split] if form == "--split FILE" else [f"--split={split}"]
    r = node.run("--run-id", "leaky", *flag, *TRAIN_FLAGS)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "patient leak" in r.stderr and "not training" in r.stderr
    assert not (node.runs / "leaky").exists()


def test_audit_bad_input_exit_2_passes_through_and_nothing_trains(node, demo_root):
    r = node.copy_demo(demo_root).run("--run-id", "bad", "--val-frac=1.5", *TRAIN_FLAGS)
    assert r.returncode == 2, r.stderr[-2000:]
    assert not (node.runs / "bad").exists()


def test_the_help_example_as_printed_trains_on_the_staged_copy_and_evaluates_best_checkpoint(node, demo_root):
    # One real run serves both claims: the --help example works as printed (offline, not make demo's run ID) and a
    # clean job stages, caches, trains and evaluates.
    args = help_example(node.run("--help").stdout)
    run_id = args[args.index("--run-id") + 1]
    assert run_id != "demo"  # `make demo` writes runs/demo
    assert args[args.index("--weights") + 1] == "none"  # no download: compute nodes are often offline
    node.copy_demo(demo_root)
    # as printed, plus a sample limit; EVAL_ARGS reach evaluate.py: no Grad-CAM, no bootstrap; no network is used
    r = node.run(*args, "--limit-samples", "64", "--workers", "0", EVAL_ARGS="--gradcam 0 --bootstrap 0")
    assert r.returncode == 0, r.stderr[-3000:]
    run = node.runs / run_id
    assert (run / "best.pt").is_file() and (run / "split.json").is_file()
    assert (run / "eval" / "metrics.json").is_file() and (run / "eval" / "report.md").is_file()
    assert not (run / "eval" / "gradcam").exists()
    # the patient model, trained in the same job from the staged copy and reported beside the rule
    assert (run / "patient" / "best.pt").is_file() and (run / "patient" / "log.jsonl").is_file()
    assert "patient_mil" in json.loads((run / "eval" / "metrics.json").read_text())
    staged = node.staged_dirs()
    assert len(staged) == 1 and marker_of(staged[0]).exists()
    config = json.loads((run / "config.json").read_text())
    assert Path(config["data_root"]).resolve() == staged[0].resolve()
    # CACHE defaults to on: a packed cache beside the staged copy, read by training and evaluation, Macenko-normalized
    # (Macenko on, so applied once in the cache rather than every epoch)
    [cache] = node.cache_dirs()  # train.py named it under the launcher's --cache-base, for --image-size 64
    assert cache.parent.name == staged[0].name + "-cache" and cache.name.startswith("cache64-macenko-")
    assert json.loads((cache / "meta.json").read_text())["complete"] is True
    assert config["cache"] == str(cache) and config["cache_normalized"] is True
    assert json.loads((run / "eval" / "metrics.json").read_text())["meta"]["cache"] == config["cache"]


def start(node, *args, **extra) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SCRIPT), *map(str, args)], env=node.env(**extra), cwd=node.tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_when_exists(job: subprocess.Popen, path: Path, timeout=180) -> str:
    """Send USR1 to the launcher (what SLURM's --signal=B:USR1@120 does) once `path` exists; return its stderr."""
    try:
        deadline = time.time() + timeout
        while not path.exists() and job.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert job.poll() is None, job.communicate()[1][-3000:]
        job.send_signal(signal.SIGUSR1)
        return job.communicate(timeout=180)[1]
    finally:
        if job.poll() is None:
            job.kill()


def test_usr1_is_forwarded_so_training_checkpoints_and_evaluation_is_skipped(node, demo_root):
    node.copy_demo(demo_root)
    job = start(node, "--run-id", "pre", *TRAIN_FLAGS, "--epochs", "200")
    # config.json is written after train.py installed its signal handlers
    err = signal_when_exists(job, node.runs / "pre" / "config.json")
    assert job.returncode == 4, err[-3000:]  # train.py's "stopped after writing last.pt, resume me"
    assert "USR1 received: asking training" in err and "stopped by signal" in err and "evaluation skipped" in err
    assert "run the same command to resume" in err
    assert (node.runs / "pre" / "last.pt").is_file()
    assert not (node.runs / "pre" / "eval").exists()


def test_two_listed_gpus_run_torchrun_and_usr1_reaches_its_workers(node, demo_root):
    # CUDA_VISIBLE_DEVICES only decides the process count here; --device cpu makes the 2 ranks use gloo. CACHE=off:
    # the signal path is the subject, and the cache step is tested on its own below.
    node.copy_demo(demo_root)
    job = start(node, "--run-id", "ddp", *TRAIN_FLAGS, "--epochs", "200", "--no-macenko",
                CUDA_VISIBLE_DEVICES="0,1", SLURM_CPUS_PER_TASK="2", CACHE="off")
    # an epoch's log line: both workers are past start-up, their handlers installed
    err = signal_when_exists(job, node.runs / "ddp" / "log.jsonl")
    assert "torch.distributed.run --standalone --nproc_per_node 2" in err
    assert "OMP_NUM_THREADS=1, SRUN_CPUS_PER_TASK=2" in err  # 2 CPUs shared by 2 processes
    assert json.loads((node.runs / "ddp" / "config.json").read_text())["world_size"] == 2
    assert job.returncode == 4, err[-3000:]
    assert "stopped by signal" in err and "evaluation skipped" in err
    assert (node.runs / "ddp" / "last.pt").is_file()


@pytest.mark.parametrize("flag", ["", "--no-patient-model"])
def test_the_patient_model_step_runs_after_training_unless_turned_off(node, small_demo_root, flag):
    # Stand-ins after the real audit: train.py "finishes" at once (best.pt is there), train_patient.py exits 2 and
    # evaluate.py 0, so the log shows whether the step ran and that its exit code is read like every step's.
    (node.runs / "pm").mkdir(parents=True)
    for name in ("best.pt", "last.pt"):  # a finished run, as the stand-in train.py leaves it
        (node.runs / "pm" / name).write_bytes(b"")
    wrapper = node.tmp / "python-wrapper"
    wrapper.write_text('#!/bin/bash\ncase ${1:-} in\n  */train.py|*/evaluate.py) exit 0 ;;\n'
                       '  */train_patient.py) echo "train_patient.py: simulated $*" >&2; exit 2 ;;\nesac\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    r = node.copy_demo(small_demo_root).run("--run-id", "pm", *TRAIN_FLAGS, *[flag] * bool(flag), CACHE="off",
                                            STAGE_DIR="off", PYTHON=str(wrapper))
    if flag:
        assert r.returncode == 0 and "train_patient.py" not in r.stderr, r.stderr[-3000:]
        return
    assert r.returncode == 2, r.stderr[-3000:]
    [called] = [line for line in r.stderr.splitlines() if line.startswith("train_patient.py: simulated")]
    assert f"--checkpoint {node.runs / 'pm' / 'best.pt'} --data-root" in called
    assert "error: train_patient.py exited 2: bad input" in r.stderr and "the patch model is complete" in r.stderr


# ----------------------------------------------------------------------------------------------- cache
# These runs stop at train.py (a stand-in that exits 2 at once, python_whose_train_exits): the launcher's "train:" log
# line shows what it was given, after the staging, audit and cache steps ran for real, without paying for training
# (or for train.py's ~5 s of imports before its flag check).
def stopped_at_train(node, *args, **env) -> subprocess.CompletedProcess:
    return node.run(*args, PYTHON=python_whose_train_exits(node.tmp, 2), **env)


def train_command(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2 and "train.py: simulated exit" in r.stderr, r.stderr[-3000:]
    assert "train.py exited 2: bad input" in r.stderr
    return next(line for line in r.stderr.splitlines() if "] train: " in line)


def test_cache_off_trains_from_pngs(node, demo_root):
    r = stopped_at_train(node.copy_demo(demo_root), "--run-id", "off", *TRAIN_FLAGS, CACHE="off")
    assert "--cache" not in train_command(r) and "CACHE=off" in r.stderr
    assert node.cache_dirs() == []


def test_without_a_staged_copy_no_cache_is_built_beside_the_shared_data(node, demo_root):
    r = stopped_at_train(node.copy_demo(demo_root), "--run-id", "shared", *TRAIN_FLAGS, STAGE_DIR="off")
    assert "--cache" not in train_command(r) and "no node-local copy" in r.stderr
    assert sorted(p.name for p in node.shared.parent.iterdir()) == ["HelicoDataSet"]


@pytest.mark.parametrize("flags", [["--cache-normalized"], ["--no-macenko"], ["--no-cache-normalized"]])
def test_the_cache_base_beside_the_staged_copy_and_the_cache_flags_reach_train_py_untouched(node, demo_root, flags):
    # train.py names, builds and falls back from the cache itself (tests/test_cache.py); the launcher copies none of it
    r = stopped_at_train(node.copy_demo(demo_root), "--run-id", "base", *TRAIN_FLAGS, *flags)
    [staged] = node.staged_dirs()
    command = train_command(r)
    assert f"--cache-base {staged}-cache" in command and " ".join(flags) in command
    assert "--cache " not in command and node.cache_dirs() == []  # nothing built by the launcher


def test_an_explicit_cache_reaches_train_and_evaluate_instead_of_the_base(node, demo_root):
    python, calls = recording_python(node)
    r = node.copy_demo(demo_root).run("--run-id", "mine", *TRAIN_FLAGS, "--cache", node.tmp / "mine", PYTHON=python)
    train = calls.read_text().splitlines()[-1]
    assert f"--cache {node.tmp / 'mine'}" in train and "--cache-base" not in train, r.stderr[-3000:]


def test_an_unknown_cache_setting_exits_2_before_staging(node, demo_root):
    r = node.copy_demo(demo_root).run("--run-id", "x", CACHE="yes")
    assert r.returncode == 2 and "CACHE=yes: expected on or off" in r.stderr
    assert not (node.local / "helico-stage").exists()


# ----------------------------------------------------------------------------------------------- GPUs
def gpus_line(r: subprocess.CompletedProcess) -> str:
    return next(line for line in r.stderr.splitlines() if "] train: GPUs: " in line)


def count_gpus(**env) -> str:
    """The launcher's count_gpus function alone (sourced from the script), under the given environment."""
    clean = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.startswith("SLURM_")}
    function = f"source <(sed -n '/^count_gpus()/,/^}}/p' {SCRIPT}) && count_gpus"
    r = subprocess.run(["bash", "-c", function], env={**clean, "PATH": "/usr/bin:/bin", **env},  # no nvidia-smi
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_gpu_count_is_what_the_job_was_given_never_a_default_of_one():
    assert count_gpus() == "0"  # no GPU visible, no nvidia-smi: a CPU run
    assert count_gpus(CUDA_VISIBLE_DEVICES="") == "0" and count_gpus(CUDA_VISIBLE_DEVICES="-1") == "0"
    assert count_gpus(CUDA_VISIBLE_DEVICES="0,1") == "2"
    assert count_gpus(SLURM_JOB_ID="7") == "0"  # a --gres=none job: SLURM allocated none
    assert count_gpus(SLURM_JOB_ID="7", SLURM_GPUS_ON_NODE="4", CUDA_VISIBLE_DEVICES="0,1,2,3") == "4"


def test_a_cpu_run_logs_zero_gpus_and_one_process(node, demo_root):
    if shutil.which("nvidia-smi"):
        pytest.skip("this node has nvidia-smi, so an unset CUDA_VISIBLE_DEVICES counts its GPUs")  # never on CI
    r = stopped_at_train(node.copy_demo(demo_root), "--run-id", "gpus", *TRAIN_FLAGS, CACHE="off", STAGE_DIR="off")
    train_command(r)
    assert "GPUs: 0 (none allocated or visible: CPU run), processes: 1" in gpus_line(r)
    assert "torch.distributed.run" not in r.stderr


# ----------------------------------------------------------------------------------------------- exit codes
def python_where(tmp_path: Path, script: str, instead: str) -> str:
    """An interpreter that runs everything as usual except `script`, for which it runs the bash `instead`: the
    launcher's reading of each exit is tested here; that the scripts exit so is tested in their own test files."""
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f'#!/bin/bash\nif [[ ${{1:-}} == */{script} ]]; then {instead}; fi\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def python_whose_train_exits(tmp_path: Path, rc: int) -> str:
    return python_where(tmp_path, "train.py", f'echo "train.py: simulated exit" >&2; exit {rc}')


@pytest.mark.parametrize("rc, meaning", [
    (1, "the HoldOut is not independent of CrossValidation"),
    (2, "bad input"),
    (3, "non-finite loss"),
    (5, "environment fault (no space left or I/O error"),
    (137, "killed by signal 9 (KILL)"),
    (7, "crashed (exit 7): a bug, the traceback is above"),  # a code no table documents
])
def test_each_training_exit_code_is_reported_with_its_own_meaning(node, demo_root, rc, meaning):
    r = node.copy_demo(demo_root).run("--run-id", "codes", *TRAIN_FLAGS, CACHE="off", STAGE_DIR="off",
                                      PYTHON=python_whose_train_exits(node.tmp, rc))
    assert r.returncode == rc, r.stderr[-3000:]
    [line] = [line for line in r.stderr.splitlines() if line.startswith("error: train.py exited")]
    assert f"train.py exited {rc}: {meaning}" in line
    assert "leak" not in line and "stopped by a signal" not in r.stderr
    if rc in (1, 2, 3, 7):
        assert "resume" not in line  # nothing to resume: rerunning as is would fail the same way
    if rc == 5:
        assert "free space, then run the same command to resume" in line
    assert "evaluate:" not in r.stderr


@pytest.mark.parametrize("rc, meaning", [
    (5, "environment fault"),  # what audit_leakage.py exits on an I/O error (tests/test_exits.py)
    (2, "bad input"),  # and on a missing module
    (7, "crashed (exit 7): a bug, the traceback is above"),
])
def test_an_audit_that_fails_is_read_from_its_exit_code_and_never_reported_as_a_leak(node, demo_root, rc, meaning):
    # no traceback is read: the audit turns OSError and ImportError into 5 and 2 itself, so 1 stays "a leak"
    audit = f'[[ $2 == --check-flags ]] || {{ echo "Traceback (most recent call last):" >&2; exit {rc}; }}'
    r = node.copy_demo(demo_root).run("--run-id", "crash", *TRAIN_FLAGS, STAGE_DIR="off",
                                      PYTHON=python_where(node.tmp, "audit_leakage.py", audit))
    assert r.returncode == rc, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: audit_leakage.py exited {rc}: ") and meaning in line and "not training" in line
    assert "patient leak" not in r.stderr and not (node.runs / "crash").exists()


def test_a_truncated_png_through_the_launcher_is_bad_input_within_seconds(node, demo_root):
    node.copy_demo(demo_root)
    # a training patch: the stain reference's patient is always in training (not the reference itself, which
    # would fail earlier, at the Macenko fit)
    png = sorted((node.shared / "CrossValidation" / "Annotated" / "B22-47_0").glob("*.png"))[0]
    assert png.name != "01653.png"
    png.write_bytes(png.read_bytes()[:100])
    started = time.time()
    # default workers as users run it, no --limit-samples: the truncated file is among the samples
    r = node.run("--run-id", "badpng", "--device", "cpu", "--epochs", "1", "--image-size", "64", "--weights", "none",
                 "--workers", "2", CACHE="off", timeout=240)
    assert r.returncode == 2, r.stderr[-3000:]
    assert png.name in r.stderr and "train.py exited 2: bad input" in r.stderr and "evaluate:" not in r.stderr
    assert "resume" not in r.stderr.splitlines()[-1] and "stopped by a signal" not in r.stderr
    assert time.time() - started < 180


# ----------------------------------------------------------------------------------------------- staged copies
def test_the_job_says_where_its_staged_copy_is_and_clean_stage_removes_it(node, demo_root):
    r = stopped_at_train(node.copy_demo(demo_root), "--run-id", "clean", *TRAIN_FLAGS)  # stops at train.py
    train_command(r)
    [staged] = node.staged_dirs()
    (staged.parent / f"{staged.name}-cache" / "cache64").mkdir(parents=True)  # what train.py builds there
    report = r.stderr.strip().splitlines()[-1]  # the EXIT trap: on every way out, a failed job included
    assert "staged copy kept on" in report and str(staged) in report and "--clean-stage" in report
    r = node.run("--clean-stage")
    assert r.returncode == 0, r.stderr
    assert f"removed {staged}" in r.stderr
    assert node.staged_dirs() == [] and node.cache_dirs() == [] and not marker_of(staged).exists()
    assert list((node.local / "helico-stage").iterdir()) == []  # its .lock file too
    r = node.run("--clean-stage")
    assert r.returncode == 0 and "no staged copy" in r.stderr


def test_clean_stage_leaves_a_copy_in_use_by_a_job_on_the_node(node, demo_root):
    _, staged = node.copy_demo(demo_root).stage()
    with open(f"{staged}.lock", "a") as lock:  # what a running job holds for its whole length
        fcntl.flock(lock, fcntl.LOCK_SH)
        r = node.run("--clean-stage")
    assert r.returncode == 5 and "in use by a job on this node" in r.stderr and "not removed" in r.stderr
    assert marker_of(staged).exists() and files(staged) == files(node.shared)


def test_clean_stage_of_one_dataset_keeps_the_others_and_names_them(node, demo_root, tmp_path):
    node.copy_demo(demo_root)
    other = tmp_path / "other" / "HelicoDataSet"
    shutil.copytree(demo_root, other)
    _, mine = node.stage()
    _, theirs = node.stage(HELICO_DATA=str(other))
    r = node.run("--clean-stage")
    assert r.returncode == 0 and not mine.exists()
    assert marker_of(theirs).exists() and f"other staged copies under {theirs.parent}: {theirs}" in r.stderr


# ----------------------------------------------------------------------------------------------- array jobs
def test_an_array_task_trains_and_audits_its_fold_into_its_own_run_folder(node, demo_root):
    """sbatch --array=0-2 run_h_pylori.sh --run-id 27 --folds 3: task 1 is fold 1 in runs/27-f1 (train/evaluate
    stubbed to record their arguments; the audit runs for real on that fold)."""
    calls = node.tmp / "calls.txt"
    wrapper = node.tmp / "python-recorder"
    wrapper.write_text(f'#!/bin/bash\ncase ${{1:-}} in */train.py|*/train_patient.py|*/evaluate.py) '
                       f'echo "$*" >>{calls}; '
                       f'[[ $1 == */train.py ]] && mkdir -p {node.runs}/27-f1 && touch {node.runs}/27-f1/best.pt; exit 0;; '
                       f'esac\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    r = node.copy_demo(demo_root).run("--run-id", "27", "--folds", "3", *TRAIN_FLAGS, CACHE="off", STAGE_DIR="off",
                                      PYTHON=str(wrapper), SLURM_ARRAY_TASK_ID="1")
    assert r.returncode == 0, r.stderr[-3000:]
    train, patient, evaluate = calls.read_text().splitlines()
    assert "--run-id 27-f1" in train and "--folds 3" in train and "--fold 1" in train, train
    assert f"--checkpoint {node.runs}/27-f1/best.pt" in patient, patient  # the fold's own patient model
    assert f"--checkpoint {node.runs}/27-f1/best.pt" in evaluate, evaluate
    assert "fold 1" in r.stderr and "leak" not in r.stderr.lower().replace("no leak", "")


def test_an_explicit_fold_wins_over_the_array_task(node, demo_root):
    r = stopped_at_train(node.copy_demo(demo_root), "--run-id", "28", "--folds", "3", "--fold", "2", *TRAIN_FLAGS,
                         CACHE="off", STAGE_DIR="off", SLURM_ARRAY_TASK_ID="1")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "array task" not in r.stderr and "28-f1" not in r.stderr


def test_finish_cv_names_the_folds_that_did_not_finish_before_staging_or_evaluating(node, demo_root):
    (node.runs / "27-f0").mkdir(parents=True)
    (node.runs / "27-f0" / "best.pt").touch()
    r = node.copy_demo(demo_root).run("--finish-cv", "--run-id", "27", "--folds", "3")
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: --finish-cv: fold 1 2 ({node.runs}/27-f1 ...) has no best.pt") and len(err) < 250
    assert "staging" not in r.stderr and not (node.runs / "27-cv").exists()
