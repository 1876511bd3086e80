"""Which patches the patch model trains on, and which of a training patient's Cropped patches the patient model may
read: so that no training-bag patch was a training example of the encoder.

train.py trains on the labelled samples of the training patients: the Annotated windows and the easy negatives
(Cropped patches of NEGATIVA patients). With --easy-negatives half (the default) the easy negatives come only from
the Cropped windows outside the bag half, and the bag half is left to the patient model:

    samples = unseen.encoder_training_samples(data, split["train"], "half", limit_samples=None, seed=0)
    seen = unseen.seen_windows(samples)                  # every (folder, window) the patch model trained on
    keep = unseen.training_bag_rows(bag.paths, bag.roles, seen, "checkpoint")

The bag half is a property of the window alone (a hash of its folder and number: no label, no file content), so it
splits infected and NEGATIVA patients alike, and a window's `_AugK` copies fall on the side of their window. A
training patient's bag for checkpoint features is its Cropped patches in the bag half whose window the patch model
never trained on (an Annotated window that is also a Cropped patch is left out); for a label-free encoder (ImageNet,
a foundation model) every Cropped patch. Validation, test and HoldOut patients' bags are whole: nothing of theirs
was trained on.
"""
from __future__ import annotations

import hashlib

import common
from helico import sampling

EASY_NEGATIVES = ("half", "all")  # train.py --easy-negatives; "all": runs made before the choice existed


def window_key(path: str) -> tuple[str, int]:
    """(folder, window number) of a patch path: the same for an Annotated window, its Cropped copy and Aug copies."""
    folder, name = path.rsplit("/", 2)[-2:]
    return folder, common.parse_patch_name(name)[0]


def in_bag_half(path: str) -> bool:
    """Whether the window of `path` belongs to the half kept for the patient model's bags (label-free, by hash)."""
    folder, window = window_key(path)
    return hashlib.sha256(f"{folder}/{window}".encode()).digest()[0] % 2 == 0


def encoder_training_samples(data, train_patients, easy_negatives: str, limit_samples: int | None, seed: int):
    """The samples train.py trains the patch model on (Aug copies included): the labelled samples of the training
    patients, the easy negatives of the bag half left out under "half", then the --limit-samples subset."""
    train = common.select(data.labelled, train_patients, include_aug=True)
    if easy_negatives == "half":
        train = [s for s in train if s.source != "supplemental" or not in_bag_half(s.path)]
    return sampling.stratified_subset(train, limit_samples, seed)


def seen_windows(samples) -> set[tuple[str, int]]:
    return {window_key(s.path) for s in samples}


def training_bag_rows(paths, roles, seen: set, label_free: bool, allow_seen: bool = False) -> list[bool]:
    """Which bag rows (Cropped patches) of a training patient the patient model trains on: all of them for a
    label-free encoder or with allow_seen; else those of the bag half whose window the encoder never trained on."""
    rows = [r == "cropped" for r in roles]
    if label_free or allow_seen:
        return rows
    return [keep and in_bag_half(p) and window_key(p) not in seen for keep, p in zip(rows, paths)]
