"""train.py as a specification: run folder, checkpoints, resume, preemption, NaN guard, DDP, bad input, threshold."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import train
from conftest import TINY_TRAIN_FLAGS
from helico import identity, metrics, model, packed_cache, run_folder, staining

ROOT = Path(__file__).resolve().parents[1]
# Small enough that a run is a few seconds on 2 cores: 48 training samples (3 steps), 32 px, no Macenko.
FAST = ["--device", "cpu", "--image-size", "32", "--batch-size", "16", "--weights", "none", "--workers", "0",
        "--seed", "0", "--limit-samples", "48", "--no-macenko"]
API_KEYS = {"model", "arch", "config", "split", "stain", "threshold", "threshold_rule", "image_size", "epoch",
            "best_score", "val_metrics", "optimizer", "scheduler", "scaler", "rng", "version"}
LOG_KEYS = {"epoch", "train_loss", "val_loss", "pr_auc", "roc_auc", "recall", "precision", "val_samples", "img_s",
            "seconds"}


def run_train(demo_root, runs, run_id, *extra, epochs=2):
    return train.main(["--data-root", str(demo_root), "--runs-dir", str(runs), "--run-id", run_id, *FAST,
                       "--epochs", str(epochs), *extra])


def validation_windows(run_dir) -> int:
    """The split's annotated validation windows (what chooses the epoch and threshold; Cropped negatives are not
    among them), each once, byte-identical files once (B22-200/201: counted by content)."""
    split = json.loads((run_dir / "split.json").read_text())
    data = common.load_data(json.loads((run_dir / "config.json").read_text())["data_root"])
    paths = [s.path for s in common.select(data.labelled, split["val"]) if s.source == "annotated"]
    return len({hashlib.sha256((data.root / p).read_bytes()).hexdigest() for p in paths})


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run faster on one thread, and much faster when other jobs share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight_run(demo_root, tmp_path_factory):
    """The uninterrupted 2-epoch reference run that resumed runs must reproduce bit for bit."""
    runs = tmp_path_factory.mktemp("straight")
    assert run_train(demo_root, runs, "straight") == 0
    return runs / "straight"


# ----------------------------------------------------------------------------------------------- run folder
def test_run_folder_holds_config_split_log_checkpoints_and_curves(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.json", "split.json", "log.jsonl", "best.pt", "last.pt", "learning_curves.png"} <= names
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["run_id"] == "tiny" and config["world_size"] == 1
    assert {"git_commit", "torch", "device_name", "slurm_job_id"} <= set(config["environment"])
    assert (tiny_run / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, config["epochs"] + 1))
    assert all(LOG_KEYS <= set(r) for r in records)
    assert all(r["val_samples"] == validation_windows(tiny_run) for r in records)


def test_checkpoints_load_with_weights_only_and_carry_the_api_keys(tiny_run):
    for name in ("best.pt", "last.pt"):
        ckpt = load(tiny_run / name)
        # best.pt is slim: what resumes training stays in last.pt; it carries the decision stored after training
        keys = API_KEYS - set(common.TRAINING_KEYS) | {"decision"} if name == "best.pt" else API_KEYS
        assert keys <= set(ckpt), keys - set(ckpt)
        assert common.load_checkpoint(tiny_run / name)["arch"] == "resnet18"
        net = common.build_model(ckpt["arch"], "none")
        net.load_state_dict(ckpt["model"])  # rebuilds unaided: no DDP "module." prefix
        assert 0.0 <= ckpt["threshold"] <= 1.0 and "F1" in ckpt["threshold_rule"]
        assert ckpt["split"] == json.loads((tiny_run / "split.json").read_text())
        assert ckpt["image_size"] == ckpt["config"]["image_size"] == 64
    assert load(tiny_run / "last.pt")["epoch"] == 2


def test_best_checkpoint_is_the_epoch_with_the_highest_validation_pr_auc(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: r["pr_auc"])
    ckpt = load(tiny_run / "best.pt")
    assert ckpt["epoch"] == best["epoch"]
    assert ckpt["val_metrics"]["pr_auc"] == pytest.approx(best["pr_auc"])


@pytest.fixture(scope="module")
def plain_cache(demo_root, tmp_path_factory):
    """The packed cache FAST runs read with --cache (32 px, plain: FAST has no Macenko)."""
    from helico import packed_cache
    out = tmp_path_factory.mktemp("plain") / "cache32"
    packed_cache.build_cache(common.load_data(demo_root), out, 32, workers=2, progress=False)
    return out


def cache_flags(feed: str, request) -> list:
    """Flags for the data path under test: DataLoader over PNGs, or the packed cache held on the device."""
    return [] if feed == "loader" else ["--cache", str(request.getfixturevalue("plain_cache"))]


# ----------------------------------------------------------------------------------------------- resume
def test_resume_after_an_epoch_gives_bitwise_identical_weights(demo_root, tmp_path, straight_run, monkeypatch):
    real_end_epoch = train.Trainer.end_epoch

    def crash_after_first_epoch(self, start):
        real_end_epoch(self, start)
        raise KeyboardInterrupt  # a hard kill after last.pt of epoch 1 was written

    monkeypatch.setattr(train.Trainer, "end_epoch", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_train(demo_root, tmp_path, "straight")
    assert load(tmp_path / "straight" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(train.Trainer, "end_epoch", real_end_epoch)
    assert run_train(demo_root, tmp_path, "straight") == 0
    resumed, reference = load(tmp_path / "straight" / "last.pt"), load(straight_run / "last.pt")
    assert same_weights(resumed["model"], reference["model"])
    assert resumed["threshold"] == reference["threshold"]
    assert (tmp_path / "straight" / "log.jsonl").read_text().count("\n") == 2


@pytest.mark.parametrize("feed", ["loader", "resident"])
def test_stop_signal_mid_epoch_then_resume_gives_bitwise_identical_weights(demo_root, tmp_path, straight_run,
                                                                           monkeypatch, feed, request):
    extra = cache_flags(feed, request)
    real_model_input, calls = model.model_input, []

    def signal_during_first_training_step(images, *args, **kwargs):
        if kwargs.get("gen", args[2] if len(args) > 2 else None) is not None:
            calls.append(1)
            if len(calls) == 1:
                run_folder.on_signal(signal.SIGUSR1, None)  # what SLURM's --signal does, minus the timing
        return real_model_input(images, *args, **kwargs)

    monkeypatch.setattr(model, "model_input", signal_during_first_training_step)
    assert run_train(demo_root, tmp_path, "straight", *extra) == common.EXIT_STOPPED
    ckpt = load(tmp_path / "straight" / "last.pt")
    assert (ckpt["epoch"], ckpt["progress"]["step"]) == (0, 2)  # flags are read one step late: stops after step 2
    monkeypatch.setattr(model, "model_input", real_model_input)
    assert run_train(demo_root, tmp_path, "straight", *extra) == 0
    assert same_weights(load(tmp_path / "straight" / "last.pt")["model"], load(straight_run / "last.pt")["model"])


def test_changed_flags_refuse_to_resume_unless_forced(demo_root, tmp_path, straight_run, capsys):
    shutil.copytree(straight_run, tmp_path / "straight")
    assert run_train(demo_root, tmp_path, "straight", "--lr", "0.1") == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--lr 0.0003 -> 0.1" in err and "--force" in err
    assert run_train(demo_root, tmp_path, "straight", "--lr", "0.1", "--force") == 0


def test_loader_flags_may_change_on_resume(demo_root, tmp_path, straight_run):
    shutil.copytree(straight_run, tmp_path / "straight")
    log = (tmp_path / "straight" / "log.jsonl").read_text()
    assert run_train(demo_root, tmp_path, "straight", "--prefetch-factor", "2", "--no-persistent-workers") == 0
    assert (tmp_path / "straight" / "log.jsonl").read_text() == log  # already complete: nothing retrained


def test_rerunning_a_complete_run_says_so_in_one_line_and_trains_nothing(demo_root, tmp_path, straight_run, capsys):
    run_dir = tmp_path / "straight"  # `make demo` a second time
    shutil.copytree(straight_run, run_dir)
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "best.pt", "log.jsonl", "config.json")}
    assert run_train(demo_root, tmp_path, "straight") == common.EXIT_OK
    err = capsys.readouterr().err.strip().splitlines()
    best = load(run_dir / "best.pt")["val_metrics"]["pr_auc"]
    assert err == [f"{run_dir}: already complete (2 of 2 epochs), nothing trained; best validation PR-AUC {best:.3f}: "
                   f"{run_dir / 'best.pt'}"]
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_resume_reads_last_pt_and_builds_samples_and_config_once(demo_root, tmp_path, straight_run, monkeypatch):
    shutil.copytree(straight_run, tmp_path / "straight")
    loads, builds = [], []
    real_load, real_samples = common.load_checkpoint, train.samples_and_config
    monkeypatch.setattr(common, "load_checkpoint", lambda path, *a, **k: loads.append(Path(path).name) or
                        real_load(path, *a, **k))
    monkeypatch.setattr(train, "samples_and_config", lambda *a, **k: builds.append(1) or real_samples(*a, **k))
    assert run_train(demo_root, tmp_path, "straight", "--force", epochs=3) == 0  # one more epoch
    assert loads == ["last.pt", "best.pt"] and builds == [1]  # then best.pt, to store the patient rule
    assert load(tmp_path / "straight" / "last.pt")["epoch"] == 3


def test_every_training_step_is_the_shared_optimisation_step(demo_root, tmp_path, monkeypatch):
    from helico import optimization
    real_step, calls = optimization.train_step, []
    monkeypatch.setattr(optimization, "train_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    assert run_train(demo_root, tmp_path, "shared", "--limit-samples", "32", epochs=1) == 0
    assert len(calls) == load(tmp_path / "shared" / "last.pt")["scheduler"]["last_epoch"] == 2  # 32 samples, batch 16


def test_macenko_amp_channels_last_hed_run_stores_the_pooled_stain_reference_and_its_hue_survey(demo_root, tmp_path,
                                                                                                 capsys):
    import macenko_gpu
    from PIL import Image
    reference = tmp_path / "reference.png"  # absolute --reference-patch: a two-stain tile of our own, and the demo's
    Image.fromarray(macenko_gpu.synthetic_ihc_tiles(1, 128)[0].permute(1, 2, 0).numpy()).save(reference)
    assert run_train(demo_root, tmp_path, "stain", "--macenko", "--reference-patch", str(reference),
                     staining.DEFAULT_REFERENCE, "--amp", "--channels-last", "--hed-jitter", "0.05,0.005",
                     epochs=1) == 0
    ckpt = load(tmp_path / "stain" / "best.pt")
    assert ckpt["config"]["macenko"] and ckpt["config"]["amp"] and ckpt["config"]["channels_last"]
    assert ckpt["config"]["hed_jitter"] == [0.05, 0.005] and "B22-47" in ckpt["split"]["kept_in_train"]
    fitted = macenko_gpu.MacenkoNormalizer().fit([macenko_gpu.load_rgb(reference),
                                                  macenko_gpu.load_rgb(demo_root / staining.DEFAULT_REFERENCE)])
    torch.testing.assert_close(ckpt["stain"]["stain_matrix"], fitted.state_dict()["stain_matrix"])
    assert macenko_gpu.MacenkoNormalizer.from_state_dict(ckpt["stain"]).fitted
    survey = json.loads((tmp_path / "stain" / "stain_survey.json").read_text())  # every CrossValidation slide
    data = common.load_data(demo_root)
    assert set(survey["angles"]) == {s.path.rsplit("/", 2)[-2] for s in data.labelled + data.cropped}
    assert sum(a is not None for a in survey["angles"].values()) >= 10
    far = [k for k, a in survey["angles"].items() if a is not None and a > survey["threshold_deg"]]
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: stain:")]
    assert survey["far"] == far and len(warning) == (1 if far else 0)
    assert all(slide in warning[0] for slide in far[:10])


def test_runs_from_before_hed_jitter_and_several_references_resume_as_they_were(tmp_path):
    old = {"lr": 0.0003, "reference_patch": staining.DEFAULT_REFERENCE}  # a config.json of an older run
    new = {"lr": 0.0003, "reference_patch": [staining.DEFAULT_REFERENCE], "hed_jitter": [0.0, 0.0]}
    assert run_folder.changed_flags(old, new) == []
    assert run_folder.changed_flags(old, {**new, "hed_jitter": [0.05, 0.0]}) == [
        "--hed-jitter [0.0, 0.0] -> [0.05, 0.0]"]


# ----------------------------------------------------------------------------------------------- fault guards
@pytest.mark.parametrize("feed", ["loader", "resident"])
def test_nan_loss_exits_3_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(demo_root, tmp_path, monkeypatch,
                                                                                    capsys, feed, request):
    real_model_input, calls = model.model_input, []

    def poison_fifth_training_batch(images, *args, **kwargs):
        x = real_model_input(images, *args, **kwargs)
        if kwargs.get("gen", args[2] if len(args) > 2 else None) is not None:
            calls.append(1)
            if len(calls) == 5:  # epoch 2, step 2 (3 steps per epoch)
                x = x * float("nan")
        return x

    monkeypatch.setattr(model, "model_input", poison_fifth_training_batch)
    assert run_train(demo_root, tmp_path, "nan", *cache_flags(feed, request)) == common.EXIT_NAN
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "epoch 2 step 2" in err and "last.pt" in err
    ckpt = load(tmp_path / "nan" / "last.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def start_training(demo_root, runs, run_id, *extra):
    """train.py as its own process group with a DataLoader worker, as SLURM sees a job."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--data-root", str(demo_root), "--runs-dir",
                             str(runs), "--run-id", run_id, *FAST, *extra], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.2)


def test_sigterm_to_the_whole_job_finishes_the_step_writes_last_pt_and_exits_4(demo_root, tmp_path):
    proc = start_training(demo_root, tmp_path, "preempted", "--epochs", "50", "--workers", "1")
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    wait_until(lambda: children.read_text().strip(), proc, "the DataLoader worker's start")  # at the first step
    time.sleep(2)  # past its worker_init_fn
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM preempts: every process, the DataLoader worker too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == common.EXIT_STOPPED, err
    assert "stopped by signal" in err and "not under SLURM" in err
    ckpt = load(tmp_path / "preempted" / "last.pt")
    assert ckpt["epoch"] * 3 + ckpt["progress"]["step"] >= 2


def test_second_signal_exits_at_once_with_128_plus_its_number(monkeypatch):
    exits = []
    monkeypatch.setattr(run_folder.os, "_exit", exits.append)
    run_folder.STOP.clear()
    run_folder.on_signal(signal.SIGUSR1, None)  # first: finish the step, save, exit 4 (tested above with a real signal)
    assert run_folder.STOP.is_set() and exits == []
    run_folder.on_signal(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]
    run_folder.STOP.clear()


# ----------------------------------------------------------------------------------------------- run folder lock
def test_a_second_train_on_a_run_id_in_use_is_refused_naming_the_folder_and_pid_then_resume_works(demo_root, tmp_path,
                                                                                                   capsys):
    run_dir, lock = tmp_path / "busy", tmp_path / "busy" / run_folder.LOCK
    first = second = start_training(demo_root, tmp_path, "busy", "--epochs", "50")
    try:
        wait_until(lambda: (run_dir / "last.pt").is_file(), first, "the first run's first epoch")
        os.kill(first.pid, signal.SIGSTOP)  # frozen mid-run: it holds the lock for as long as this test needs
        assert lock.read_text().startswith(f"pid {first.pid} on ")
        second = start_training(demo_root, tmp_path, "busy", "--epochs", "50")
        _, err = second.communicate(timeout=300)
        assert second.returncode == common.EXIT_BAD_INPUT, err
        assert err.strip().splitlines()[-1] == (f"error: {run_dir} is in use by another train.py "
                                                f"({lock.read_text().strip()}): wait for it to end, or use another "
                                                f"--run-id")
    finally:
        for proc in {first, second}:  # the first as a node failure or a requeue ends it: no chance to unlock
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=120)
    epoch = load(run_dir / "last.pt")["epoch"]  # whatever it reached: the lock died with it, the run resumes
    capsys.readouterr()
    assert run_train(demo_root, tmp_path, "busy", "--force", epochs=epoch + 1) == common.EXIT_OK
    assert f"{run_dir}: resuming after epoch {epoch} step 0" in capsys.readouterr().err
    assert load(run_dir / "last.pt")["epoch"] == epoch + 1


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` with its bytes and mtime: what "nothing changed" compares."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def finished_model_without_last_pt(straight_run, runs) -> Path:
    """A finished run whose user deleted last.pt to save space, with its evaluation beside it."""
    run_dir = runs / "nopm"
    shutil.copytree(straight_run, run_dir)
    (run_dir / "last.pt").unlink()
    (run_dir / run_folder.LOCK).unlink(missing_ok=True)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text("{}\n")
    return run_dir


def test_a_finished_model_without_last_pt_is_refused_in_one_line_and_nothing_changes(demo_root, tmp_path,
                                                                                     straight_run, capsys):
    run_dir = finished_model_without_last_pt(straight_run, tmp_path)
    before = snapshot(run_dir)
    assert run_train(demo_root, tmp_path, "nopm", epochs=20) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {run_dir} holds a model of an earlier run (best.pt, "), err
    assert "config.json" in err and "eval/" in err and "--force" in err and "last.pt" in err
    assert snapshot(run_dir) == before


def test_force_replaces_the_earlier_model_and_keeps_its_evaluation_as_stale(demo_root, tmp_path, straight_run, capsys):
    run_dir = finished_model_without_last_pt(straight_run, tmp_path)
    old_best = (run_dir / "best.pt").read_bytes()
    assert run_train(demo_root, tmp_path, "nopm", "--force", "--seed", "1", epochs=1) == common.EXIT_OK
    err = capsys.readouterr().err
    assert f"{run_dir}: --force: replacing an earlier run: removed best.pt, config.json" in err
    assert not (run_dir / "eval").exists() and (run_dir / "eval.stale" / "metrics.json").read_text() == "{}\n"
    assert (run_dir / "best.pt").read_bytes() != old_best and load(run_dir / "best.pt")["config"]["seed"] == 1
    assert (run_dir / "log.jsonl").read_text().count("\n") == 1  # this run's one epoch, none of the earlier two


def test_only_a_requeued_slurm_jobs_own_start_or_a_last_pt_counts_as_nothing_to_lose(tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"environment": {"slurm_job_id": "77"}}))
    (run_dir / "split.json").write_text("{}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert run_folder.earlier_run(run_dir) == ["config.json", "split.json"]
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    assert run_folder.earlier_run(run_dir) == ["config.json", "split.json"]
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # killed before its first checkpoint, requeued: it starts again
    assert run_folder.earlier_run(run_dir) == []
    (run_dir / "best.pt").write_bytes(b"")
    assert run_folder.earlier_run(run_dir) == ["best.pt", "config.json", "split.json"]
    (run_dir / "last.pt").write_bytes(b"")  # an unfinished run: resumed as ever
    assert run_folder.earlier_run(run_dir) == []


# ----------------------------------------------------------------------------------------------- distributed
# The resident feed only: the DataLoader feed shards validation with the same list (a Subset of it), gathered by the
# same code, and the launcher's torchrun test (CACHE=off) trains two ranks on the DataLoader path.
@pytest.mark.parametrize("feed", ["resident"])
def test_ddp_on_two_gloo_processes_scores_every_validation_window_once(demo_root, tmp_path, feed, request):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-id", "ddp",
           *FAST, "--epochs", "1", *cache_flags(feed, request)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("patches resident on cpu" in r.stderr) == (feed == "resident")  # each rank: training set + its shard
    run_dir = tmp_path / "ddp"
    record = json.loads((run_dir / "log.jsonl").read_text())
    assert record["val_samples"] == validation_windows(run_dir)
    ckpt = load(run_dir / "best.pt")
    assert ckpt["config"]["world_size"] == 2 and len(load(run_dir / "last.pt")["rng"]["augment"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
    # The gathered metrics equal a single-process pass of the saved model over the validation windows.
    data = common.load_data(demo_root)
    val = [s for s in common.select(data.labelled, ckpt["split"]["val"]) if s.source == "annotated"]
    val = [s for s, keep in zip(val, identity.first_copies([s.path for s in val], identity.identical_files(data)))
           if keep]  # as training
    net = common.build_model("resnet18", "none")
    net.load_state_dict(ckpt["model"])
    net.eval()
    ds = common.PatchDataset(demo_root, val, 32)
    with torch.no_grad():
        x = torch.stack([ds[k][0] for k in range(len(ds))])
        scores = torch.sigmoid(net(model.model_input(x)).squeeze(1)).numpy()
    y = np.array([s.label for s in val])
    assert record["pr_auc"] == pytest.approx(metrics.average_precision(y, scores), abs=1e-6)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flags, named", [
    (["--data-root", "/nonexistent/HelicoDataSet"], "/nonexistent/HelicoDataSet"),
    (["--macenko", "--reference-patch", "CrossValidation/Annotated/B22-47_0/missing.png"], "--reference-patch"),
    (["--jitter", "0.05,0.05"], "--jitter"),
    (["--jitter", "0.05,0.05,0.02,0.9"], "--jitter"),
    (["--hed-jitter", "0.05"], "--hed-jitter"),
    (["--macenko", "--reference-patch", "CrossValidation/Annotated/B22-47_0", "nothere/"], "nothere"),
    (["--pos-weight", "-3"], "--pos-weight"),
    (["--cache-normalized"], "--cache-normalized"),
])
def test_bad_input_exits_2_with_a_one_line_error_naming_it(demo_root, tmp_path, capsys, flags, named):
    argv = ["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-id", "bad", *FAST, *flags]
    assert train.main(argv) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and named in err
    assert not (tmp_path / "bad").exists()


def test_a_leaky_split_file_is_refused(demo_root, tmp_path, capsys):
    split = tmp_path / "leaky.json"
    split.write_text(json.dumps({"train": ["B22-01", "B22-200"], "val": ["B22-201", "B22-01"]}))
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--split", str(split), *FAST]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "B22-01 is in both" in errors[0]  # (a cold hash cache also draws a progress bar)


def test_a_holdout_patient_sharing_an_id_or_an_image_with_crossvalidation_is_refused_with_exit_1(demo_root, tmp_path,
                                                                                                  capsys):
    root = tmp_path / "HelicoDataSet"
    shutil.copytree(demo_root, root, copy_function=os.link)
    holdout = sorted((root / "HoldOut").iterdir())
    os.rename(holdout[0], root / "HoldOut" / "B22-08_0")                     # a CrossValidation ID
    shutil.copytree(root / "CrossValidation/Cropped/B22-14_0", root / "HoldOut/B22-999_0", copy_function=os.link)
    argv = ["--data-root", str(root), "--runs-dir", str(tmp_path / "runs"), "--run-id", "r", *FAST, "--workers", "2"]
    assert train.main(argv) == common.EXIT_LEAK
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    err = errors[0]
    assert "B22-08: also a CrossValidation patient ID" in err and "B22-999: byte-identical image(s) with " \
        "CrossValidation patient(s) B22-14" in err
    assert not (tmp_path / "runs" / "r").exists()


# ----------------------------------------------------------------------------------------------- --cache
# The session's tiny-run flags (64 px, Macenko on) for one epoch of 32 samples: the pixels a cache must reproduce.
CACHE_RUN = [*TINY_TRAIN_FLAGS, "--epochs", "1", "--limit-samples", "32"]


def run_cached(demo_root, runs, run_id, *extra):
    return train.main(["--data-root", str(demo_root), "--runs-dir", str(runs), "--run-id", run_id, *CACHE_RUN, *extra])


@pytest.fixture(scope="module")
def png_run(demo_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("png")
    assert run_cached(demo_root, runs, "png") == 0
    return runs / "png"


@pytest.fixture(scope="module")
def normalized_cache(demo_root, tmp_path_factory):
    """What --cache-normalized builds for the default stain reference (built here, so tests can time the reuse)."""
    from helico import packed_cache
    out = tmp_path_factory.mktemp("normalized") / "cache"
    packed_cache.build_cache(common.load_data(demo_root), out, 64, workers=2, normalized=True,
                            reference=staining.DEFAULT_REFERENCE, device="cpu", progress=False)
    return out


def test_cache_trains_bitwise_identical_weights_to_decoding_pngs(demo_root, tmp_path, png_run):
    assert run_cached(demo_root, tmp_path, "cached", "--cache", str(tmp_path / "cache"), "--no-cache-normalized") == 0
    cached, png = load(tmp_path / "cached" / "last.pt"), load(png_run / "last.pt")
    assert same_weights(cached["model"], png["model"])  # same decode, same bytes, same batches
    assert cached["threshold"] == png["threshold"]
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["complete"] is True
    assert json.loads((tmp_path / "cached" / "config.json").read_text())["cache"] == str(tmp_path / "cache")


def test_cache_with_macenko_is_normalized_by_default_skips_on_device_macenko_and_keeps_the_stain(
        demo_root, tmp_path, png_run, normalized_cache, monkeypatch):
    import macenko_gpu

    def normalized_twice(self, images):
        raise AssertionError("Macenko ran on patches the cache had already normalized")
    monkeypatch.setattr(macenko_gpu.MacenkoNormalizer, "normalize", normalized_twice)
    assert run_cached(demo_root, tmp_path, "n", "--cache", str(normalized_cache)) == 0  # no --cache-normalized
    ckpt, png = load(tmp_path / "n" / "last.pt"), load(png_run / "last.pt")
    assert ckpt["config"]["cache_normalized"] is True and ckpt["config"]["macenko"] is True
    for key, value in png["stain"].items():  # evaluate.py needs it to normalize PNGs (or to check a cache)
        assert torch.equal(ckpt["stain"][key], value) if torch.is_tensor(value) else ckpt["stain"][key] == value
    # Macenko's output is 8-bit levels (torchstain's truncation), so storing it loses nothing: same weights
    assert same_weights(ckpt["model"], png["model"])


def test_cache_of_the_other_kind_is_refused_in_one_line_not_rebuilt(demo_root, tmp_path, normalized_cache, capsys):
    meta = (normalized_cache / "meta.json").read_text()
    assert run_cached(demo_root, tmp_path, "plain", "--cache", str(normalized_cache),
                      "--no-cache-normalized") == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: --cache {normalized_cache}: holds 64px patches Macenko-")
    assert "but this run needs 64px plain patches" in err
    assert (normalized_cache / "meta.json").read_text() == meta and not (tmp_path / "plain").exists()


def test_cache_normalized_to_another_reference_is_refused(demo_root, tmp_path, normalized_cache, capsys):
    other = "CrossValidation/Annotated/B22-111_0/" + sorted(
        p.name for p in (demo_root / "CrossValidation/Annotated/B22-111_0").glob("*.png"))[0]
    argv = ["--cache", str(normalized_cache), "--cache-normalized", "--reference-patch", other]
    assert run_cached(demo_root, tmp_path, "other", *argv) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"needs 64px patches Macenko-normalized to {other}" in err


def test_a_file_as_cache_is_exit_2_one_line(demo_root, tmp_path, capsys):
    (tmp_path / "cache").write_text("not a folder")
    assert run_train(demo_root, tmp_path, "bad", "--cache", str(tmp_path / "cache")) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err == f"error: --cache {tmp_path / 'cache'}: not a directory (give a folder for the packed patch cache)"
    assert not (tmp_path / "bad").exists()


def test_cache_flags_may_change_on_resume(demo_root, tmp_path, png_run, normalized_cache):
    # a requeued job may land on a node without room for the cache: same pixels either way, so no --force
    shutil.copytree(png_run, tmp_path / "png")
    log = (tmp_path / "png" / "log.jsonl").read_text()
    assert run_cached(demo_root, tmp_path, "png", "--cache", str(normalized_cache), "--cache-normalized") == 0
    assert (tmp_path / "png" / "log.jsonl").read_text() == log  # already complete: nothing retrained


# ----------------------------------------------------------------------------------------------- resident path
@pytest.mark.parametrize("frac, feed", [("0.5", "patches resident on cpu"), ("0", "streamed from the host")])
def test_cache_on_the_device_or_streamed_trains_the_dataloaders_weights_bitwise(demo_root, tmp_path, straight_run,
                                                                                plain_cache, capsys, frac, feed):
    assert run_train(demo_root, tmp_path, "r", "--cache", str(plain_cache), "--resident-max-frac", frac) == 0
    assert feed in capsys.readouterr().err
    ckpt, reference = load(tmp_path / "r" / "last.pt"), load(straight_run / "last.pt")
    assert same_weights(ckpt["model"], reference["model"])  # same pixels, order and draws as PNGs via DataLoader
    assert ckpt["threshold"] == reference["threshold"] and ckpt["val_metrics"] == reference["val_metrics"]


def test_resident_path_skips_bad_images_or_stops_in_one_line(demo_root, tmp_path, straight_run, capsys):
    from helico import packed_cache
    root = Path(shutil.copytree(demo_root, tmp_path / "root"))
    data = common.load_data(root)
    broken = common.select(data.labelled, json.loads((straight_run / "split.json").read_text())["val"])[0].path
    (root / broken).write_bytes(b"not a png")
    packed_cache.build_cache(data, tmp_path / "cache", 32, workers=2, progress=False)
    argv = ["--cache", str(tmp_path / "cache")]
    assert train.main(["--data-root", str(root), "--runs-dir", str(tmp_path), "--run-id", "strict", *FAST, *argv,
                       "--epochs", "1"]) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and broken in err and "--skip-bad-images" in err
    assert train.main(["--data-root", str(root), "--runs-dir", str(tmp_path), "--run-id", "skip", *FAST, *argv,
                       "--epochs", "1", "--skip-bad-images"]) == 0
    assert f"skipped unreadable {broken}" in capsys.readouterr().err
    record = json.loads((tmp_path / "skip" / "log.jsonl").read_text())
    assert record["val_samples"] == validation_windows(tmp_path / "skip") - 1


def test_compile_flag_compiles_the_training_model_and_saves_plain_weights(demo_root, tmp_path, monkeypatch):
    compiled = []  # torch.compile itself takes minutes on 2 cores: record the call, train eagerly
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    assert run_train(demo_root, tmp_path, "c", "--compile", epochs=1) == 0
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    ckpt = load(tmp_path / "c" / "last.pt")
    assert ckpt["config"]["compile"] is True and not any(k.startswith("_orig_mod.") for k in ckpt["model"])


def test_resident_max_frac_outside_0_1_is_one_line_exit_2(demo_root, tmp_path, capsys):
    assert run_train(demo_root, tmp_path, "bad", "--resident-max-frac", "1.5") == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resident-max-frac 1.5") and "\n" not in err


def test_cache_base_builds_train_pys_own_folder_and_a_full_disk_trains_from_pngs(demo_root, tmp_path, monkeypatch,
                                                                                capsys):
    """--cache-base DIR: train.py names the folder with its own defaults (Macenko on: a normalized cache); when the
    disk is full there it warns and trains from PNGs, and config.json says it did."""
    def no_space(*args, **kwargs):
        import errno
        raise OSError(errno.ENOSPC, "No space left on device", "patches.u8")
    monkeypatch.setattr(packed_cache, "build_cache", no_space)
    assert run_cached(demo_root, tmp_path, "full", "--cache-base", str(tmp_path / "base")) == 0
    err = capsys.readouterr().err
    folder = packed_cache.cache_folder(tmp_path / "base", 64, True, staining.DEFAULT_REFERENCE)
    assert f"warning: --cache-base {tmp_path / 'base'}: no space left while building {folder}" in err
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["cache"] is None and config["cache_normalized"] is False and config["cache_base"]


def test_the_cuda_generator_is_saved_and_restored_on_the_runs_own_gpu(monkeypatch, tiny_run):
    # dropout and stochastic depth draw from the GPU's generator; torch.manual_seed at start-up reset it on resume
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or
                        torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", int(state[0]), device)))
    gpu = torch.device("cuda", 1)
    train.set_device_rng(gpu, train.device_rng(gpu))
    assert calls == [("get", gpu), ("set", 7, gpu)]
    train.set_device_rng(gpu, None)  # a checkpoint from before it was saved, or from a CPU run
    assert train.device_rng(torch.device("cpu")) is None and len(calls) == 2
    assert load(tiny_run / "last.pt")["rng"]["device"] == [None]  # a CPU run: one rank, no device generator


def test_validation_copies_its_results_to_the_host_once_not_per_batch(monkeypatch):
    # on a GPU every .tolist() (and a boolean-mask index) waits for the device: once per validation, not per batch
    from types import SimpleNamespace
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1))
    bad = common.BAD
    batches = [(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, bad, 1]),
                torch.arange(4) + 4 * k) for k in range(5)]
    skipped = []
    fake = SimpleNamespace(raw=net, world=1, val_loader=batches, device=torch.device("cpu"), normalizer=None,
                           precision=model.precision(torch.device("cpu"), amp=False), pos_weight=torch.tensor(2.0),
                           val_paths=[f"p{k}" for k in range(20)], skipped=SimpleNamespace(note=lambda ps: skipped.extend(ps)))
    calls, real = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or real(self))
    y, s, loss = train.Trainer.validate(fake)
    monkeypatch.setattr(torch.Tensor, "tolist", real)
    assert len(calls) <= 4  # before: four per batch
    assert skipped == ["p2", "p6", "p10", "p14", "p18"] and list(y) == [0, 1, 1] * 5
    with torch.no_grad():  # the same numbers as scoring the decodable patches alone
        x = torch.cat([b[0][b[1] != bad] for b in batches])
        logits = net(model.model_input(x)).squeeze(1)
    assert np.allclose(s, torch.sigmoid(logits).numpy(), atol=1e-6)
    expected = F.binary_cross_entropy_with_logits(logits, torch.tensor([0.0, 1, 1] * 5), pos_weight=torch.tensor(2.0))
    assert loss == pytest.approx(float(expected), rel=1e-5)
