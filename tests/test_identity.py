"""helico/identity.py: content hashes and their cache, identical files and duplicate-patient groups, the
near-duplicate search on perceptual hashes."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common
from helico import identity
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
    data = common.load_data(root)
    assert data.uncertain_files == ["CrossValidation/Annotated/B22-60_0/00005.png"]
    assert identity.duplicate_groups(identity.shared_content(data, progress=False)) == [["B22-60", "B22-61"]]


# ----------------------------------------------------------------------------------------------- decoding
def save(path, pixels) -> Path:
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


def test_a_flat_or_faintly_noisy_image_is_near_uniform_and_a_textured_one_and_its_re_encoding_are_not(tmp_path):
    rng = np.random.default_rng(0)
    flat = save(tmp_path / "flat.png", np.full((256, 256, 3), 231))
    faint = save(tmp_path / "faint.png", 231 + rng.integers(-2, 3, (256, 256, 3)))  # blank glass: sensor noise
    blocks = rng.integers(40, 200, (16, 16, 3))
    tissue = np.kron(blocks, np.ones((16, 16, 1))) + rng.integers(-6, 7, (256, 256, 3))
    textured = save(tmp_path / "tissue.png", np.clip(tissue, 0, 255))
    jpeg = tmp_path / "copy.jpg"
    Image.open(textured).save(jpeg, quality=85)
    copy = save(tmp_path / "copy.png", np.clip(np.asarray(Image.open(jpeg), dtype=np.int16) + 3, 0, 255))
    flat, faint, textured, copy = (identity.decode_check(f) for f in (flat, faint, textured, copy))
    assert flat.dhash == 0 and flat.stable_bits == 0 and not flat.informative
    assert faint.stable_bits < identity.MIN_STABLE_BITS and not faint.informative
    assert textured.informative and copy.informative and textured.size == (256, 256) and textured.error is None
    assert bin(textured.dhash ^ copy.dhash).count("1") <= 3


def test_the_decode_cache_keeps_every_answer_and_an_earlier_version_is_decoded_again(tmp_path):
    good = save(tmp_path / "a.png", np.full((8, 8, 3), 9))
    bad = tmp_path / "b.png"
    bad.write_bytes(good.read_bytes()[:40])  # a header, no pixels
    stats = {p.name: common.size_mtime(p) for p in (good, bad)}
    checked = identity.decode_images(tmp_path, list(stats), stats, tmp_path / "d.tsv", progress=False)
    assert checked["a.png"] == identity.Decoded((8, 8), None, 0, 0) and checked["b.png"].error
    assert identity.read_decode_cache(tmp_path / "d.tsv", stats) == checked
    lines = (tmp_path / "d.tsv").read_text().splitlines()
    (tmp_path / "d.tsv").write_text("\n".join(["helico decode cache v1" + lines[0][22:], *lines[1:]]) + "\n")
    assert identity.read_decode_cache(tmp_path / "d.tsv", stats) == {}  # no stable bits in it: decoded again


# ----------------------------------------------------------------------------------------------- near-duplicates
def brute_pairs(values: dict):
    return {(a, b) for a in values for b in values if a < b and bin(values[a] ^ values[b]).count("1") <= identity.NEAR}


def test_the_banded_search_finds_every_pair_of_distinct_hashes_within_the_threshold():
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, 200, dtype=np.int64)]
    for i, flips in enumerate((1, 3, 6, 7)):  # near copies of base[i]: within NEAR bits or just beyond
        base.append(base[i] ^ sum(1 << int(b) for b in rng.choice(64, flips, replace=False)))
    values = np.array(base, dtype=np.uint64)
    found = {pair for i, j, bits in identity.near_hash_pairs(values) for pair in zip(i.tolist(), j.tolist(),
                                                                                    bits.tolist())}
    brute = brute_pairs(dict(enumerate(base)))
    assert {(i, j) for i, j, _ in found} == brute and len(found) == len(brute) and (2, 202) in brute
    assert (3, 203) not in brute and all(bin(base[i] ^ base[j]).count("1") == d for i, j, d in found)


PLACES = ("train", "val", "test", "holdout", None)


def concern(a, b):
    if a != b and "holdout" in (a, b):
        return "holdout_vs_crossvalidation"
    return "across_parts" if a != b and None not in (a, b) else "within_part"


def look_alike(n_images: int, n_hashes: int, seed: int):
    """Images of 12 patients (two of them one duplicate group) over the places, hashes drawn from a few values
    and near variants of them: many images per hash, and many near pairs between hashes."""
    rng = np.random.default_rng(seed)
    roots = [int(x) for x in rng.integers(0, 2**63, 3, dtype=np.int64)]
    values = [r ^ sum(1 << int(b) for b in rng.choice(64, int(rng.integers(0, 9)), replace=False))
              for r in roots for _ in range(n_hashes // 3)]
    hashes, where = {}, {}
    for k in range(n_images):
        patient = f"P{rng.integers(0, 12)}"
        path = f"{patient}/{k}.png"
        hashes[path] = values[int(rng.integers(0, len(values)))]
        where[path] = (PLACES[int(patient[1:]) % 5], patient)
    return hashes, where


def owner(patient):
    return "P0" if patient in ("P0", "P5") else patient  # a duplicate-patient group: never a pair to count


def test_near_pairs_are_counted_by_concern_as_brute_force_counts_them_and_the_ones_to_act_on_listed_first():
    hashes, where = look_alike(400, 24, seed=3)
    near = identity.near_duplicates(hashes, where.get, owner, concern, ("holdout_vs_crossvalidation", "across_parts"),
                                    limit=5)
    want = {}
    for a, b in brute_pairs(hashes):
        if owner(where[a][1]) != owner(where[b][1]):
            c = concern(where[a][0], where[b][0])
            want[c] = want.get(c, 0) + 1
    assert near.pairs == want and set(want) == {"holdout_vs_crossvalidation", "across_parts", "within_part"}
    assert [c for c, *_ in near.listed] == ["holdout_vs_crossvalidation"] * 5 + ["across_parts"] * 5
    for c, a, b, bits in near.listed:
        assert concern(where[a][0], where[b][0]) == c and bin(hashes[a] ^ hashes[b]).count("1") == bits <= 6
    examples = {(frozenset((where[a], where[b])), frozenset((hashes[a], hashes[b]))) for _, a, b, _ in near.listed}
    assert len(examples) == len(near.listed)  # one per pair of patients and of hashes
    assert near.shared_hashes > 0 and near.largest_share > 1


def test_a_look_alike_group_of_thousands_is_counted_without_listing_its_pairs():
    # one hash shared by 6,000 images (18 million pairs): counted from the sizes of its (place, patient) groups
    n = 6000
    where = {f"P{k % 12}/{k}.png": (PLACES[k % 12 % 5], f"P{k % 12}") for k in range(n)}
    hashes = dict.fromkeys(where, 0x0123456789ABCDEF)
    hashes["P1/near.png"] = 0x0123456789ABCDEF ^ 0b101  # 2 bits off: near every one of them
    where["P1/near.png"] = ("val", "P1")
    near = identity.near_duplicates(hashes, where.get, owner, concern, ("holdout_vs_crossvalidation", "across_parts"))
    per = {}
    for path, (place, patient) in where.items():
        per.setdefault((place, owner(patient)), []).append(path)
    want = {}
    keys = sorted(per, key=str)
    for x, (pa, oa) in enumerate(keys):
        for pb, ob in keys[x + 1:]:
            if oa != ob:
                c = concern(pa, pb)
                want[c] = want.get(c, 0) + len(per[(pa, oa)]) * len(per[(pb, ob)])
    assert near.pairs == want and sum(want.values()) > 10_000_000
    listed = ("holdout_vs_crossvalidation", "across_parts")
    groups = sorted({at for path, at in where.items() if path != "P1/near.png"}, key=str)  # (place, patient)
    shared = [(pa, pb) for x, (pa, ta) in enumerate(groups) for pb, tb in groups[x + 1:] if owner(ta) != owner(tb)]
    with_near = [(pa, "val") for pa, ta in groups if owner(ta) != "P1"]  # near.png against the shared hash's groups
    assert len(near.listed) == sum(concern(a, b) in listed for a, b in shared + with_near)  # one per pair of them
    assert near.shared_hashes == 1 and near.largest_share == n


def test_the_near_duplicate_search_scales_to_the_real_dataset_and_keeps_only_near_pairs():
    # random hashes put hundreds of images in each band group; only the planted near copies come out
    rng = np.random.default_rng(1)
    hashes = {f"P{i}/{i}.png": int(x) for i, x in enumerate(rng.integers(0, 2**63, 60_000, dtype=np.int64))}
    for i in range(5):
        hashes[f"Q{i}/c.png"] = hashes[f"P{i}/{i}.png"] ^ (1 << i) ^ (1 << 40)  # 2 bits off
    where = lambda path: ("holdout" if path[0] == "Q" else "train", path.split("/")[0])
    near = identity.near_duplicates(hashes, where, str, concern, ("holdout_vs_crossvalidation",))
    assert near.pairs == {"holdout_vs_crossvalidation": 5} and near.shared_hashes == 0
    assert [(a, b, bits) for _, a, b, bits in near.listed] == [(f"P{i}/{i}.png", f"Q{i}/c.png", 2) for i in range(5)]
