"""Evaluate a trained H. pylori patch classifier so that the report cannot fool its reader.

    python evaluate.py --checkpoint runs/26/best.pt                       # -> runs/26/eval/
    python evaluate.py --checkpoint runs/26/best.pt --holdout             # -> runs/26/eval-holdout/: + HoldOut patients
    python evaluate.py --checkpoint runs/26/best.pt --data-root /scratch/$USER/HelicoDataSet --out /tmp/ev26
    python evaluate.py --compare runs/10/best.pt runs/14/best.pt          # deltas with paired patient-bootstrap CIs

Everything comes from the checkpoint (train.py writes it): architecture, weights, image size, the patient split,
the Macenko stain reference and the patch threshold chosen on validation. Only --data-root may override the
stored data root (the staged copy moves). Preprocessing is training's validation path (model.model_input:
Macenko -> ImageNet normalization) under the run's precision and layout (model.precision); score = sigmoid(logit).

What it measures, on the checkpoint's validation patients:
- patches (labelled windows, each once, Aug copies excluded), at the stored threshold and at 0.5, next to the
  all-negative dummy's accuracy; and by source: annotated (hard) vs supplemental (Cropped of NEGATIVA, easy);
- patients: ALL their Cropped patches are scored and aggregated (fraction of positive patches, and the mean of the
  top-k scores); the rule and its threshold are chosen on the validation patients (Youden's J), so validation
  patient numbers are optimistic. Annotated windows are NOT aggregated: pathologists picked them knowing the
  diagnosis (positive windows exist only for infected patients) and HoldOut patients have none, so using them
  would leak the label and make validation and HoldOut scores incomparable;
- --holdout: the same rule and threshold applied to the HoldOut patients, never re-tuned: the honest number;
- 95% CIs by patient-cluster bootstrap (patients resampled, not patches); NaN (with the reason) where a metric is
  undefined, e.g. recall on a set without positives.

Writes into runs/<id>/eval/ (eval-holdout/ with --holdout, so neither replaces the other; or --out), built in a
temp folder beside it and swapped in whole: report.md, metrics.json, predictions.csv, patients.csv, figures/*.png,
learning_curves.png (from the run's log.jsonl), gradcam/*.png + heatmaps.npz, skipped_images.txt (--skip-bad-images),
stain_preview.png (validation positives and hard negatives: original | as trained | canonical Macenko).
--compare writes compare.md and compare.json (default <first run>/compare/).
This file owns what is measured and how (patient rows, the patient rule, bootstrap CIs, --compare); metrics.py
defines the metrics, eval_report.py writes the files and markdown, figures.py the charts, gradcam.py the Grad-CAM.

--cache DIR reads patches from a packed cache (patch_cache.py) instead of PNGs (Grad-CAM still decodes its few). A
plain cache gets the checkpoint's Macenko applied (same pixels, same scores); one train.py --cache-normalized wrote
is used as it is, only if normalized to the checkpoint's own stain reference (refused otherwise, never rebuilt).

Exit codes: 0 ok; 2 bad input (missing/unreadable/foreign checkpoint, wrong --arch, data root lacking a patient
of the split, empty split, unreadable image without --skip-bad-images, --compare of runs sharing fewer than 5
validation patients); 5 no space left or an I/O error while writing the report (the previous one is kept); 130
Ctrl-C (nothing written).
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
import eval_report
import figures
import gradcam
import loaders
import macenko_gpu
import metrics
import model
import patch_cache
import resident
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
                      "by side, deltas against the first with paired patient-bootstrap CIs, on the validation "
                      "patients they share")
    p.add_argument("--data-root", help="HelicoDataSet folder; default: the one stored in the checkpoint. Point it at "
                   "the staged copy on a cluster node")
    p.add_argument("--out", help="output folder (default runs/<id>/eval/, or eval-holdout/ with --holdout). An "
                   "existing one is replaced whole, but only if it holds a previous metrics.json/compare.json")
    p.add_argument("--arch", help="refuse the checkpoint unless it is this architecture (a guard for scripts)")
    p.add_argument("--holdout", action="store_true", help="also apply the validation-chosen patient rule and "
                   "threshold to the HoldOut patients (the honest estimate; slow on the real data: ~89k patches)")
    p.add_argument("--bootstrap", type=int, default=1000, help="patient-cluster bootstrap resamples for the 95%% CIs; "
                   "0 skips them. 1000 is plenty for percentile intervals")
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


def validation_patients(ckpt: dict, data: common.HelicoData, path) -> list[str]:
    split = ckpt["split"] if isinstance(ckpt["split"], dict) else {}
    val = sorted(split.get("val") or [])
    if not val:
        raise DataError(f"--checkpoint {path}: its split has no validation patients")
    missing = sorted(set(val) - set(data.cv_patients))
    if missing:
        raise DataError(f"data root {data.root} lacks patient(s) of the split of {path}: {', '.join(missing[:10])}"
                        f" (wrong --data-root, or an incomplete staged copy?)")
    return val


@dataclass
class Predictions:
    """One row per scored patch (predictions.csv): the raw material of every metric, CI and re-aggregation."""
    samples: list
    split: np.ndarray         # val | holdout
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
    split: str            # val | holdout
    patch_eval: bool      # a labelled window of a validation patient, once
    patient_eval: bool    # a Cropped (or HoldOut) patch, aggregated into its patient's score


def evaluation_rows(data: common.HelicoData, val: list[str], holdout: list[str] = ()) -> list[Row]:
    """Each file once: a supplemental negative is both a labelled window and a Cropped patch of its patient."""
    rows: dict[str, Row] = {}
    for s in common.select(data.labelled, val):
        rows[s.path] = Row(s, "val", True, False)
    for s in common.select(data.cropped, val):
        rows[s.path] = rows.get(s.path, Row(s, "val", False, False))._replace(patient_eval=True)
    for s in common.select(data.holdout, holdout):
        rows[s.path] = Row(s, "holdout", False, True)
    return list(rows.values())


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


# ----------------------------------------------------------------------------------------------- bootstrap
def with_ci(point: dict, boot: dict[str, np.ndarray], keys) -> dict:
    if boot:
        point["ci95"] = {k: metrics.ci95(boot[k]) for k in keys}
        point["bootstrap_undefined"] = {k: int((~np.isfinite(boot[k])).sum()) for k in keys
                                        if (~np.isfinite(boot[k])).any()}
    return point


def patch_level(pred: Predictions, patients: list[str], threshold: float, draws: np.ndarray) -> tuple[dict, dict]:
    """Patch metrics at the stored threshold, at 0.5 and by source, with CIs; and their raw bootstrap values."""
    patch = pred.patch_eval
    y, s, who, src = pred.label[patch], pred.score[patch], pred.patient[patch], pred.source[patch]
    everything = np.ones(len(y), bool)
    # (path in the metrics dict, which patches, threshold, metrics): ("by_source", "annotated") nests under by_source
    sets = [(("patch",), everything, threshold, PATCH_METRICS), (("patch_at_0.5",), everything, 0.5, THRESHOLD_METRICS),
            *((("by_source", k), src == k, threshold, PATCH_METRICS) for k in ("annotated", "supplemental"))]
    out, boot = {}, {}
    for name, mask, t, keys in sets:
        ym, sm = y[mask], s[mask]

        def resampled(idx, ym=ym, sm=sm, t=t, keys=keys):
            return {k: v for k, v in metrics.binary_metrics(ym[idx], sm[idx], t).items() if k in keys}
        b = metrics.bootstrap_values(metrics.groups_of(who[mask], patients), draws, resampled) if len(draws) else {}
        boot.update({".".join((*name, k)): v for k, v in b.items()})
        *parents, leaf = name
        parent = out
        for p in parents:
            parent = parent.setdefault(p, {})
        parent[leaf] = with_ci(metrics.patch_metrics(ym, sm, t), b, keys)
    return out, boot


def patient_level(pred: Predictions, patients: list[str], diagnosis: dict, patch_threshold: float, top_k: int,
                  draws: np.ndarray, rule: dict | None) -> tuple[dict, list[dict], dict]:
    """Patient scores, the rule (chosen here when `rule` is None), metrics with CIs, and raw bootstrap values."""
    rows = patient_scores(pred, patients, diagnosis, patch_threshold, top_k)
    rule = rule or choose_patient_rule(rows)
    for r in rows:
        r["score"] = r[rule["rule"]] if rule["rule"] else float("nan")
        r["prediction"] = int(r["score"] >= rule["threshold"]) if np.isfinite(r["score"]) else -1
    known = [r for r in rows if r["label"] >= 0 and r["n_patches"] > 0]
    y = np.array([r["label"] for r in known], dtype=np.int64)
    s = np.array([r["score"] for r in known], dtype=np.float64)
    m = metrics.patient_metrics(y, s, rule["threshold"])
    if not rule["rule"]:  # no rule, no predictions: every metric is undefined, for the reason the rule gives
        m.update({k: float("nan") for k in PATIENT_METRICS}, undefined={k: rule["reason"] for k in PATIENT_METRICS})
    b = {}
    if len(draws) and rule["rule"]:
        slot = {r["patient"]: k for k, r in enumerate(known)}
        groups = [np.asarray([slot[p]] if p in slot else [], dtype=np.int64) for p in patients]
        b = metrics.bootstrap_values(groups, draws, lambda idx: {k: v for k, v in metrics.patient_metrics(
            y[idx], s[idx], rule["threshold"]).items() if k in PATIENT_METRICS})
    used = {r["patient"] for r in known}
    excluded = {r["patient"]: "no diagnosis" if r["label"] < 0 else "no patches"
                for r in rows if r["patient"] not in used}
    m = {**with_ci(m, b, PATIENT_METRICS), **{k: rule[k] for k in ("rule", "candidates", "reason")},
         "top_k": top_k, "excluded": excluded}
    return m, rows, {f"patient.{k}": v for k, v in b.items()}


def analyse(pred: Predictions, patients: list[str], diagnosis: dict, patch_threshold: float, top_k: int,
            draws: np.ndarray, rule: dict | None = None) -> tuple[dict, list[dict], dict]:
    """Metrics dict, patient rows and raw bootstrap values ({"patch.pr_auc": array, ...}) of one set of patients.

    Validation (rule None): the patient rule is chosen here. HoldOut: `rule` comes from validation, untouched."""
    out, boot = patch_level(pred, patients, patch_threshold, draws) if pred.patch_eval.any() else ({}, {})
    out["patient"], rows, patient_boot = patient_level(pred, patients, diagnosis, patch_threshold, top_k, draws, rule)
    return out, rows, {**boot, **patient_boot}


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


def run_evaluation(args, device) -> int:
    path = Path(args.checkpoint)
    out = Path(args.out) if args.out else path.parent / default_out(args.holdout)
    eval_report.check_out_folder(out)
    ckpt = model.load_checkpoint(path)
    net, normalizer = model.from_checkpoint(ckpt, path, args.arch, device)
    data = common.load_data(data_root_of(ckpt, args.data_root, path))
    val = validation_patients(ckpt, data, path)
    holdout = data.holdout_patients if args.holdout else []
    if args.holdout and not holdout:
        raise DataError(f"--holdout: {data.root} has no HoldOut patients (missing {common.TREES['holdout']}/ folder?)")
    rows = evaluation_rows(data, val, holdout)
    if not any(r.patch_eval for r in rows):
        raise DataError(f"validation patients of {path} have no labelled patches in {data.root}: empty split")
    pred, bad = predict(net, normalizer, ckpt, data, rows, device, **scoring_options(args))
    threshold = float(ckpt["threshold"])
    val_pred = pred.subset(pred.split == "val")
    result, patient_rows, _ = analyse(val_pred, val, data.diagnosis, threshold, args.top_k,
                                      metrics.patient_draws(len(val), args.bootstrap, args.seed))
    for r in patient_rows:
        r["split"] = "val"
    if holdout:  # the validation rule and thresholds, applied as they are: HoldOut never tunes anything
        draws = metrics.patient_draws(len(holdout), args.bootstrap, args.seed, stream=1)
        ho, ho_rows, _ = analyse(pred.subset(pred.split == "holdout"), holdout, data.diagnosis, threshold, args.top_k,
                                 draws, rule=result["patient"])
        result["holdout"] = {"patient": ho["patient"], "patches": int((pred.split == "holdout").sum())}
        patient_rows += [{**r, "split": "holdout"} for r in ho_rows]
    result["meta"] = {"checkpoint": str(path), "arch": ckpt["arch"], "image_size": int(ckpt["image_size"]),
                      "epoch": ckpt.get("epoch"), "data_root": str(data.root),
                      "stain": "macenko" if normalizer else None,
                      "patch_threshold": threshold, "threshold_rule": ckpt.get("threshold_rule"),
                      "training_val_metrics": ckpt.get("val_metrics"), "val_patients": val,
                      "holdout_patients": holdout, "skipped_images": bad, "device": str(device), "cache": args.cache,
                      "amp": scoring_precision(ckpt, device, args.no_amp).amp,
                      "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "unit": "patient"}}
    with eval_report.replaced_folder(out) as tmp:
        eval_report.write_predictions(tmp / "predictions.csv", pred, threshold)
        eval_report.write_patients(tmp / "patients.csv", patient_rows, result["patient"]["rule"])
        files = figures.write_figures(tmp, val_pred, result, patient_rows)
        if (path.parent / "log.jsonl").is_file():
            files += figures.learning_curves_from_log(path.parent / "log.jsonl", tmp / "learning_curves.png")
        if args.gradcam:
            picks = gradcam.gradcam_picks(val_pred, threshold, args.gradcam)
            files += gradcam.write_gradcam(tmp / "gradcam", net, normalizer, data.root, picks,
                                           int(ckpt["image_size"]), device)
        if normalizer is not None:  # the stain as the model saw it, for a pathologist to judge at a glance
            picks = stain_picks(val_pred)
            macenko_gpu.stain_preview(normalizer, [Path(data.root) / s.path for s, _ in picks],
                                      [caption for _, caption in picks], tmp / "stain_preview.png")
            files.append("stain_preview.png")
        if bad:
            common.atomic_write_text(tmp / "skipped_images.txt", "".join(f"{p}\n" for p in bad))
        eval_report.write_json(tmp / "metrics.json", result)
        common.atomic_write_text(tmp / "report.md", eval_report.render_report(result, files, patient_rows))
    print("\n".join(eval_report.summary_lines(result)))
    print(f"wrote {out}/report.md")
    return common.EXIT_OK


# Fewer shared validation patients than this and a bootstrap over patients has nothing to resample: one patient
# gives a zero-width interval that "excludes 0" for any difference. Refuse rather than print a verdict.
MIN_SHARED_PATIENTS = 5
HEADLINE = [("patch", k) for k in PATCH_METRICS] + [("patient", k) for k in PATIENT_METRICS]


def run_compare(args, device) -> int:
    if args.holdout:
        raise DataError("--holdout: not used with --compare (compare on validation, then evaluate the winner)")
    paths = [Path(p) for p in args.compare]
    out = Path(args.out) if args.out else paths[0].parent / "compare"
    eval_report.check_out_folder(out)
    ckpts = [model.load_checkpoint(p) for p in paths]
    data = common.load_data(data_root_of(ckpts[0], args.data_root, paths[0]))
    vals = [validation_patients(c, data, p) for c, p in zip(ckpts, paths)]
    shared = sorted(set.intersection(*map(set, vals)))
    if len(shared) < MIN_SHARED_PATIENTS:
        raise DataError(f"--compare: the checkpoints share {len(shared)} validation patient(s) "
                        f"({', '.join(shared) or 'none'}); a paired comparison needs at least {MIN_SHARED_PATIENTS}: "
                        f"train the runs on one split (train.py --split runs/<id>/split.json)")
    rows = evaluation_rows(data, shared)
    if not any(r.patch_eval for r in rows):
        raise DataError(f"--compare: the shared validation patients have no labelled patches in {data.root}")
    draws = metrics.patient_draws(len(shared), args.bootstrap, args.seed)  # the same resamples for every model: paired
    results = []
    for c, p in zip(ckpts, paths):
        net, normalizer = model.from_checkpoint(c, p, args.arch, device)
        pred, _ = predict(net, normalizer, c, data, rows, device, **scoring_options(args))
        result, _, boot = analyse(pred, shared, data.diagnosis, float(c["threshold"]), args.top_k, draws)
        results.append({"checkpoint": str(p), "metrics": result, "boot": boot})
        del net
    table = compare_table(results)
    table.update({"patients": shared, "same_validation_patients": all(set(v) == set(shared) for v in vals),
                  "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "unit": "patient", "paired": True}})
    with eval_report.replaced_folder(out) as tmp:
        eval_report.write_json(tmp / "compare.json", table)
        common.atomic_write_text(tmp / "compare.md", eval_report.render_compare(table))
    print(eval_report.render_compare(table))
    print(f"wrote {out}/compare.md")
    return common.EXIT_OK


def compare_table(results: list[dict]) -> dict:
    """Headline values of each model, and each model's delta against the first with its paired bootstrap CI."""
    base = results[0]
    value = lambda r, level, k: r["metrics"].get(level, {}).get(k, float("nan"))
    models = [{"checkpoint": r["checkpoint"], **{f"{lv}.{k}": value(r, lv, k) for lv, k in HEADLINE},
               "patch.threshold": r["metrics"]["patch"]["threshold"], "patient.rule": r["metrics"]["patient"]["rule"]}
              for r in results]
    deltas = []
    for i, r in enumerate(results[1:], start=1):
        for lv, k in HEADLINE:
            name = f"{lv}.{k}"
            diff = r["boot"].get(name, np.array([np.nan])) - base["boot"].get(name, np.array([np.nan]))
            lo, hi = metrics.ci95(diff) if r["boot"] else [float("nan")] * 2
            deltas.append({"model": i, "checkpoint": r["checkpoint"], "metric": name, "baseline": value(base, lv, k),
                           "value": value(r, lv, k), "delta": value(r, lv, k) - value(base, lv, k), "ci95": [lo, hi],
                           "within_noise": bool(lo <= 0 <= hi) if np.isfinite([lo, hi]).all() else None})
    return {"baseline": base["checkpoint"], "models": models, "deltas": deltas}


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        check_args(args)
        device = common.resolve_device(args.device)
        return run_compare(args, device) if args.compare else run_evaluation(args, device)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return common.EXIT_BAD_INPUT
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
