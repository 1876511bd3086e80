"""Evaluate a trained H. pylori patch classifier so that the report cannot fool its reader.

    python evaluate.py --checkpoint runs/26/best.pt                       # -> runs/26/eval/
    python evaluate.py --checkpoint runs/26/best.pt --holdout             # -> runs/26/eval-holdout/: + HoldOut patients
    python evaluate.py --checkpoint runs/26/best.pt --data-root /scratch/$USER/HelicoDataSet --out /tmp/ev26
    python evaluate.py --compare runs/10/best.pt runs/14/best.pt          # deltas with paired cluster-bootstrap CIs
    python evaluate.py --cv runs/27-f*                                    # pooled out-of-fold test predictions

Everything comes from the checkpoint (train.py writes it): architecture, weights, image size, the patient split,
the Macenko stain reference and the patch threshold chosen on validation. Only --data-root may override the
stored data root (the staged copy moves). Preprocessing is training's validation path (model.model_input:
Macenko -> ImageNet normalization) under the run's precision and layout (model.precision); score = sigmoid(logit).

What it measures. The headline is the split's test part (nothing was chosen on it); the validation part, which
chose the epoch, the patch threshold and the patient rule, is reported as the selection set (optimistic). A
two-part split (no test part) is evaluated on val, and the report says first that there is no untouched set.
- patches (labelled windows, each once, Aug copies excluded, byte-identical files once), at the stored threshold
  and at 0.5, next to the all-negative dummy's accuracy; and by source: annotated (hard) vs supplemental (Cropped
  of NEGATIVA, easy);
- patients: ALL their Cropped patches are scored and aggregated (fraction of positive patches, and the mean of the
  top-k scores); the rule and its threshold are chosen on the validation patients (Youden's J) and applied
  unchanged to test and HoldOut. Annotated windows are NOT aggregated: pathologists picked them knowing the
  diagnosis (positive windows exist only for infected patients) and HoldOut patients have none, so using them
  would leak the label and make validation and HoldOut scores incomparable;
- --holdout: the same rule and threshold applied to the HoldOut patients; refused (exit 1, naming them) when a
  HoldOut patient shares an ID or a byte-identical image with CrossValidation;
- 95% CIs (metrics.py): exact binomial (Clopper-Pearson) for patient sensitivity, specificity and accuracy; a
  patient-cluster bootstrap (patients sharing byte-identical images are one cluster) for patch metrics and patient
  ROC-AUC, "not estimable" with fewer than 10 clusters in a class; the share of resamples where a metric was
  undefined is printed beside it. NaN (with the reason) where a metric is undefined.

Writes into runs/<id>/eval/ (eval-holdout/ with --holdout, so neither replaces the other; or --out), built in a
temp folder beside it and swapped in whole: report.md, metrics.json, predictions.csv, patients.csv, figures/*.png,
learning_curves.png (from the run's log.jsonl), gradcam/*.png + heatmaps.npz, skipped_images.txt (--skip-bad-images),
stain_preview.png (validation positives and hard negatives: original | as trained | canonical Macenko).
--compare writes compare.md and compare.json (default <first run>/compare/), on the test patients the checkpoints
share (else validation). --cv evaluates each fold run (its eval/), then writes runs/27-cv/ (report.md,
metrics.json, predictions.csv, patients.csv: see crossval.py).
This file owns what is measured and how (patient rows, the patient rule, intervals, --compare, --cv); metrics.py
defines the metrics and intervals, eval_report.py writes the files and markdown, figures.py the charts, gradcam.py
the Grad-CAM, crossval.py the pooling of folds.

--cache DIR reads patches from a packed cache (patch_cache.py) instead of PNGs (Grad-CAM still decodes its few). A
plain cache gets the checkpoint's Macenko applied (same pixels, same scores); one train.py --cache-normalized wrote
is used as it is, only if normalized to the checkpoint's own stain reference (refused otherwise, never rebuilt).

Exit codes: 0 ok; 1 --holdout on a HoldOut that is not independent of CrossValidation (patients named); 2 bad
input (missing/unreadable/foreign checkpoint, wrong --arch, data root lacking a patient of the split, empty split,
unreadable image without --skip-bad-images, --compare of runs sharing fewer than 5 patients, --cv folds that are
not one cross-validation); 5 no space left or an I/O error while writing the report (the previous one is kept);
130 Ctrl-C (nothing written).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import common
import crossval
import eval_report
import figures
import gradcam
import loaders
import macenko_gpu
import metrics
import model
import patch_cache
import resident
import splits
from common import DataError

PATCH_METRICS = ("pr_auc", "roc_auc", "recall", "precision", "f1", "accuracy")
THRESHOLD_METRICS = ("recall", "precision", "f1", "accuracy")
PATIENT_METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")
RULES = ("fraction_positive", "topk_mean")
INFECTED = ("BAIXA", "ALTA")


# ----------------------------------------------------------------------------------------------- flags
def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="CKPT", help="a train.py checkpoint (best.pt: the epoch with the best "
                      "validation PR-AUC); the report goes to eval/ beside it (eval-holdout/ with --holdout)")
    what.add_argument("--compare", nargs="+", metavar="CKPT", help="two or more checkpoints: headline metrics side "
                      "by side, deltas against the first with paired patient-cluster bootstrap CIs, on the test "
                      "patients they share (else the validation patients)")
    what.add_argument("--cv", nargs="+", metavar="RUN", help="the run folders of one cross-validation (runs/27-f*): "
                      "each is evaluated (its eval/), then their out-of-fold test predictions are pooled into "
                      "<runs>/27-cv/ (or --out), after checking the folds' test parts are disjoint and cover the "
                      "patients")
    p.add_argument("--data-root", help="HelicoDataSet folder; default: the one stored in the checkpoint. Point it at "
                   "the staged copy on a cluster node")
    p.add_argument("--out", help="output folder (default runs/<id>/eval/, or eval-holdout/ with --holdout). An "
                   "existing one is replaced whole, but only if it holds a previous metrics.json/compare.json")
    p.add_argument("--arch", help="refuse the checkpoint unless it is this architecture (a guard for scripts)")
    p.add_argument("--holdout", action="store_true", help="also apply the validation-chosen patient rule and "
                   "threshold to the HoldOut patients (an independent estimate; slow on the real data: ~89k "
                   "patches). Refused (exit 1) if a HoldOut patient shares an ID or an image with CrossValidation")
    p.add_argument("--bootstrap", type=int, default=1000, help="patient-cluster bootstrap resamples for the patch "
                   "metrics' 95%% CIs (patient proportions get exact binomial intervals); 0 skips them")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed: the same seed gives the same intervals")
    p.add_argument("--top-k", type=int, default=10, help="k of the top-k-mean patient rule (mean of a patient's k "
                   "highest patch scores; all patches when the patient has fewer)")
    p.add_argument("--gradcam", type=int, default=8, help="patches per Grad-CAM grid (top false positives, false "
                   "negatives, true positives); 0 skips Grad-CAM")
    p.add_argument("--batch-size", type=int, default=256, help="inference batch; lower it if the GPU runs out "
                   "of memory")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader processes decoding "
                   "PNGs; decoding is the bottleneck, use most CPU cores of the node (0 = in the main process)")
    p.add_argument("--cache", metavar="DIR", help="packed uint8 cache of decoded patches (built on first use, reused "
                   "after; see patch_cache.py): later epochs and evaluations never decode a PNG. Put it on node-local "
                   "disk")
    p.add_argument("--resident-max-frac", type=float, default=resident.DEFAULT_MAX_FRAC, metavar="F", help="with "
                   "--cache: score from one uint8 tensor of the patches on the device when it takes at most F of its "
                   "free memory (CPU: available RAM), else stream them from the host cache by a thread (no DataLoader "
                   "either way); 0: always stream")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.add_argument("--no-amp", action="store_true", help="disable autocast on CUDA (bf16 where supported, as in "
                   "training; slower, scores then match a float32 run)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip undecodable PNGs (listed in the report) "
                   "instead of stopping with an error")
    return p


def check_args(args) -> None:
    for flag in ("bootstrap", "gradcam", "workers"):
        if getattr(args, flag) < 0:
            raise DataError(f"--{flag} {getattr(args, flag)}: must be >= 0")
    for flag in ("top_k", "batch_size"):
        if getattr(args, flag) < 1:
            raise DataError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if not 0 <= args.resident_max_frac <= 1:
        raise DataError(f"--resident-max-frac {args.resident_max_frac}: expected a share in [0, 1]")
    if args.compare and len(args.compare) < 2:
        raise DataError("--compare: give at least two checkpoints (the first is the baseline)")


# ----------------------------------------------------------------------------------------------- model and data
def scoring_options(args) -> dict:
    """The flags predict() needs, as its keyword arguments."""
    return {"batch_size": args.batch_size, "workers": args.workers, "skip_bad": args.skip_bad_images,
            "no_amp": args.no_amp, "cache": args.cache, "resident_max_frac": args.resident_max_frac}


def scoring_precision(ckpt: dict, device, no_amp: bool) -> model.Precision:
    """Score as training validated, since the stored threshold was chosen on those scores: the run's autocast
    (on CUDA only, unless --no-amp) and its memory layout, by model.precision's rule."""
    config = ckpt.get("config") or {}
    amp = device.type == "cuda" and config.get("amp", True) and not no_amp
    return model.precision(device, amp=amp, channels_last=config.get("channels_last", False))


def data_root_of(ckpt: dict, override: str | None, path) -> str:
    root = override or (ckpt.get("config") or {}).get("data_root")
    if not root:
        raise DataError(f"--checkpoint {path}: no data_root in its config; pass --data-root")
    return root


def split_parts(ckpt: dict, data: common.HelicoData, path) -> dict[str, list[str]]:
    """{"val": patients, "test": patients} of the checkpoint's split, checked against the data root. The test part
    is empty for a two-part split (or one written before splits had three parts): no untouched set."""
    split = ckpt["split"] if isinstance(ckpt["split"], dict) else {}
    parts = {part: sorted(split.get(part) or []) for part in ("val", "test")}
    if not parts["val"]:
        raise DataError(f"--checkpoint {path}: its split has no validation patients")
    if split.get("untouched_test") is False:
        parts["test"] = []
    missing = sorted(set(parts["val"] + parts["test"]) - set(data.cv_patients))
    if missing:
        raise DataError(f"data root {data.root} lacks patient(s) of the split of {path}: {', '.join(missing[:10])}"
                        f" (wrong --data-root, or an incomplete staged copy?)")
    return parts


def validation_patients(ckpt: dict, data: common.HelicoData, path) -> list[str]:
    return split_parts(ckpt, data, path)["val"]


@dataclass
class Predictions:
    """One row per scored patch (predictions.csv): the raw material of every metric, CI and re-aggregation."""
    samples: list
    split: np.ndarray         # val | test | holdout
    patch_eval: np.ndarray    # counted in patch-level metrics: a labelled window of a validation patient, once
    patient_eval: np.ndarray  # aggregated into its patient's score: a Cropped (or HoldOut) patch
    score: np.ndarray

    def subset(self, mask) -> "Predictions":
        return Predictions([s for s, k in zip(self.samples, mask) if k], self.split[mask], self.patch_eval[mask],
                           self.patient_eval[mask], self.score[mask])

    label = property(lambda self: np.array([s.label for s in self.samples], dtype=np.int64))
    patient = property(lambda self: np.array([s.patient for s in self.samples], dtype=object))
    source = property(lambda self: np.array([s.source for s in self.samples], dtype=object))


class Row(NamedTuple):
    """A patch to score and what it counts towards."""
    sample: common.Sample
    split: str            # val | test | holdout
    patch_eval: bool      # a labelled window of a val or test patient, once
    patient_eval: bool    # a Cropped (or HoldOut) patch, aggregated into its patient's score


def evaluation_rows(data: common.HelicoData, parts: dict[str, list[str]], holdout: list[str] = ()) -> list[Row]:
    """Each file once: a supplemental negative is both a labelled window and a Cropped patch of its patient.
    `parts`: split part -> patients, e.g. {"val": [...], "test": [...]}."""
    rows: dict[str, Row] = {}
    for part, patients in parts.items():
        for s in common.select(data.labelled, patients):
            rows[s.path] = Row(s, part, True, False)
        for s in common.select(data.cropped, patients):
            rows[s.path] = rows.get(s.path, Row(s, part, False, False))._replace(patient_eval=True)
    for s in common.select(data.holdout, holdout):
        rows[s.path] = Row(s, "holdout", False, True)
    return list(rows.values())


def count_identical_once(rows: list[Row], root, cache) -> tuple[list[Row], list[str]]:
    """Rows without repeats of byte-identical content: among the patch-level rows and, separately, among the
    patient-level rows, only the first file (by path) of each content counts (splits.first_copies, as train.py's
    validation), so a slide filed under two patient IDs (B22-200/B22-201) is not counted twice. Returns the rows
    kept and the paths no longer counted anywhere."""
    counts = {}
    for role in ("patch_eval", "patient_eval"):
        paths = [r.sample.path for r in rows if getattr(r, role)]
        counts[role] = {p for p, keep in zip(paths, splits.first_copies(root, paths, cache)) if keep}
    kept, dropped = [], []
    for r in rows:
        r = r._replace(patch_eval=r.sample.path in counts["patch_eval"],
                       patient_eval=r.sample.path in counts["patient_eval"])
        (kept if r.patch_eval or r.patient_eval else dropped).append(r)
    return kept, sorted(r.sample.path for r in dropped)


def cached_patches(cache, root, samples, image_size: int, normalizer, skip_bad: bool):
    """The samples read from the packed cache, and the normalizer still to apply to them: none when the cache holds
    patches already normalized to the checkpoint's own stain reference (refused when to another one)."""
    ds = patch_cache.CachedPatchDataset(cache, samples, image_size, root=root, skip_bad=skip_bad)
    if not ds.normalized:
        return ds, normalizer
    if not patch_cache.same_stain(ds.stain, normalizer.state_dict() if normalizer else None):
        raise DataError(f"--cache {cache}: holds patches Macenko-normalized to {ds.reference}, but the checkpoint was "
                        f"trained {'with another stain reference' if normalizer else 'without Macenko'}; give "
                        f"--cache a folder of plain patches")
    return ds, None


def score_samples(net, normalizer, root, samples, image_size: int, device, *, batch_size: int, workers: int,
                  skip_bad: bool = False, cache=None, run: model.Precision | None = None,
                  resident_max_frac: float = resident.DEFAULT_MAX_FRAC) -> tuple[np.ndarray, list[int]]:
    """Sigmoid scores (NaN for skipped undecodable files) and the indices skipped; batched, under `run`'s precision
    and layout (default float32, contiguous). With a cache, no DataLoader: resident.scoring_batches."""
    run = run or model.precision(device, amp=False)
    if cache is None:
        ds = common.PatchDataset(root, samples, image_size=image_size, skip_bad=skip_bad)
        loader = loaders.make_loader(ds, batch_size=batch_size, workers=workers, pin_memory=device.type == "cuda")
    else:  # on the device when it fits, else streamed by a thread: no worker pickles a batch
        ds, normalizer = cached_patches(cache, root, samples, image_size, normalizer, skip_bad)
        loader, _ = resident.scoring_batches(ds, batch_size, device, resident_max_frac)
    scores, bad = np.full(len(samples), np.nan), []
    net = run.place(net, device)
    interactive = sys.stderr.isatty()  # in a log file a cleared bar leaves its last state for the next line to land on
    bar = tqdm(loader, desc="scoring", unit="batch", mininterval=2 if interactive else 30, leave=not interactive)
    with torch.inference_mode(), contextlib.closing(bar):
        for images, labels, idx in bar:
            images, labels, idx, dropped = common.drop_bad(images, labels, idx)
            bad += dropped
            if len(idx) == 0:
                continue
            x = model.model_input(images.to(device, non_blocking=True), normalizer, channels_last=run.channels_last)
            with run.autocast():
                logits = net(x)
            scores[idx.cpu().numpy()] = torch.sigmoid(logits.float().reshape(-1)).cpu().numpy()
    return scores, bad


def predict(net, normalizer, ckpt, data, rows: list[Row], device, *, batch_size: int, workers: int, skip_bad: bool,
            no_amp: bool, cache=None, resident_max_frac: float = resident.DEFAULT_MAX_FRAC
            ) -> tuple[Predictions, list[str]]:
    """Scores of `rows` (from the packed cache in `cache` when given) and the paths of skipped undecodable files."""
    samples, size = [r.sample for r in rows], int(ckpt["image_size"])
    if cache:
        cache = patch_cache.prepare(cache, data, size, max(1, workers), device=device)
    scores, bad = score_samples(net, normalizer, data.root, samples, size, device, batch_size=batch_size,
                                workers=workers, skip_bad=skip_bad, cache=cache,
                                run=scoring_precision(ckpt, device, no_amp), resident_max_frac=resident_max_frac)
    keep = np.isfinite(scores)
    pred = Predictions([s for s, k in zip(samples, keep) if k], np.array([r.split for r in rows])[keep],
                       np.array([r.patch_eval for r in rows], dtype=bool)[keep],
                       np.array([r.patient_eval for r in rows], dtype=bool)[keep], scores[keep])
    skipped = [samples[i].path for i in sorted(bad)]
    for path in skipped:
        print(f"warning: skipped unreadable {path} (--skip-bad-images)", file=sys.stderr)
    return pred, skipped


# ----------------------------------------------------------------------------------------------- metrics
def patient_scores(pred: Predictions, patients: list[str], diagnosis: dict, patch_threshold: float, top_k: int):
    """One row per patient: both aggregate scores of its Cropped/HoldOut patches and its diagnosis label."""
    use = pred.patient_eval
    by_patient: dict[str, list[float]] = {}
    for p, s in zip(pred.patient[use], pred.score[use]):
        by_patient.setdefault(p, []).append(s)
    rows = []
    for p in patients:
        s = np.sort(np.asarray(by_patient.get(p, []), dtype=np.float64))
        dx = diagnosis.get(p)
        label = 1 if dx in INFECTED else 0 if dx == "NEGATIVA" else -1  # -1: not in PatientDiagnosis.csv
        rows.append({"patient": p, "diagnosis": dx or "", "label": label, "n_patches": int(s.size),
                     "fraction_positive": float(np.mean(s >= patch_threshold)) if s.size else float("nan"),
                     "topk_mean": float(s[-top_k:].mean()) if s.size else float("nan")})
    return rows


def choose_patient_rule(rows: list[dict]) -> dict:
    """Pick the aggregation rule and its threshold on validation patients: best Youden's J, then ROC-AUC."""
    usable = [r for r in rows if r["label"] >= 0 and r["n_patches"] > 0]
    y = np.array([r["label"] for r in usable], dtype=np.int64)
    if y.size == 0 or y.min() == y.max():
        return {"rule": None, "threshold": float("nan"), "candidates": {},
                "reason": f"validation patients with Cropped patches and a diagnosis are all one class ({y.size} "
                          f"patients, {int(y.sum())} infected): no patient rule can be tuned"}
    cands = {}
    for rule in RULES:
        s = np.array([r[rule] for r in usable])
        t, j = metrics.youden_threshold(y, s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cands[rule] = {"threshold": t, "youden_j": j, "roc_auc": metrics.roc_auc(y, s)}
    rule = max(RULES, key=lambda r: (cands[r]["youden_j"], cands[r]["roc_auc"], -RULES.index(r)))
    return {"rule": rule, "threshold": cands[rule]["threshold"], "candidates": cands, "reason": ""}


# ----------------------------------------------------------------------------------------------- intervals
def clusters(patients: list[str], groups) -> tuple[dict[str, int], int]:
    """Cluster number of each patient (a duplicate group is one cluster) and the number of clusters."""
    c = metrics.cluster_index(patients, groups)
    return dict(zip(patients, c.tolist())), int(c.max()) + 1 if len(c) else 0


def part_draws(patients: list[str], groups, resamples: int, seed: int, stream: int = 0):
    """Cluster resamples of one part, shared by all its metrics (and by every model under --compare: paired)."""
    n = clusters(patients, groups)[1]
    return metrics.cluster_draws(n, resamples, seed, stream) if resamples and n else None


def bootstrap_cis(point: dict, boot: dict[str, np.ndarray], keys, note: str) -> None:
    """Percentile CIs (and each one's share of undefined resamples) from `boot`, or `note` saying why there are none."""
    if boot:
        for k in keys:
            lo, hi, undefined = metrics.percentile_interval(boot[k])
            point.setdefault("ci95", {})[k] = [lo, hi]
            point.setdefault("ci_method", {})[k] = "patient-cluster bootstrap"
            point.setdefault("bootstrap_undefined_share", {})[k] = undefined
    elif note:
        point.setdefault("ci_note", {}).update({k: note for k in keys})


def no_ci_reason(ok: bool, why: str, draws) -> str:
    return why if not ok else "" if draws is not None else "no bootstrap (--bootstrap 0)"


def patch_level(pred: Predictions, patients: list[str], threshold: float, groups, draws) -> tuple[dict, dict]:
    """Patch metrics at the stored threshold, at 0.5 and by source, with cluster-bootstrap CIs where estimable; and
    their raw bootstrap values (for --compare)."""
    patch = pred.patch_eval
    y, s, who, src = pred.label[patch], pred.score[patch], pred.patient[patch], pred.source[patch]
    cluster_of = clusters(patients, groups)[0]
    everything = np.ones(len(y), bool)
    # (path in the metrics dict, which patches, threshold, metrics): ("by_source", "annotated") nests under by_source
    sets = [(("patch",), everything, threshold, PATCH_METRICS), (("patch_at_0.5",), everything, 0.5, THRESHOLD_METRICS),
            *((("by_source", k), src == k, threshold, PATCH_METRICS) for k in ("annotated", "supplemental"))]
    out, boot = {}, {}
    for name, mask, t, keys in sets:
        ym, sm = y[mask], s[mask]
        cm = np.array([cluster_of[p] for p in who[mask]], dtype=np.int64)
        ok, why = metrics.estimable(cm, ym)

        def resampled(idx, ym=ym, sm=sm, t=t, keys=keys):
            return {k: v for k, v in metrics.binary_metrics(ym[idx], sm[idx], t).items() if k in keys}
        b = metrics.cluster_bootstrap(cm, draws, resampled) if ok and draws is not None else {}
        boot.update({".".join((*name, k)): v for k, v in b.items()})
        *parents, leaf = name
        parent = out
        for p in parents:
            parent = parent.setdefault(p, {})
        parent[leaf] = metrics.patch_metrics(ym, sm, t)
        bootstrap_cis(parent[leaf], b, keys, no_ci_reason(ok, why, draws))
    return out, boot


def exact_cis(m: dict) -> None:
    """Clopper-Pearson intervals of the patient proportions, from their counts: never narrower than the data allow."""
    (tn, fp), (fn, tp) = m["confusion"]
    for k, (hits, n) in {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
                         "accuracy": (tp + tn, tn + fp + fn + tp)}.items():
        m.setdefault("ci95", {})[k] = list(metrics.clopper_pearson(hits, n))
        m.setdefault("ci_method", {})[k] = "exact binomial (Clopper-Pearson)"


def patient_level(pred: Predictions, patients: list[str], diagnosis: dict, patch_threshold: float, top_k: int,
                  groups, draws, rule: dict | None) -> tuple[dict, list[dict], dict]:
    """Patient scores, the rule (chosen here when `rule` is None), metrics with CIs (exact for the proportions, a
    cluster bootstrap for ROC-AUC where estimable), and raw bootstrap values (for --compare)."""
    rows = patient_scores(pred, patients, diagnosis, patch_threshold, top_k)
    rule = rule or choose_patient_rule(rows)
    for r in rows:
        r["score"] = r[rule["rule"]] if rule["rule"] else float("nan")
        r["prediction"] = int(r["score"] >= rule["threshold"]) if np.isfinite(r["score"]) else -1
    known = [r for r in rows if r["label"] >= 0 and r["n_patches"] > 0]
    y = np.array([r["label"] for r in known], dtype=np.int64)
    s = np.array([r["score"] for r in known], dtype=np.float64)
    m = metrics.patient_metrics(y, s, rule["threshold"])
    b = {}
    if not rule["rule"]:  # no rule, no predictions: every metric is undefined, for the reason the rule gives
        m.update({k: float("nan") for k in PATIENT_METRICS}, undefined={k: rule["reason"] for k in PATIENT_METRICS})
    else:
        exact_cis(m)
        cluster_of = clusters(patients, groups)[0]
        ck = np.array([cluster_of[r["patient"]] for r in known], dtype=np.int64)
        ok, why = metrics.estimable(ck, y)
        if ok and draws is not None:
            b = metrics.cluster_bootstrap(ck, draws, lambda idx: {k: v for k, v in metrics.patient_metrics(
                y[idx], s[idx], rule["threshold"]).items() if k in PATIENT_METRICS})
        bootstrap_cis(m, {k: v for k, v in b.items() if k == "roc_auc"}, ["roc_auc"], no_ci_reason(ok, why, draws))
    used = {r["patient"] for r in known}
    excluded = {r["patient"]: "no diagnosis" if r["label"] < 0 else "no patches (or only byte-identical copies of "
                "another patient's)" for r in rows if r["patient"] not in used}
    m = {**m, **{k: rule[k] for k in ("rule", "candidates", "reason")}, "top_k": top_k, "excluded": excluded}
    return m, rows, {f"patient.{k}": v for k, v in b.items()}


def analyse(pred: Predictions, patients: list[str], diagnosis: dict, patch_threshold: float, top_k: int,
            groups=(), draws=None, rule: dict | None = None) -> tuple[dict, list[dict], dict]:
    """Metrics dict, patient rows and raw bootstrap values ({"patch.pr_auc": array, ...}) of one set of patients.

    Validation (rule None): the patient rule is chosen here. Test and HoldOut: `rule` comes from validation."""
    out, boot = patch_level(pred, patients, patch_threshold, groups, draws) if pred.patch_eval.any() else ({}, {})
    out["patient"], rows, patient_boot = patient_level(pred, patients, diagnosis, patch_threshold, top_k, groups,
                                                       draws, rule)
    return out, rows, {**boot, **patient_boot}


def epochs_logged(run_dir: Path) -> list[dict]:
    """train.py's log.jsonl records (epoch, validation PR-AUC, ...): what the best epoch was chosen among."""
    return figures.epoch_records(run_dir / "log.jsonl")


# ----------------------------------------------------------------------------------------------- commands
def stain_picks(pred: Predictions, n: int = 3) -> list[tuple]:
    """(sample, caption) of validation patches for the stain strip: the n highest- and n lowest-scored positives
    (bacteria found, bacteria missed) and the 2n highest-scored negatives (hard negatives)."""
    idx = np.flatnonzero(pred.patch_eval)
    pos, neg = (idx[pred.label[idx] == c] for c in (1, 0))
    pos, neg = pos[np.argsort(-pred.score[pos], kind="stable")], neg[np.argsort(-pred.score[neg], kind="stable")]
    chosen = [(i, "positive") for i in dict.fromkeys([*pos[:n], *pos[::-1][:n]])] + [(i, "hard negative")
                                                                                     for i in neg[:2 * n]]
    return [(pred.samples[i], f"{kind}, score {pred.score[i]:.2f}: {pred.samples[i].path}") for i, kind in chosen]


def default_out(holdout: bool) -> str:
    """eval/ and eval-holdout/ side by side: a validation-only rerun never replaces the report with the HoldOut."""
    return "eval-holdout" if holdout else "eval"


def evaluate_checkpoint(args, device) -> tuple[dict, Path]:
    """Score and analyse one checkpoint, write its eval folder; returns (metrics dict, folder)."""
    path = Path(args.checkpoint)
    out = Path(args.out) if args.out else path.parent / default_out(args.holdout)
    eval_report.check_out_folder(out)
    ckpt = model.load_checkpoint(path)
    net, normalizer = model.from_checkpoint(ckpt, path, args.arch, device)
    data = common.load_data(data_root_of(ckpt, args.data_root, path))
    parts = split_parts(ckpt, data, path)
    hash_cache = splits.hash_cache_path(None, data.root)
    shared = splits.shared_content(data, cache=hash_cache, progress=False)
    groups = splits.duplicate_groups(shared)  # patients sharing byte-identical images: one resampling cluster
    holdout = data.holdout_patients if args.holdout else []
    if args.holdout:
        if not holdout:
            raise DataError(f"--holdout: {data.root} has no HoldOut patients (missing {common.TREES['holdout']}/ "
                            f"folder?)")
        splits.check_holdout_independent(data, shared)  # exit 1: a HoldOut that overlaps CV proves nothing
    rows, identical = count_identical_once(evaluation_rows(data, parts, holdout), data.root, hash_cache)
    if not any(r.patch_eval for r in rows):
        raise DataError(f"validation patients of {path} have no labelled patches in {data.root}: empty split")
    pred, bad = predict(net, normalizer, ckpt, data, rows, device, **scoring_options(args))
    threshold = float(ckpt["threshold"])
    by_part, patient_rows = {}, []
    for stream, part in enumerate(("val", "test", "holdout")):  # val first: it chooses the rule the others apply
        patients = holdout if part == "holdout" else parts[part]
        if not patients:
            continue
        draws = part_draws(patients, groups, args.bootstrap, args.seed, stream)
        by_part[part], rows_of_part, _ = analyse(pred.subset(pred.split == part), patients, data.diagnosis, threshold,
                                                 args.top_k, groups, draws,
                                                 rule=None if part == "val" else by_part["val"]["patient"])
        patient_rows += [{**r, "split": part} for r in rows_of_part]
    headline = "test" if parts["test"] else "val"
    result = dict(by_part[headline])
    if headline == "test":
        result["selection"] = by_part["val"]
    if holdout:
        result["holdout"] = {"patient": by_part["holdout"]["patient"], "patches": int((pred.split == "holdout").sum())}
    log = epochs_logged(path.parent)
    result["meta"] = {"checkpoint": str(path), "arch": ckpt["arch"], "image_size": int(ckpt["image_size"]),
                      "epoch": ckpt.get("epoch"), "data_root": str(data.root), "headline": headline,
                      "untouched_test": headline == "test", "stain": "macenko" if normalizer else None,
                      "patch_threshold": threshold, "threshold_rule": ckpt.get("threshold_rule"),
                      "selection": {"epochs": len(log), "pr_auc_by_epoch": [r.get("pr_auc") for r in log],
                                    "patient_rule": by_part["val"]["patient"]["rule"],
                                    "patient_threshold": by_part["val"]["patient"]["threshold"]},
                      "training_val_metrics": ckpt.get("val_metrics"), "val_patients": parts["val"],
                      "test_patients": parts["test"], "holdout_patients": holdout, "duplicate_groups": groups,
                      "identical_not_counted": identical, "skipped_images": bad, "device": str(device),
                      "cache": args.cache, "amp": scoring_precision(ckpt, device, args.no_amp).amp,
                      "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "unit": "patient cluster",
                                    "min_clusters": metrics.MIN_CLUSTERS}}
    shown = pred.subset(pred.split == headline)
    with eval_report.replaced_folder(out) as tmp:
        eval_report.write_predictions(tmp / "predictions.csv", pred, threshold)
        eval_report.write_patients(tmp / "patients.csv", patient_rows, result["patient"]["rule"])
        files = figures.write_figures(tmp, shown, result, patient_rows, part=headline)
        if (path.parent / "log.jsonl").is_file():
            files += figures.learning_curves_from_log(path.parent / "log.jsonl", tmp / "learning_curves.png")
        if args.gradcam:
            picks = gradcam.gradcam_picks(shown, threshold, args.gradcam)
            cams, result["meta"]["gradcam"] = gradcam.write_gradcam(tmp / "gradcam", net, normalizer, data.root, picks,
                                                                    int(ckpt["image_size"]), device)
            files += cams
        if normalizer is not None:  # the stain as the model saw it, for a pathologist to judge at a glance
            picks = stain_picks(pred.subset(pred.split == "val"))
            macenko_gpu.stain_preview(normalizer, [Path(data.root) / s.path for s, _ in picks],
                                      [caption for _, caption in picks], tmp / "stain_preview.png")
            files.append("stain_preview.png")
        if bad:
            common.atomic_write_text(tmp / "skipped_images.txt", "".join(f"{p}\n" for p in bad))
        eval_report.write_json(tmp / "metrics.json", result)
        common.atomic_write_text(tmp / "report.md", eval_report.render_report(result, files, patient_rows))
    return result, out


def run_evaluation(args, device) -> int:
    result, out = evaluate_checkpoint(args, device)
    print("\n".join(eval_report.summary_lines(result)))
    print(f"wrote {out}/report.md")
    return common.EXIT_OK


def run_cv(args, device) -> int:
    """Evaluate every fold run, then pool their out-of-fold test predictions (crossval.py)."""
    runs = [Path(r) for r in args.cv]
    if args.holdout:
        raise DataError("--holdout: not used with --cv (evaluate the fold runs' HoldOut one by one)")
    if len(runs) < 2 or len(set(runs)) != len(runs):
        raise DataError(f"--cv: give the run folders of two or more folds, each once (got {len(runs)})")
    out = Path(args.out) if args.out else crossval.default_out(runs)
    eval_report.check_out_folder(out)
    for run in runs:
        if not (run / "best.pt").is_file():
            raise DataError(f"--cv {run}: no best.pt (a train.py run folder of one fold?)")
    for run in runs:
        evaluate_checkpoint(argparse.Namespace(**{**vars(args), "checkpoint": str(run / "best.pt"), "out": None}),
                            device)
    folds = sorted((crossval.read_fold(r) for r in runs), key=lambda f: (f.split.get("fold") is None,
                                                                         f.split.get("fold")))
    data = common.load_data(folds[0].metrics["meta"]["data_root"])
    crossval.check_folds(folds, data.cv_patients)
    result, preds, pats = crossval.summarize(folds, args.bootstrap, args.seed)
    with eval_report.replaced_folder(out) as tmp:
        eval_report.write_json(tmp / "metrics.json", result)
        eval_report.write_csv(tmp / "predictions.csv", ["fold", *crossval.PREDICTION_COLUMNS],
                              ([r["fold"], *(r[c] for c in crossval.PREDICTION_COLUMNS)] for r in preds))
        eval_report.write_csv(tmp / "patients.csv", ["fold", *eval_report.PATIENT_COLUMNS, "rule"],
                              ([r["fold"], *(r[c] for c in [*eval_report.PATIENT_COLUMNS, "rule"])] for r in pats))
        common.atomic_write_text(tmp / "report.md", crossval.render(result))
    print(crossval.render(result))
    print(f"wrote {out}/report.md")
    return common.EXIT_OK


# Fewer shared validation patients than this and a bootstrap over patients has nothing to resample: one patient
# gives a zero-width interval that "excludes 0" for any difference. Refuse rather than print a verdict.
MIN_SHARED_PATIENTS = 5
HEADLINE = [("patch", k) for k in PATCH_METRICS] + [("patient", k) for k in PATIENT_METRICS]


def run_compare(args, device) -> int:
    if args.holdout:
        raise DataError("--holdout: not used with --compare (compare on the test or validation part, then evaluate "
                        "the winner)")
    paths = [Path(p) for p in args.compare]
    out = Path(args.out) if args.out else paths[0].parent / "compare"
    eval_report.check_out_folder(out)
    ckpts = [model.load_checkpoint(p) for p in paths]
    data = common.load_data(data_root_of(ckpts[0], args.data_root, paths[0]))
    parts = [split_parts(c, data, p) for c, p in zip(ckpts, paths)]
    part = "test" if all(ps["test"] for ps in parts) and set.intersection(*(set(ps["test"]) for ps in parts)) \
        else "val"
    sets = [ps[part] for ps in parts]
    shared = sorted(set.intersection(*map(set, sets)))
    if len(shared) < MIN_SHARED_PATIENTS:
        raise DataError(f"--compare: the checkpoints share {len(shared)} {part} patient(s) "
                        f"({', '.join(shared) or 'none'}); a paired comparison needs at least {MIN_SHARED_PATIENTS}: "
                        f"train the runs on one split (train.py --split runs/<id>/split.json)")
    hash_cache = splits.hash_cache_path(None, data.root)
    groups = splits.duplicate_groups(splits.shared_content(data, cache=hash_cache, progress=False))
    rows, _ = count_identical_once(evaluation_rows(data, {part: shared}), data.root, hash_cache)
    if not any(r.patch_eval for r in rows):
        raise DataError(f"--compare: the shared {part} patients have no labelled patches in {data.root}")
    draws = part_draws(shared, groups, args.bootstrap, args.seed)  # the same cluster resamples for every model: paired
    results = []
    for c, p in zip(ckpts, paths):
        net, normalizer = model.from_checkpoint(c, p, args.arch, device)
        pred, _ = predict(net, normalizer, c, data, rows, device, **scoring_options(args))
        result, _, boot = analyse(pred, shared, data.diagnosis, float(c["threshold"]), args.top_k, groups, draws)
        results.append({"checkpoint": str(p), "metrics": result, "boot": boot})
        del net
    table = compare_table(results)
    table.update({"patients": shared, "part": part, "same_validation_patients": all(set(v) == set(shared) for v in sets),
                  "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "unit": "patient cluster",
                                "paired": True}})
    with eval_report.replaced_folder(out) as tmp:
        eval_report.write_json(tmp / "compare.json", table)
        common.atomic_write_text(tmp / "compare.md", eval_report.render_compare(table))
    print(eval_report.render_compare(table))
    print(f"wrote {out}/compare.md")
    return common.EXIT_OK


def compare_table(results: list[dict]) -> dict:
    """Headline values of each model, and each model's delta against the first with its paired bootstrap CI (none
    where the metric's interval is not estimable: fewer than 10 clusters in a class)."""
    base = results[0]
    value = lambda r, level, k: r["metrics"].get(level, {}).get(k, float("nan"))
    models = [{"checkpoint": r["checkpoint"], **{f"{lv}.{k}": value(r, lv, k) for lv, k in HEADLINE},
               "patch.threshold": r["metrics"]["patch"]["threshold"], "patient.rule": r["metrics"]["patient"]["rule"]}
              for r in results]
    deltas = []
    for i, r in enumerate(results[1:], start=1):
        for lv, k in HEADLINE:
            name = f"{lv}.{k}"
            both = name in r["boot"] and name in base["boot"]
            lo, hi, _ = metrics.percentile_interval(r["boot"][name] - base["boot"][name]) if both else [float("nan")] * 3
            deltas.append({"model": i, "checkpoint": r["checkpoint"], "metric": name, "baseline": value(base, lv, k),
                           "value": value(r, lv, k), "delta": value(r, lv, k) - value(base, lv, k), "ci95": [lo, hi],
                           "within_noise": bool(lo <= 0 <= hi) if np.isfinite([lo, hi]).all() else None})
    return {"baseline": base["checkpoint"], "models": models, "deltas": deltas}


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        check_args(args)
        device = common.resolve_device(args.device)
        return run_compare(args, device) if args.compare else run_cv(args, device) if args.cv else \
            run_evaluation(args, device)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return common.EXIT_LEAK if isinstance(e, splits.IndependenceError) else common.EXIT_BAD_INPUT
    except common.EnvironmentFault as e:
        print(f"error: {e}", file=sys.stderr)
        return common.EXIT_ENVIRONMENT
    except OSError as e:  # the report folder is built in a temp folder beside --out: a full disk there
        if e.errno not in common.FAULTS:
            raise
        print(f"error: {Path(e.filename or '.').parent}: {common.FAULTS[e.errno]} while writing the report (the "
              f"previous one is kept); free space there, then run the same command again", file=sys.stderr)
        return common.EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        print("stopped by Ctrl-C: no report written (a previous one is kept); run the same command again",
              file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        loaders.stop_workers()  # they ignore SIGTERM/SIGINT: left to Python's exit they would keep it waiting


if __name__ == "__main__":
    sys.exit(main())
