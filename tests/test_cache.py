"""patch_cache.py: a packed cache yields PatchDataset's exact items, and is never trusted when it should not be.

Every test works on `mini_root`, a copy of three patients of the demo (RGBA, grey and off-size patches included)
plus one HoldOut folder, so each build decodes ~100 PNGs instead of ~1,100."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
from helico import packed_cache, staining
from common import DataError
import patch_cache

KEEP = ("B22-111_0", "B22-111_1", "B22-100_0")  # RGBA folders (B22-111_1), a grey and an off-size patch (B22-100)


def copy_mini_root(demo_root: Path, dest: Path) -> Path:
    holdout = sorted(p.name for p in (demo_root / "HoldOut").iterdir() if p.is_dir())[0]
    keep = set(KEEP) | {holdout}
    shutil.copytree(demo_root, dest, ignore=lambda folder, names: [
        n for n in names if Path(folder).name in ("Annotated", "Cropped", "HoldOut") and n not in keep])
    return dest


@pytest.fixture(scope="module")
def mini_root(demo_root, tmp_path_factory):
    return copy_mini_root(demo_root, tmp_path_factory.mktemp("mini") / "HelicoDataSet")


@pytest.fixture(scope="module")
def cache64(mini_root, tmp_path_factory):
    """One finished 64px cache of mini_root, shared read-only (tests that break it copy it first)."""
    out = tmp_path_factory.mktemp("cache") / "c64"
    packed_cache.build_cache(common.load_data(mini_root), out, 64, workers=2, progress=False)
    return out


def build(root, out, size=64, **kw):
    return packed_cache.build_cache(common.load_data(root), out, size, workers=2, progress=False, **kw)


def all_samples(root):
    return common.load_data(root).all_samples()


def assert_same_items(cached, reference):
    assert len(cached) == len(reference)
    for i in range(len(reference)):
        image, label, idx = cached[i]
        want_image, want_label, want_idx = reference[i]
        assert image.dtype == torch.uint8 and image.shape == want_image.shape
        assert torch.equal(image, want_image), reference.samples[i].path
        assert (label, idx) == (want_label, want_idx)


# ----------------------------------------------------------------------------------------------- items
def test_mini_root_holds_the_awkward_patches(mini_root):
    modes = {Image.open(mini_root / s.path).mode for s in all_samples(mini_root)}
    sizes = {Image.open(mini_root / s.path).size for s in all_samples(mini_root)}
    assert {"RGB", "RGBA", "L"} <= modes and (206, 256) in sizes
    assert {s.source for s in all_samples(mini_root)} == {"annotated", "supplemental", "holdout"}


@pytest.mark.parametrize("size", [64, 256])
def test_cached_items_equal_patch_dataset_items_bytewise(mini_root, tmp_path, size):
    build(mini_root, tmp_path / "c", size)
    samples = all_samples(mini_root)  # labelled + cropped + holdout: paths repeat across lists, on purpose
    assert_same_items(packed_cache.CachedPatchDataset(tmp_path / "c", samples, size, root=mini_root),
                      common.PatchDataset(mini_root, samples, size))


def test_cache_holds_each_path_once(cache64, mini_root):
    paths = packed_cache.read_index(cache64).paths
    assert len(paths) == len(set(paths)) == len({s.path for s in all_samples(mini_root)})


def test_label_comes_from_the_samples_not_the_cache(cache64, mini_root):
    flipped = [dataclasses.replace(s, label=7) for s in all_samples(mini_root)[:5]]
    assert [cached[1] for cached in packed_cache.CachedPatchDataset(cache64, flipped, 64)] == [7] * 5


def test_dataloader_workers_read_the_same_batches(cache64, mini_root):
    samples = all_samples(mini_root)[:40]
    cached = packed_cache.CachedPatchDataset(cache64, samples, 64)
    cached[0]  # the parent maps the file first: forked workers must map their own
    batches = list(torch.utils.data.DataLoader(cached, batch_size=16, num_workers=2))
    want = list(torch.utils.data.DataLoader(common.PatchDataset(mini_root, samples, 64), batch_size=16))
    for (x, y, i), (wx, wy, wi) in zip(batches, want, strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy) and torch.equal(i, wi)


# ----------------------------------------------------------------------------------------------- reuse and rebuild
def test_second_build_reuses_without_decoding(cache64, mini_root):
    before = (cache64 / packed_cache.PATCHES).stat().st_mtime_ns
    report = build(mini_root, cache64)
    assert report["action"] == "reused" and report["chunks_built"] == 0
    assert (cache64 / packed_cache.PATCHES).stat().st_mtime_ns == before
    assert packed_cache.prepare(cache64, common.load_data(mini_root), 64, workers=2) == cache64


def test_interrupted_build_is_never_trusted_and_resumes(mini_root, tmp_path, monkeypatch):
    monkeypatch.setattr(packed_cache, "CHUNK_ROWS", 8)

    def interrupt_after_three(chunk, built, todo):
        if built == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        build(mini_root, tmp_path / "c", on_chunk=interrupt_after_three)
    assert json.loads((tmp_path / "c" / packed_cache.META).read_text())["complete"] is False
    with pytest.raises(DataError, match="incomplete"):
        packed_cache.CachedPatchDataset(tmp_path / "c", all_samples(mini_root), 64)
    report = build(mini_root, tmp_path / "c")
    assert report["action"] == "resumed" and report["chunks_built"] == report["chunks"] - 3
    assert_same_items(packed_cache.CachedPatchDataset(tmp_path / "c", all_samples(mini_root), 64),
                      common.PatchDataset(mini_root, all_samples(mini_root), 64))


def test_cache_without_complete_flag_is_refused_then_finished(cache64, tmp_path, mini_root):
    cache = Path(shutil.copytree(cache64, tmp_path / "c"))
    meta = json.loads((cache / packed_cache.META).read_text())
    (cache / packed_cache.META).write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(DataError, match=f"{cache}.*incomplete"):
        packed_cache.CachedPatchDataset(cache, all_samples(mini_root), 64)
    assert build(mini_root, cache)["action"] == "resumed"
    assert packed_cache.CachedPatchDataset(cache, all_samples(mini_root), 64)[0][0].shape == (3, 64, 64)


def test_changed_source_file_makes_cache_stale_and_triggers_rebuild(mini_root, tmp_path, capsys):
    root = Path(shutil.copytree(mini_root, tmp_path / "root"))
    build(root, tmp_path / "c")
    samples = all_samples(root)
    victim = root / samples[3].path
    Image.open(victim).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(victim)  # new pixels, size, mtime
    with pytest.raises(DataError, match="stale"):
        packed_cache.CachedPatchDataset(tmp_path / "c", samples, 64, root=root)
    assert build(root, tmp_path / "c")["action"] == "built"
    assert "source files changed (0 added, 0 removed, 1 modified)" in capsys.readouterr().err
    cached = packed_cache.CachedPatchDataset(tmp_path / "c", samples, 64, root=root)
    assert torch.equal(cached[3][0], common.PatchDataset(root, samples, 64)[3][0])


def test_cache_of_another_image_size_is_rejected(cache64, mini_root):
    with pytest.raises(DataError, match=f"--cache {cache64}: holds 64px patches, not 96px") as err:
        packed_cache.CachedPatchDataset(cache64, all_samples(mini_root), 96)
    assert "\n" not in str(err.value)


def test_sample_missing_from_the_cache_is_rejected(cache64, mini_root, demo_root):
    stranger = [s for s in common.load_data(demo_root).cropped if s.patient == "B22-47"][:1]
    with pytest.raises(DataError, match=f"{cache64}: lacks 1 sample"):
        packed_cache.CachedPatchDataset(cache64, stranger, 64)


def test_tampered_index_fails_verification_and_is_rebuilt(cache64, mini_root, tmp_path):
    cache = Path(shutil.copytree(cache64, tmp_path / "c"))
    lines = (cache / packed_cache.INDEX).read_text().splitlines(keepends=True)
    lines[1], lines[2] = lines[1].replace("0,", "1,", 1), lines[2].replace("1,", "0,", 1)  # swap two rows' pixels
    (cache / packed_cache.INDEX).write_text("".join(lines))
    with pytest.raises(DataError, match="checksum"):
        packed_cache.CachedPatchDataset(cache, all_samples(mini_root), 64)
    assert build(mini_root, cache)["action"] == "built"
    packed_cache.CachedPatchDataset(cache, all_samples(mini_root), 64)


def test_truncated_patch_file_fails_verification(cache64, mini_root, tmp_path):
    cache = Path(shutil.copytree(cache64, tmp_path / "c"))
    with open(cache / packed_cache.PATCHES, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match="patches.u8 holds 1000 bytes"):
        packed_cache.CachedPatchDataset(cache, all_samples(mini_root), 64)


def test_patch_dataset_items_are_pils_rgb_pixels_channels_first(mini_root):
    samples = all_samples(mini_root)  # RGB, RGBA, grey and off-size patches: each through the one-copy decode
    ds = common.PatchDataset(mini_root, samples, 64)
    for i, s in enumerate(samples):
        with Image.open(mini_root / s.path) as im:
            want = np.array(im.convert("RGB").resize((64, 64), Image.BILINEAR) if im.size != (64, 64) else
                            im.convert("RGB"))
        assert torch.equal(ds[i][0], torch.from_numpy(want).permute(2, 0, 1)), s.path


# ----------------------------------------------------------------------------------------------- content
def test_unreadable_png_is_recorded_and_behaves_like_patch_dataset(mini_root, tmp_path):
    root = Path(shutil.copytree(mini_root, tmp_path / "root"))
    samples = all_samples(root)
    (root / samples[2].path).write_bytes(b"not a png")
    build(root, tmp_path / "c")
    with pytest.raises(DataError, match=samples[2].path):
        packed_cache.CachedPatchDataset(tmp_path / "c", samples, 64)[2]
    skipping = packed_cache.CachedPatchDataset(tmp_path / "c", samples, 64, skip_bad=True)
    assert_same_items(skipping, common.PatchDataset(root, samples, 64, skip_bad=True))
    assert skipping[2][1] == common.BAD


def test_normalized_cache_stores_quantized_macenko_output(mini_root, tmp_path, cache64):
    import macenko_gpu
    reference = tmp_path / "reference.png"  # a two-stain tile, so the test does not depend on one demo patch
    Image.fromarray(macenko_gpu.synthetic_ihc_tiles(1, 256, seed=3)[0].permute(1, 2, 0).numpy()).save(reference)
    build(mini_root, tmp_path / "c", normalized=True, reference=str(reference), device="cpu")
    samples = all_samples(mini_root)
    cached = packed_cache.CachedPatchDataset(tmp_path / "c", samples, 64)
    normalizer = macenko_gpu.MacenkoNormalizer().fit(macenko_gpu.load_rgb(reference))
    raw = torch.stack([common.PatchDataset(mini_root, samples, 64)[i][0] for i in range(len(samples))])
    want = normalizer.normalize(raw).mul(255).round().to(torch.uint8)
    got = torch.stack([cached[i][0] for i in range(len(samples))])
    assert torch.equal(got, want) and not torch.equal(got, raw)
    assert cached.normalized and cached.reference == str(reference)
    for key, value in normalizer.state_dict().items():
        assert torch.equal(cached.stain[key], value) if torch.is_tensor(value) else cached.stain[key] == value, key
    assert macenko_gpu.MacenkoNormalizer.from_state_dict(cached.stain).fitted  # usable as a checkpoint's stain
    plain = packed_cache.CachedPatchDataset(cache64, samples, 64)
    assert not plain.normalized and plain.stain is None


def test_normalized_request_rebuilds_a_plain_cache(cache64, mini_root, tmp_path):
    import macenko_gpu
    cache = Path(shutil.copytree(cache64, tmp_path / "c"))
    reference = tmp_path / "reference.png"
    Image.fromarray(macenko_gpu.synthetic_ihc_tiles(1, 256, seed=3)[0].permute(1, 2, 0).numpy()).save(reference)
    assert build(mini_root, cache, normalized=True, reference=str(reference), device="cpu")["action"] == "built"
    assert packed_cache.CachedPatchDataset(cache, all_samples(mini_root), 64).normalized


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_builds_then_reuses(mini_root, tmp_path, capsys):
    argv = ["--data-root", str(mini_root), "--out", str(tmp_path / "c"), "--image-size", "32", "--workers", "2",
            "--quiet"]
    assert patch_cache.main(argv) == 0
    assert patch_cache.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("built ") and out[1].startswith("reused ")


def test_cli_bad_data_root_is_one_line_exit_2(tmp_path, capsys):
    assert patch_cache.main(["--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------- --cache-base
def test_cache_folder_names_size_kind_and_reference_under_the_base(tmp_path):
    folder = packed_cache.cache_folder
    assert folder(tmp_path, 64, False, None) == tmp_path / "cache64"
    normalized = folder(tmp_path, 64, True, None)
    assert normalized.parent == tmp_path and normalized.name.startswith("cache64-macenko-")
    assert normalized == folder(tmp_path, 64, True, staining.DEFAULT_REFERENCE)  # None: the default reference
    kinds = {normalized, folder(tmp_path, 128, True, None), folder(tmp_path, 64, True, "B22-1_0/x.png"),
             folder(tmp_path, 64, False, None)}
    assert len(kinds) == 4  # a job of another size, stain reference or kind never shares a folder


def no_space(*args, **kwargs):
    import errno
    raise OSError(errno.ENOSPC, "No space left on device", "patches.u8")


def test_a_full_disk_under_cache_base_falls_back_to_pngs_in_one_line(mini_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(packed_cache, "build_cache", no_space)
    assert packed_cache.prepare_in(tmp_path, common.load_data(mini_root), 64, 1, False, None) is None
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: --cache-base {tmp_path}: no space left") and "decoding PNGs" in line


def test_a_full_disk_under_an_explicit_cache_is_an_environment_fault(mini_root, tmp_path, monkeypatch):
    monkeypatch.setattr(packed_cache, "build_cache", no_space)
    with pytest.raises(common.EnvironmentFault, match=f"{tmp_path / 'c'}: no space left"):  # exit 5, not bad input
        packed_cache.prepare(tmp_path / "c", common.load_data(mini_root), 64, 1, False)


def test_one_stat_per_file_and_one_parse_of_each_index_per_process(mini_root, tmp_path, monkeypatch):
    # at 233k PNGs train.py stat'ed each file 2.6 times and parsed index.csv five times and the hash JSON twice
    from helico import identity
    root = Path(shutil.copytree(mini_root, tmp_path / "root"))
    data = common.load_data(root)
    paths = data.image_paths()
    assert set(data.file_stats) == set(paths)  # the scan's one stat of each file
    assert all(data.file_stats[p] == ((st := (root / p).stat()).st_size, st.st_mtime_ns) for p in paths)
    build(root, tmp_path / "c")
    stats, parses = [], []
    real_stat, real_parse, real_loads = packed_cache.os.stat, packed_cache._parse_index, identity.json.loads
    monkeypatch.setattr(packed_cache.os, "stat", lambda p, *a, **k: stats.append(str(p)) or real_stat(p, *a, **k))
    monkeypatch.setattr(packed_cache, "_parse_index", lambda path: parses.append("index") or real_parse(path))
    monkeypatch.setattr(identity.json, "loads", lambda text, *a, **k: parses.append(
        "hashes" if text.startswith('{"') and "Validation/" in text[:40] else "other") or real_loads(text, *a, **k))
    cache = tmp_path / "hashes.json"
    identity.shared_content(data, cache=cache, progress=False)  # the split's duplicate groups: hashed, cache written
    identity.shared_content(data, cache=cache, progress=False)  # evaluate.py's own look: the cache as written
    identity.first_copies(paths[:20], identity.identical_files(data, cache, progress=False))  # train.py's validation
    packed_cache.prepare(tmp_path / "c", data, 64, 1)  # train.py's reuse check, then its two datasets
    for part in (data.labelled[:10], data.labelled[10:]):
        packed_cache.patch_dataset(root, part, 64, cache=tmp_path / "c", stats=data.file_stats)
    assert not [p for p in stats if p.endswith(".png")]
    assert parses.count("index") == 0 and parses.count("hashes") == 0  # the reuse check knew the rows; we wrote the hashes


def test_a_new_process_on_unchanged_files_reads_the_small_memo_of_identical_files_not_the_hash_cache(mini_root,
                                                                                                      tmp_path,
                                                                                                      monkeypatch):
    from helico import identity
    root = Path(shutil.copytree(mini_root, tmp_path / "root"))
    cache = tmp_path / "hashes.json"
    a, b, c, d = sorted(p for p in common.load_data(root).image_paths() if "/Cropped/" in p)[:4]
    (root / b).write_bytes((root / a).read_bytes())  # one pair of identical files
    first = identity.identical_files(common.load_data(root), cache, progress=False)  # the audit: hashes everything
    assert list(first.values()) == [[a, b]]
    assert first and (tmp_path / "hashes.identical.json").is_file()
    cache.write_text("not json")  # were it read, nothing would be known and every file hashed again
    hashed, real_digest = [], identity._digest
    monkeypatch.setattr(identity, "_digest", lambda path: hashed.append(path) or real_digest(path))
    assert identity.identical_files(common.load_data(root), cache, progress=False) == first and not hashed
    # a file that changes (here: becomes a copy of another) changes the key: worked out again, and right
    (root / d).write_bytes((root / c).read_bytes())
    again = identity.identical_files(common.load_data(root), cache, progress=False)
    assert hashed and sorted(again.values()) == [[a, b], [c, d]]
    memo = tmp_path / "hashes.identical.json"
    stored = json.loads(memo.read_text())
    for damaged in ("{", json.dumps({**stored, "groups": [["x"]]})):  # worked out again, not trusted
        memo.write_text(damaged)
        assert identity.identical_files(common.load_data(root), cache, progress=False) == again


def test_the_build_keeps_a_few_chunks_in_flight_not_all_of_them(mini_root, tmp_path, monkeypatch):
    # waiting on every queued chunk after each finished one was quadratic (~6 s at 220k rows)
    monkeypatch.setattr(packed_cache, "CHUNK_ROWS", 4)
    seen, real_wait = [], packed_cache.wait
    monkeypatch.setattr(packed_cache, "wait", lambda fs, **k: seen.append(len(fs)) or real_wait(fs, **k))
    report = packed_cache.build_cache(common.load_data(mini_root), tmp_path / "c", 32, workers=2, progress=False)
    assert report["action"] == "built" and report["chunks"] > 10 and max(seen) <= 4


def test_the_index_is_written_and_read_as_csv_does_quoted_or_not(mini_root, tmp_path):
    import csv
    import hashlib
    import io
    data = common.load_data(mini_root)
    samples = packed_cache.unique_samples(data.all_samples())
    odd = [dataclasses.replace(samples[0], path=path) for path in ('odd,"name".png', "line\nbreak.png")]
    for case in (samples, [odd[0], *samples[1:]], [odd[1], *samples[1:]]):  # the fast join, then the quoting
        stats = {**data.file_stats, **{s.path: (12, 34) for s in odd}}
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(packed_cache.INDEX_COLUMNS)
        writer.writerows((r, s.path, s.patient, s.label, s.source, *stats[s.path]) for r, s in enumerate(case))
        index, written = packed_cache.index_of(data.root, case, stats)
        assert written == out.getvalue().encode()
        (tmp_path / "index.csv").write_bytes(written)  # read back: the split, then csv's reader
        read = packed_cache._parse_index(tmp_path / "index.csv")
        assert read.paths == index.paths == [s.path for s in case] and read.stats == index.stats
        assert read.sha256 == index.sha256 == hashlib.sha256(written).hexdigest()
        assert read.row_of == {s.path: r for r, s in enumerate(case)}
    (tmp_path / "index.csv").write_bytes(written + b"9,x.png\n")  # a short row
    with pytest.raises(ValueError):
        packed_cache._parse_index(tmp_path / "index.csv")


def test_the_index_stats_what_the_scan_did_not_and_names_a_file_it_cannot_stat(mini_root):
    data = common.load_data(mini_root)
    samples = packed_cache.unique_samples(data.all_samples())
    (stated, written), (scanned, same) = (packed_cache.index_of(data.root, samples, stats)
                                          for stats in (None, data.file_stats))
    assert written == same and stated.stats == scanned.stats and stated.paths == scanned.paths  # a stat per file
    gone = dataclasses.replace(samples[0], path="CrossValidation/Cropped/B22-47_0/999999.png")
    with pytest.raises(DataError, match=f"{mini_root / gone.path}: cannot stat"):
        packed_cache.index_of(data.root, [gone, *samples[1:]], data.file_stats)
