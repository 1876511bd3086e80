"""tools/bench.py: one CPU run on tiny sizes times every stage and writes the JSON report (no timing assertions)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import bench
import common
import train
from helico import augment

TINY = ["--device", "cpu", "--image-size", "32", "--batch-size", "4", "--batches", "1", "--warmup", "1",
        "--limit-samples", "16", "--workers", "1", "--min-seconds", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A two-stain tile as stain reference, so the run does not depend on one demo patch's stain."""
    import macenko_gpu
    path = tmp_path_factory.mktemp("ref") / "reference.png"
    Image.fromarray(macenko_gpu.synthetic_ihc_tiles(1, 256, seed=3)[0].permute(1, 2, 0).numpy()).save(path)
    return path


WITHOUT_TRAIN = ",".join(s for s in bench.STAGES if s != "train")  # train: its own test, on a prebuilt cache


def test_cpu_run_writes_every_stage_and_the_bound(demo_root, reference, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--data-root", str(demo_root), "--json", str(out), "--reference-patch", str(reference),
                       "--stages", WITHOUT_TRAIN, *TINY]) == 0
    r = json.loads(out.read_text())
    assert set(r["stages"]) == set(bench.STAGES) - {"train"} and all(v > 0 for v in r["stages"].values())
    assert r["bound"] in ("normalize", "model_step")  # the parts of the device-resident loop
    assert r["loop_fraction_of_ceiling"] == pytest.approx(r["stages"]["loop"] / r["stages"]["model_step"])
    assert r["loop_vs_loop_loader"] == pytest.approx(r["stages"]["loop"] / r["stages"]["loop_loader"])
    assert r["feed"].startswith("patches resident on cpu")
    assert (r["workers"], r["batch_size"], r["image_size"], r["device"], r["samples"]) == (1, 4, 32, "cpu", 16)
    assert r["per_core"]["packed_vs_png"] == pytest.approx(r["per_core"]["load_cache"] / r["per_core"]["load_png"])
    assert r["macenko"] is True and r["cache"]["temporary"] and r["cache"]["bytes_on_disk"] >= 16 * 3 * 32 * 32
    assert r["memory"]["peak_host_rss_mb"] > 0
    table = capsys.readouterr().out
    assert "bound: " in table and "packed/PNG" in table and all(stage in table for stage in bench.STAGES)


def test_given_cache_dir_is_built_once_and_kept(demo_root, tmp_path):
    keep = {"B22-100_0"}  # a small copy of the demo: building the cache of every patch stays quick
    root = Path(shutil.copytree(demo_root, tmp_path / "root", ignore=lambda folder, names: [
        n for n in names if Path(folder).name in ("Annotated", "Cropped", "HoldOut") and n not in keep]))
    argv = ["--data-root", str(root), "--cache", str(tmp_path / "cache"), "--stages", "load_png,load_cache",
            "--json", str(tmp_path / "b.json"), *TINY]
    assert bench.main(argv) == 0
    first = json.loads((tmp_path / "b.json").read_text())
    assert set(first["stages"]) == {"load_png", "load_cache"} and first["bound"] is None  # no loop part timed
    assert first["cache"]["build"]["action"] == "built" and not first["cache"]["temporary"]
    assert first["loop_fraction_of_ceiling"] is None
    assert bench.main(argv) == 0
    assert json.loads((tmp_path / "b.json").read_text())["cache"]["build"]["action"] == "reused"


def test_unknown_stage_is_one_line_exit_2(demo_root, capsys):
    assert bench.main(["--data-root", str(demo_root), "--stages", "load_png,warp", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --stages") and err.count("\n") == 1


def test_threads_flag_does_not_outlive_main(demo_root):
    before = torch.get_num_threads()
    bench.main(["--data-root", str(demo_root), "--stages", "bogus", *TINY[:-2], "--threads", str(before + 1)])
    assert torch.get_num_threads() == before


def test_a_cache_of_another_size_is_refused_in_one_line_never_rebuilt(demo_root, tmp_path, capsys):
    keep = {"B22-100_0"}
    root = Path(shutil.copytree(demo_root, tmp_path / "root", ignore=lambda folder, names: [
        n for n in names if Path(folder).name in ("Annotated", "Cropped", "HoldOut") and n not in keep]))
    from helico import packed_cache
    cache = tmp_path / "cache"
    packed_cache.build_cache(common.load_data(root), cache, 48, workers=1, progress=False)  # a "training run's"
    before = {f.name: f.read_bytes() for f in cache.iterdir() if f.is_file()}
    argv = ["--data-root", str(root), "--cache", str(cache), "--stages", "load_cache", *TINY]  # 32 px
    assert bench.main(argv) == common.EXIT_BAD_INPUT
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --cache {cache}: image_size differs")
    assert "not rebuilding" in errors[0]
    assert {f.name: f.read_bytes() for f in cache.iterdir() if f.is_file()} == before  # untouched


def test_train_stage_reports_train_pys_own_steady_state_beside_the_ceiling(demo_root, tmp_path, capsys):
    from helico import packed_cache
    cache = tmp_path / "cache"  # a training run's cache of every patch, as on a cluster node (plain: --no-macenko)
    packed_cache.build_cache(common.load_data(demo_root), cache, 32, workers=2, progress=False)
    out = tmp_path / "b.json"
    argv = ["--data-root", str(demo_root), "--cache", str(cache), "--stages", "model_step,train", "--no-macenko",
            "--train-epochs", "2", "--json", str(out), *TINY]
    assert bench.main(argv) == 0
    r = json.loads(out.read_text())
    train = r["details"]["train"]
    assert len(train["per_epoch_img_s"]) == 2 and r["stages"]["train"] == train["per_epoch_img_s"][-1] > 0
    assert r["train_fraction_of_ceiling"] == pytest.approx(r["stages"]["train"] / r["stages"]["model_step"])
    assert "--cache" in train["argv"] and str(cache) in train["argv"] and "--no-macenko" in train["argv"]
    assert r["projected_epoch_s"]["train"] == pytest.approx(54_000 / r["stages"]["train"])
    assert "train.py at" in capsys.readouterr().out


def test_model_step_is_train_pys_optimisation_step(demo_root, tmp_path, monkeypatch):
    from helico import optimization
    real_step, nets = optimization.train_step, []
    monkeypatch.setattr(optimization, "train_step", lambda net, *a, **k: nets.append(net) or real_step(net, *a, **k))
    assert bench.main(["--data-root", str(demo_root), "--stages", "model_step", *TINY]) == 0
    assert len(nets) >= 2 and nets[0] is nets[-1]  # warm-up and timed batches: one model, stepped by train.py's step
    assert bench.JITTER == list(augment.DEFAULT_JITTER) and train.DEFAULT_JITTER == "0.05,0.05,0.02,0.01"


def test_bench_startup_look_alike_patches_are_never_identical_half_blank_half_one_hash(tmp_path):
    import hashlib
    import bench_startup
    from helico import identity
    assert bench_startup.fill_folder((str(tmp_path), 20, 64, 1, True, 1000)) == 20
    files = sorted(tmp_path.glob("*.png"))
    decoded = [identity.decode_check(f) for f in files]
    assert len({hashlib.sha256(f.read_bytes()).digest() for f in files}) == 20  # no content hash groups them
    blank = [d for d in decoded if not d.informative]
    alike = {d.dhash for d in decoded if d.informative}
    assert len(blank) == 10 and len(alike) == 1  # near-uniform tiles, and one pattern hash for all the others


def test_bench_startup_times_a_plain_run_and_counts_in_another(demo_root, tmp_path, capsys):
    # the counting wrappers cost ~1 s at 218k files: the seconds must come from a run without them
    import bench_startup
    assert bench_startup.main(["--root", str(demo_root), "--work", str(tmp_path / "w"), "--measures",
                               "audit_first,audit_again", "--json", str(tmp_path / "s.json")]) == 0
    first, again = json.loads((tmp_path / "s.json").read_text())["results"]
    pngs = len(common.load_data(demo_root).file_stats)
    for r in (first, again):
        assert r["exit"] == 0 and r["seconds"] > 0 and r["peak_rss_mb"] > 0
        assert pngs <= r["stat_calls"] < 2 * pngs  # the scan's one stat per PNG, counted
    assert not any(k.endswith(".json") and k.startswith("hashes-") and not k.endswith(".identical.json")
                   for k in again["index_opens"])  # unchanged files: the duplicate groups' memo, not the hash cache
    assert "| audit_again |" in capsys.readouterr().out
