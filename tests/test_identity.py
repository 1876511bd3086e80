"""helico/identity.py: content hashes and their cache, identical files and duplicate-patient groups, the
near-duplicate search on perceptual hashes."""
import json
import shutil

import numpy as np
import pytest

import common
from helico import helicodata, identity
from test_common import make_root
from test_splits import data, root  # noqa: F401 (fixtures: a small data root with two byte-identical patient pairs)


# ----------------------------------------------------------------------------------------------- content hashes
def test_hash_cache_skips_unchanged_files_and_rehashes_changed_ones(data, root, tmp_path, monkeypatch):
    cache = tmp_path / "cache.json"
    paths = [s.path for s in data.cropped]
    first = identity.file_digests(root, paths, cache=cache, progress=False, only_size_collisions=False)
    hashed = []
    real = identity._digest
    monkeypatch.setattr(identity, "_digest", lambda p: hashed.append(p) or real(p))
    assert identity.file_digests(root, paths, cache=cache, progress=False, only_size_collisions=False) == first
    assert hashed == []
    (root / paths[0]).write_bytes(b"changed content")
    again = identity.file_digests(root, paths, cache=cache, progress=False, only_size_collisions=False)
    assert len(hashed) == 1 and again[paths[0]] != first[paths[0]]


def test_the_hash_cache_written_in_pieces_is_what_json_dumps_writes(tmp_path):
    for digests in ({}, {'odd "name".png': "ff", "b.png": "00"}, {f"p{i}.png": f"{i:032x}" for i in range(20000)}):
        stats = {p: (i + 1, 10 ** 18 + i) for i, p in enumerate(digests)}
        identity.write_hash_cache(tmp_path / "h.json", digests, stats)
        assert (tmp_path / "h.json").read_text() == json.dumps({p: [*stats[p], d] for p, d in digests.items()})


def test_files_with_a_unique_size_are_not_hashed(data, root):
    (root / data.cropped[0].path).write_bytes(b"x" * 12345)  # no other file has this size
    digests = identity.file_digests(root, [s.path for s in data.cropped], progress=False)
    assert data.cropped[0].path not in digests and len(digests) > 0


def test_unwritable_hash_cache_is_a_clear_error(data, root, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(common.DataError, match="--hash-cache .*cannot write"):
        identity.file_digests(root, [s.path for s in data.cropped], cache=tmp_path / "file" / "h.json", progress=False)


def test_a_presence_zero_image_shared_by_two_patients_groups_them(tmp_path):
    rows = [("B22-60", 0, 5, 0), ("B22-61", 0, 6, -1)]
    root = make_root(tmp_path, rows, ["B22-60_0/00005.png", "B22-61_0/00006.png"], [],
                     {"B22-60": "ALTA", "B22-61": "NEGATIVA"})
    shutil.copy(root / "CrossValidation/Annotated/B22-60_0/00005.png", root / "CrossValidation/Annotated/B22-61_0/00006.png")
    data = helicodata.load_data(root)
    assert data.uncertain_files == ["CrossValidation/Annotated/B22-60_0/00005.png"]
    assert identity.duplicate_groups(identity.shared_content(data, progress=False)) == [["B22-60", "B22-61"]]


# ----------------------------------------------------------------------------------------------- near-duplicates
def test_the_banded_search_finds_every_pair_within_the_threshold():
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, 200, dtype=np.int64)]
    hashes = {f"P{i}/x.png": h for i, h in enumerate(base)}
    for i, flips in enumerate((0, 3, 6, 7)):  # near copies of base[i]: within NEAR bits or just beyond
        bits = rng.choice(64, flips, replace=False)
        hashes[f"Q{i}/y.png"] = base[i] ^ sum(1 << int(b) for b in bits)
    pairs, total = identity.near_duplicate_pairs(hashes)
    found_pairs = {(a, b) for a, b, _ in pairs}
    brute = {(a, b) for a in sorted(hashes) for b in sorted(hashes) if a < b
             and bin(hashes[a] ^ hashes[b]).count("1") <= identity.NEAR}
    assert found_pairs == brute and ("P2/x.png", "Q2/y.png") in brute and ("P3/x.png", "Q3/y.png") not in brute
    assert total == len(pairs) and all(bin(hashes[a] ^ hashes[b]).count("1") == d for a, b, d in pairs)


def test_the_near_duplicate_search_scales_to_the_real_dataset_and_keeps_only_near_pairs(monkeypatch):
    # 220k random hashes put ~200 images in each band group: a dict of every candidate pair took 24 GB (killed);
    # 60k here (~8.5 million candidates before) take a few seconds and keep only the planted near copies
    rng = np.random.default_rng(1)
    hashes = {f"P{i}/{i}.png": int(x) for i, x in enumerate(rng.integers(0, 2**63, 60_000, dtype=np.int64))}
    for i in range(5):
        hashes[f"Q{i}/c.png"] = hashes[f"P{i}/{i}.png"] ^ (1 << i) ^ (1 << 40)  # 2 bits off
    pairs, total = identity.near_duplicate_pairs(hashes)
    assert {(a, b) for a, b, _ in pairs} == {(f"P{i}/{i}.png", f"Q{i}/c.png") for i in range(5)} and total == 5
    monkeypatch.setattr(identity, "MAX_NEAR_PAIRS", 2)  # the report's list is bounded; the count is not
    pairs, total = identity.near_duplicate_pairs(hashes)
    assert len(pairs) == 2 and total == 5
