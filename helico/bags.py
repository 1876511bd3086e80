"""Feature bags for the patient model: each patient's patches through a frozen network's penultimate layer, stored
once per patient and keyed so that a stale bag is never reused.

    done = bags.ensure("runs/26/best.pt", sha256, ckpt, net, normalizer, "checkpoint", data, patients, device, ...)
    bag = bags.load(done["folder"], "B22-03", done["key"])   # Bag: float16 features (n, d), each patch's path, role

What a patient's file holds: every patch of that patient, each once (its `_AugK` copies are not independent samples and
are left out): its Cropped patches (role "cropped"; a HoldOut patient's patches: role "holdout"), which form the bag
the patient model reads, and its original Annotated windows (role "annotated", with their Presence label), which the
model never reads: evaluate.py asks whether the attention falls on the windows where a pathologist saw bacteria.
Annotated windows stay out of the bag for the reason they stay out of the patient rule: pathologists picked them
knowing the diagnosis (positive windows exist only for infected patients) and HoldOut patients have none.

The key is a hash of what the features depend on: the network (the patch checkpoint's file hash, the ImageNet
backbone's name, or a foundation encoder's name and its weights file's hash), the stain normalization applied first
and the image size. A file whose key differs, or whose files (path, size and mtime of each) are not the wanted ones,
is extracted again: a rewritten PNG makes its patient's bag stale. Each file is written whole (atomically) as soon as its patient's
last patch is through, so an interrupted extraction resumes at the first patient not yet stored.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import common
from helico import encoders, feeds, inference, model

BAG_ROLES = ("cropped", "holdout")  # what the patient model reads; "annotated" windows only measure its attention


def stain_fingerprint(stain: dict | None) -> str | None:
    """A hash of a Macenko state dict (None without Macenko): its tensors' values and its settings."""
    if stain is None:
        return None
    plain = lambda v: v.detach().cpu().double().tolist() if torch.is_tensor(v) else repr(v)
    return hashlib.sha256(json.dumps(stain, sort_keys=True, default=plain).encode()).hexdigest()


def bag_key(network: str, source: str, stain: dict | None, image_size: int) -> str:
    """The hash every stored bag carries: features of `network` (a checkpoint's sha256, or an ImageNet arch) from
    `source` (checkpoint | imagenet), after `stain` normalization, at `image_size`."""
    what = {"network": network, "features": source, "stain": stain_fingerprint(stain), "image_size": int(image_size)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def patient_samples(data: common.HelicoData, patients) -> dict[str, list[tuple[common.Sample, str]]]:
    """patient -> [(sample, role)]: its Cropped (or HoldOut) patches, then its original Annotated windows."""
    out: dict[str, list] = {p: [] for p in patients}
    for s in common.one_per_window([s for s in data.cropped + data.holdout if s.patient in out]):
        out[s.patient].append((s, "holdout" if s.source == "holdout" else "cropped"))
    for s in common.select(data.labelled, out):
        if s.source == "annotated":
            out[s.patient].append((s, "annotated"))
    return out


@dataclass
class Bag:
    patient: str
    features: torch.Tensor   # float16 (n, d)
    paths: list[str]
    roles: list[str]         # cropped | holdout | annotated, per row
    labels: list[int]        # annotated windows: Presence 1 -> 1, -1 -> 0; -1 for bag patches (no diagnosis kept)

    def rows(self, roles=BAG_ROLES) -> np.ndarray:
        return np.array([r in roles for r in self.roles], dtype=bool)

    def bag(self) -> torch.Tensor:
        """The rows the patient model reads, as float32."""
        return self.features[torch.from_numpy(self.rows())].float()


def bag_file(folder: Path, patient: str) -> Path:
    return Path(folder) / f"{patient}.pt"


def file_identity(root, paths, stats: dict | None = None) -> list[list]:
    """[path, size, mtime_ns] of each file: a bag is valid only for these very files (the scan's stats when given,
    else one stat each)."""
    out = []
    for p in paths:
        if stats is not None and p in stats:
            size, mtime = stats[p]
        else:
            try:
                st = (Path(root) / p).stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1
        out.append([p, int(size), int(mtime)])
    return out


def load(folder, patient: str, key: str, files: list[list] | None = None) -> Bag | None:
    """The stored bag of `patient`, or None when missing, unreadable, of another key or (given `files`, from
    file_identity) of other files, or of the same files since rewritten: what extract() then redoes."""
    path = bag_file(folder, patient)
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated file from a disk fault: extracted again
        return None
    if not isinstance(d, dict) or d.get("key") != key or (files is not None and d.get("files") != files):
        return None
    return Bag(patient, d["features"], d["paths"], d["roles"], d["labels"])


def extract(body, normalizer, root, wanted: dict[str, list], folder, key: str, image_size: int, device, *,
            batch_size: int, workers: int, skip_bad: bool = False, cache=None, precision=None,
            resident_max_frac: float = feeds.DEFAULT_MAX_FRAC, stats: dict | None = None) -> dict:
    """Store the bag of every patient of `wanted` (patient_samples()) in `folder`, skipping those already stored
    under `key`: one inference.run pass over the patches still missing, in patient order, each patient's file
    written as soon as its last patch is through. Returns counts and the extraction rate."""
    folder = Path(folder)
    files = {p: file_identity(root, [s.path for s, _ in items], stats) for p, items in wanted.items()}
    todo = {p: items for p, items in wanted.items() if load(folder, p, key, files[p]) is None}
    samples = [s for items in todo.values() for s, _ in items]
    patients = list(todo)
    counts = np.array([len(items) for items in todo.values()], dtype=np.int64)
    owner = np.repeat(np.arange(len(patients)), counts)  # sample index -> its patient's number
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)  # each patient's first sample index
    left = counts.copy()
    rows: dict[int, dict[int, torch.Tensor]] = {}
    written: set[int] = set()

    def write(i: int) -> None:
        written.add(i)
        items, got = todo[patients[i]], rows.pop(i, {})
        keep = sorted(got)
        feats = torch.stack([got[j] for j in keep]).half() if keep else torch.zeros(0, 0, dtype=torch.float16)
        chosen = [items[j - first[i]] for j in keep]
        common.atomic_torch_save({"key": key, "files": files[patients[i]], "features": feats,
                                  "paths": [s.path for s, _ in chosen], "roles": [r for _, r in chosen],
                                  "labels": [int(s.label) if r == "annotated" else -1 for s, r in chosen]},
                                 bag_file(folder, patients[i]))

    def consume(idx, out, dropped):
        for j in dropped:
            left[owner[j]] -= 1
        for k, j in enumerate(idx.tolist()):
            rows.setdefault(int(owner[j]), {})[j] = out[k].clone()
            left[owner[j]] -= 1
        for i in {int(owner[j]) for j in [*idx.tolist(), *dropped]}:
            if left[i] == 0:
                write(i)
    start = time.perf_counter()
    bad = inference.run(body, normalizer, root, samples, image_size, device, consume, batch_size=batch_size,
                        workers=workers, skip_bad=skip_bad, cache=cache, precision=precision, desc="features",
                        resident_max_frac=resident_max_frac, stats=stats) if samples else []
    for i in range(len(patients)):  # a patient without any patch still gets its (empty) file
        if i not in written:
            write(i)
    seconds = time.perf_counter() - start
    return {"patients": len(wanted), "extracted_patients": len(todo), "reused_patients": len(wanted) - len(todo),
            "patches": len(samples), "skipped": [samples[j].path for j in bad], "seconds": seconds,
            "img_s": len(samples) / seconds if samples and seconds > 0 else float("nan")}


# ----------------------------------------------------------------------------------------------- where and from what
SOURCES = ("checkpoint", "imagenet", *encoders.NAMES)  # and timm:ARCH


def label_free(source: str) -> bool:
    """Whether the features come from a network that never saw this dataset's labels."""
    return source != "checkpoint"


def patient_dir(checkpoint_path) -> Path:
    """runs/26/best.pt -> runs/26/patient/, runs/26/last.pt -> runs/26/patient-last/: one patient model per patch
    checkpoint, so training one never replaces another's."""
    path = Path(checkpoint_path)
    return path.parent / ("patient" if path.stem == "best" else f"patient-{path.stem}")


def feature_network(ckpt: dict, net, source: str, checkpoint_sha256: str, encoder_weights=None):
    """(the network whose output gives the features, on the CPU; its identity for the key): the patch checkpoint's
    penultimate layer by default; `source` imagenet: its architecture with torchvision's ImageNet weights, frozen;
    a foundation encoder (encoders.py) or timm:ARCH: that network with the weights of the local file
    `encoder_weights` (its sha256 in the key)."""
    if source == "imagenet":
        return model.penultimate(common.build_model(ckpt["arch"], "imagenet"))[0].eval(), f"imagenet:{ckpt['arch']}"
    if encoders.is_encoder(source):
        enc = encoders.build(source, encoder_weights)
        return enc, f"{source}:{common.file_sha256(encoder_weights)}"
    return model.penultimate(net)[0].eval(), checkpoint_sha256


def extraction_precision(ckpt: dict, source: str, device, amp: bool | None = None):
    """The precision features are extracted under: the patch run's own (model.scoring_precision) for its features; a
    foundation encoder's autocast on CUDA whatever the patch run did (its features feed no stored threshold). `amp`
    True or False (--amp/--no-amp) overrides either."""
    if encoders.is_encoder(source):
        return model.precision(device, amp=device.type == "cuda" if amp is None else amp)
    return model.scoring_precision(ckpt, device, amp)


def ensure(checkpoint_path, sha: str, ckpt: dict, net, normalizer, source: str, data, patients, device, *,
           batch_size: int, workers: int, skip_bad: bool = False, cache=None, amp: bool | None = None,
           resident_max_frac: float = feeds.DEFAULT_MAX_FRAC, expected_key: str | None = None,
           encoder_weights=None) -> dict | None:
    """The bags of `patients` for this checkpoint and feature source, extracted where missing or made from other
    files (train_patient.py for the whole split, evaluate.py for what its data root adds): {"key", "folder",
    "network", **extract()'s counts}. Features under the run's own precision (model.scoring_precision), as
    evaluate.py scores; a foundation encoder's under autocast on CUDA (bf16 from Ampere on). None, with nothing
    extracted, when the key is not `expected_key` (a patient model trained on other bags)."""
    body, network = feature_network(ckpt, net, source, sha, encoder_weights)
    key = bag_key(network, source, ckpt["stain"], int(ckpt["image_size"]))
    if expected_key is not None and key != expected_key:
        return None
    folder = patient_dir(checkpoint_path) / "bags" / key[:16]
    precision = extraction_precision(ckpt, source, device, amp)
    stats = extract(body, normalizer, data.root, patient_samples(data, patients), folder, key,
                    int(ckpt["image_size"]), device, batch_size=batch_size, workers=workers, skip_bad=skip_bad,
                    cache=cache, precision=precision,
                    resident_max_frac=resident_max_frac, stats=data.file_stats)
    return {"key": key, "folder": folder, "network": network, **stats}
