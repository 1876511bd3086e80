"""Evaluate a trained H. pylori patch classifier so that the report cannot fool its reader.

    python evaluate.py --checkpoint runs/26/best.pt                       # -> runs/26/eval/
    python evaluate.py --checkpoint runs/26/best.pt --holdout             # -> runs/26/eval-holdout/: + HoldOut patients
    python evaluate.py --checkpoint runs/26/best.pt --data-root /scratch/$USER/HelicoDataSet --out /tmp/ev26
    python evaluate.py --compare runs/10/best.pt runs/14/best.pt          # deltas with paired cluster-bootstrap CIs
    python evaluate.py --cv runs/27-f*                                    # pooled out-of-fold test predictions
    python evaluate.py --holdout --ensemble runs/27-f*                    # the CV's one HoldOut model: a majority vote

Everything comes from the checkpoint (train.py writes it): architecture, weights, image size, the patient split,
the Macenko stain reference and the patch threshold chosen on validation. Only --data-root may override the
stored data root (the staged copy moves). Preprocessing is training's validation path (model.model_input:
Macenko -> ImageNet normalization) under the run's precision and layout (model.precision); score = sigmoid(logit).

What it measures. The headline is the split's test part (nothing was chosen on it); the validation part, which
chose the epoch, the patch threshold and the patient rule, is reported as the selection set (optimistic). A
two-part split (no test part) is evaluated on val, and the report says first that there is no untouched set.
- patches: the annotated windows (pathologist-reviewed positives and hard negatives, each once, Aug copies excluded,
  byte-identical files once: what train.py's validation chose the epoch and threshold on), at the stored threshold
  and at 0.5, next to the all-negative dummy's accuracy; the Cropped patches of NEGATIVA patients (easy negatives) as
  each NEGATIVA patient's false-positive rate; calibration (Brier, ECE, reliability diagram);
- patients: ALL their Cropped patches are scored and aggregated (fraction of positive patches, and the mean of the
  top-k scores); the rule and its threshold were chosen on the validation patients (Youden's J) by train.py and
  stored in best.pt (decision.py; a checkpoint without one: chosen here on validation), applied unchanged to test
  and HoldOut; each patient's `call` (positive, negative, "no call: why") follows the stored decision. Annotated
  windows are NOT aggregated: pathologists picked them knowing the diagnosis (positive windows exist only for
  infected patients) and HoldOut patients have none, so using them would leak the label and make validation and
  HoldOut scores incomparable;
- the patient model (when train_patient.py wrote runs/<id>/patient/best.pt for this very checkpoint) beside the
  rule, on the same patients: its probability per patient, its threshold (stored by train_patient.py, chosen on
  validation by Youden's J, with which of rule and model gives the call) applied unchanged; exact McNemar and the
  paired bootstrap ROC-AUC difference against the rule; where its attention falls on the Annotated windows (which
  it never reads) and a gallery of the most attended patches;
- --holdout: the same rule and threshold applied to the HoldOut patients; refused (exit 1, naming them) when a
  HoldOut patient shares an ID or a byte-identical image with CrossValidation;
- 95% CIs (metrics.py): exact binomial (Clopper-Pearson) for patient sensitivity, specificity and accuracy; a
  patient-cluster bootstrap (patients sharing byte-identical images are one cluster) for patch metrics and patient
  ROC-AUC, "not estimable" with fewer than 10 clusters in a class; the share of resamples where a metric was
  undefined is printed beside it. NaN (with the reason) where a metric is undefined.

Writes into runs/<id>/eval/ (eval-holdout/ with --holdout, so neither replaces the other; or --out), built in a
temp folder beside it and swapped in whole: report.md, report.html (self-contained), metrics.json, predictions.csv,
patients.csv, figures/*.png, learning_curves.png (from the run's log.jsonl), gradcam/*.png + heatmaps.npz,
skipped_images.txt (--skip-bad-images), stain_preview.png (validation positives and hard negatives: original | as
trained | canonical Macenko).
--compare writes compare.md and compare.json (default <first run>/compare/), on the validation patients the
checkpoints share (--compare-on test: the test patients), each with its own validation-chosen threshold and rule; one
verdict, on patch PR-AUC. Every look at test or HoldOut labels (--checkpoint, --compare-on test, --cv) is appended to
runs/holdout_ledger.jsonl (ledger.py) when its numbers are written, never on a refusal, and the report states which
look it is and the other models' looks; the same checkpoint, number-changing flags and data again is recorded as a
repeat of that look, not a new one. --cv and --ensemble first check the runs are the folds of one cross-validation,
reuse each fold's eval/ written for its best.pt with the same flags and evaluate the others on the spot.
--cv then writes runs/27-cv/ (report.md, metrics.json, predictions.csv,
patients.csv: see crossval.py).
This file owns the commands and the scoring (checkpoint -> model, split parts, patches -> scores under training's
precision); analysis.py owns what is measured from the scores (which patches count, patient rule, intervals,
--compare's deltas), metrics.py the metrics and interval methods, eval_report.py the files and markdown, figures.py
the charts, gradcam.py the Grad-CAM, crossval.py the pooling of folds.

--cache DIR reads patches from a packed cache (patch_cache.py) instead of PNGs (Grad-CAM still decodes its few). A
plain cache gets the checkpoint's Macenko applied (same pixels, same scores); one train.py --cache-normalized wrote
is used as it is, only if normalized to the checkpoint's own stain reference (refused otherwise, never rebuilt).

Exit codes: 0 ok; 1 --holdout on a HoldOut that is not independent of CrossValidation (patients named); 2 bad
input (missing/unreadable/foreign checkpoint, a run folder instead of its best.pt, wrong --arch, data root lacking a
patient of the split, empty split, unreadable image without --skip-bad-images, --compare of runs sharing fewer than 5
patients, --cv folds that are not one cross-validation); 5 no space left or an I/O error while writing the report
(the previous one is kept); 130 Ctrl-C, 143 SIGTERM (SLURM's time limit; the launcher turns Ctrl-C into it): no
report written, the previous one kept, no temp folder left; a second signal stops at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import common
import macenko_gpu
from common import DataError
from helico import (
    analysis, bags, crossval, decision, eval_report, feeds, figures, gradcam, html_report, identity, inference, ledger, loaders, metrics, mil, model, packed_cache, runlog, splits,
)


# ----------------------------------------------------------------------------------------------- flags
ENSEMBLE_DECISIONS = ("vote", "calibrated-mean")


def stain_survey(run_dir) -> dict | None:
    """train.py's stain_survey.json beside the checkpoint (slides whose DAB hue lies far from the reference's), or
    None for runs without Macenko or from before it existed."""
    try:
        return json.loads((Path(run_dir) / "stain_survey.json").read_text())
    except (OSError, ValueError):
        return None


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=common.HelpFormatter, allow_abbrev=False)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="CKPT", help="a train.py checkpoint (best.pt: the epoch with the best "
                      "validation PR-AUC); the report goes to eval/ beside it (eval-holdout/ with --holdout)")
    what.add_argument("--compare", nargs="+", metavar="CKPT", help="two or more checkpoints: headline metrics side "
                      "by side, deltas against the first with paired patient-cluster bootstrap CIs, on the patients "
                      "of --compare-on they share, each model with its own validation-chosen threshold and rule; "
                      "one verdict, on the primary metric (patch PR-AUC)")
    what.add_argument("--ensemble", nargs="+", metavar="RUN", help="with --holdout: the fold runs of one "
                      "cross-validation (runs/27-f*; one not yet evaluated is evaluated first) as ONE HoldOut model: "
                      "the majority vote of the fold models, each calling at the decision stored with it (chosen on "
                      "its own validation part); beside each fold model alone. Writes <runs>/27-ensemble/")
    what.add_argument("--cv", nargs="+", metavar="RUN", help="the run folders of one cross-validation (runs/27-f*): "
                      "each not yet evaluated is evaluated (its eval/), then their out-of-fold test predictions "
                      "are pooled into "
                      "<runs>/27-cv/ (or --out), after checking the folds' test parts are disjoint and cover the "
                      "patients")
    p.add_argument("--ensemble-decision", choices=ENSEMBLE_DECISIONS, default="vote", help="how --ensemble calls a "
                   "patient: vote (default): the majority of the fold models, each at the thresholds chosen on its "
                   "own validation part, so each model decides on the scale its thresholds were chosen on; "
                   "calibrated-mean: the mean of the fold models' scores after calibrating each on its own "
                   "out-of-fold test patients (needs both classes in every fold's test part). The mean score ranks "
                   "(ROC-AUC) either way")
    p.add_argument("--compare-on", choices=("val", "test"), default="val", help="--compare's patients: val (choose "
                   "among models there) or test, which spends the untouched part on the choice: the ledger "
                   "(runs/holdout_ledger.jsonl) records it and every compared model's later report says so")
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
    p.add_argument("--top-k", type=int, default=10, help="k of the top-k mean written to patients.csv (mean of a "
                   "patient's k highest patch scores); not a rule candidate: it grows with the patient's patch count")
    p.add_argument("--top-share", type=float, default=analysis.TOP_SHARE, help="the top_share_mean rule: mean of a "
                   "patient's highest ceil(share x n) patch scores, the same statistic for 25 or 2,000 patches; a "
                   "checkpoint that stores its decision keeps the share its rule was chosen with")
    p.add_argument("--gradcam", type=int, default=8, help="patches per Grad-CAM grid (top false positives, false "
                   "negatives, true positives); 0 skips Grad-CAM")
    p.add_argument("--batch-size", type=int, default=256, help="inference batch; lower it if the GPU runs out "
                   "of memory")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader processes decoding "
                   "PNGs; decoding is the bottleneck, use most CPU cores of the node (0 = in the main process)")
    p.add_argument("--cache", metavar="DIR", help="packed uint8 cache of decoded patches (built on first use, reused "
                   "after; see patch_cache.py): later epochs and evaluations never decode a PNG. Put it on node-local "
                   "disk")
    p.add_argument("--cache-base", metavar="DIR", help="the cache train.py --cache-base DIR names for this "
                   "checkpoint (its image size, cache kind and stain reference), built if missing; if the disk fails "
                   "there, a warning and PNGs. --cache DIR wins; one checkpoint only (not --compare/--cv)")
    p.add_argument("--resident-max-frac", type=float, default=feeds.DEFAULT_MAX_FRAC, metavar="F", help="with "
                   "--cache: score from one uint8 tensor of the patches on the device when it takes at most F of its "
                   "free memory (CPU: available RAM), else stream them from the host cache by a thread (no DataLoader "
                   "either way); 0: always stream")
    common.add_device_flag(p)
    common.add_amp_flag(p, "the run's own (its autocast on CUDA, as training validated: the stored threshold was "
                        "chosen on those scores)", "--no-amp is slower and its scores match a float32 run")
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
    if not 0 < args.top_share <= 1:
        raise DataError(f"--top-share {args.top_share}: expected a share in (0, 1]")
    if args.cache_base and (args.compare or args.cv or args.ensemble):
        raise DataError("--cache-base: for one --checkpoint; give --compare, --cv and --ensemble a --cache DIR")
    if args.compare and len(args.compare) < 2:
        raise DataError("--compare: give at least two checkpoints (the first is the baseline)")


# ----------------------------------------------------------------------------------------------- model and data
def scoring_options(args, cache) -> dict:
    """The flags predict() needs, as its keyword arguments, with the cache prepared_cache() returned."""
    return {"batch_size": args.batch_size, "workers": args.workers, "skip_bad": args.skip_bad_images,
            "amp": args.amp, "cache": cache, "resident_max_frac": args.resident_max_frac}


def checkpoint_file(given: str, flag: str) -> Path:
    """The checkpoint a user named (common.checkpoint_path: a run folder is refused naming the checkpoints inside
    it), before its parent is taken for where eval/ goes."""
    return common.checkpoint_path(given, flag)


def data_root_of(ckpt: dict, override: str | None, path, flag: str = "--checkpoint") -> str:
    root = override or (ckpt.get("config") or {}).get("data_root")
    if not root:
        raise DataError(f"{flag} {path}: no data_root in its config; pass --data-root")
    return root


def split_parts(ckpt: dict, data: common.HelicoData, path, flag: str = "--checkpoint") -> dict[str, list[str]]:
    """{"val": patients, "test": patients} of the checkpoint's split, checked against the data root. The test part
    is empty for a two-part split (or one written before splits had three parts): no untouched set."""
    split = ckpt["split"] if isinstance(ckpt["split"], dict) else {}
    parts = {part: sorted(split.get(part) or []) for part in ("val", "test")}
    if not parts["val"]:
        raise DataError(f"{flag} {path}: its split has no validation patients")
    if split.get("untouched_test") is False:
        parts["test"] = []
    missing = sorted(set(parts["val"] + parts["test"]) - set(data.cv_patients))
    if missing:
        raise DataError(f"data root {data.root} lacks patient(s) of the split of {path}: {', '.join(missing[:10])}"
                        f" (wrong --data-root, or an incomplete staged copy?)")
    return parts


def score_samples(net, normalizer, root, samples, image_size: int, device, *, batch_size: int, workers: int,
                  skip_bad: bool = False, cache=None, precision: model.Precision | None = None,
                  resident_max_frac: float = feeds.DEFAULT_MAX_FRAC, stats=None) -> tuple[np.ndarray, list[int]]:
    """Sigmoid scores (NaN for skipped undecodable files) and the indices skipped (inference.run's batches)."""
    scores = np.full(len(samples), np.nan)

    def keep(idx, logits, dropped):
        if logits is not None:
            scores[idx] = torch.sigmoid(logits.reshape(-1)).numpy()
    bad = inference.run(net, normalizer, root, samples, image_size, device, keep, batch_size=batch_size,
                        workers=workers, skip_bad=skip_bad, cache=cache, precision=precision,
                        resident_max_frac=resident_max_frac, stats=stats)
    return scores, bad


def prepared_cache(args, ckpt, data, device) -> str | None:
    """The packed cache this checkpoint's patches are scored from (packed_cache.for_checkpoint), built or checked
    once; None without --cache or --cache-base."""
    return packed_cache.for_checkpoint(ckpt, data, device, max(1, args.workers), args.cache, args.cache_base)


def predict(net, normalizer, ckpt, data, rows: list[analysis.Row], device, *, batch_size: int, workers: int,
            skip_bad: bool, amp: bool | None, cache=None, resident_max_frac: float = feeds.DEFAULT_MAX_FRAC
            ) -> tuple[analysis.Predictions, list[str]]:
    """Scores of `rows` (from the packed cache `cache`, prepared_cache()'s, when given) and the paths of skipped
    undecodable files."""
    samples, size = [r.sample for r in rows], int(ckpt["image_size"])
    scores, bad = score_samples(net, normalizer, data.root, samples, size, device, batch_size=batch_size,
                                workers=workers, skip_bad=skip_bad, cache=cache,
                                precision=model.scoring_precision(ckpt, device, amp),
                                resident_max_frac=resident_max_frac, stats=data.file_stats)
    keep = np.isfinite(scores)
    pred = analysis.Predictions([s for s, k in zip(samples, keep) if k], np.array([r.split for r in rows])[keep],
                                np.array([r.patch_eval for r in rows], dtype=bool)[keep],
                                np.array([r.patient_eval for r in rows], dtype=bool)[keep], scores[keep])
    skipped = [samples[i].path for i in sorted(bad)]
    for path in skipped:
        print(f"warning: skipped unreadable {path} (--skip-bad-images)", file=sys.stderr)
    return pred, skipped


def read_features_json(path: Path) -> dict | None:
    """train_patient.py's features.json beside the patient model (None when absent or unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def patient_model(args, path: Path, sha: str, ckpt: dict, net, normalizer, data, patients: list[str], device, cache):
    """The patient model train_patient.py wrote beside this checkpoint (patient/best.pt), run on every patient of
    `patients`: {"probability": {patient: p}, "attention": {patient: [(path, weight)] most attended first},
    "annotated": {patient: (raw attention scores, Presence labels) of its Annotated windows}, "meta": {...}}; None
    without one, or with a note when it belongs to another checkpoint. Bags missing (e.g. a --data-root whose
    HoldOut was not extracted) are extracted here, with the same key."""
    mil_path = bags.patient_dir(path) / "best.pt"
    if not mil_path.is_file():
        return None, ""
    mil_ckpt = mil.load_checkpoint(mil_path)
    if mil_ckpt["patch_checkpoint"]["sha256"] != sha:
        return None, (f"{mil_path} was trained on the features of another checkpoint "
                      f"({mil_ckpt['patch_checkpoint']['path']}), not {path}: not shown")
    done = bags.ensure(path, sha, ckpt, net, normalizer, mil_ckpt["features"]["source"], data, patients, device,
                       batch_size=args.batch_size, workers=args.workers, skip_bad=args.skip_bad_images, cache=cache,
                       amp=args.amp, resident_max_frac=args.resident_max_frac,
                       expected_key=mil_ckpt["bag_key"], encoder_weights=mil_ckpt["features"].get("encoder_weights"))
    if done is None:  # the hash matched, so only another feature code could make other bags
        return None, f"{mil_path}: its bags were made differently from this checkpoint's (bag key): not shown"
    key, folder = done["key"], done["folder"]
    net_mil = mil.from_checkpoint(mil_ckpt)
    out = {"probability": {}, "attention": {}, "annotated": {}, "decision": mil_ckpt.get("decision"),
           "meta": {"checkpoint": str(mil_path), "sha256": common.file_sha256(mil_path), "epoch": mil_ckpt["epoch"],
                    "features": mil_ckpt["features"],
                    "selection": mil_ckpt["config"].get("selection"), "seed": mil_ckpt["config"].get("seed"),
                    "features_json": read_features_json(mil_path.parent / "features.json")}}
    for p in patients:
        bag = bags.load(folder, p, key)
        rows, windows = bag.rows(), bag.rows(("annotated",))
        prob, attn, extra = mil.predict(net_mil, bag.bag(), bag.features[torch.from_numpy(windows)])
        weights = np.exp(attn - attn.max()) if attn.size else attn  # softmax over the bag: each patch's share
        weights = weights / weights.sum() if attn.size else weights
        order = np.argsort(-weights, kind="stable")
        paths = [q for q, keep in zip(bag.paths, rows) if keep]
        out["probability"][p] = prob
        out["attention"][p] = [(paths[i], float(weights[i])) for i in order]
        if extra is not None:
            out["annotated"][p] = (extra, [lab for lab, keep in zip(bag.labels, windows) if keep])
    return out, ""


# ----------------------------------------------------------------------------------------------- commands
def stain_picks(pred: analysis.Predictions, n: int = 3) -> list[tuple]:
    """(sample, caption) of validation patches for the stain strip: the n highest- and n lowest-scored positives
    (bacteria found, bacteria missed) and the 2n highest-scored negatives (hard negatives)."""
    idx = np.flatnonzero(pred.patch_eval)
    pos, neg = (idx[pred.label[idx] == c] for c in (1, 0))
    pos, neg = pos[np.argsort(-pred.score[pos], kind="stable")], neg[np.argsort(-pred.score[neg], kind="stable")]
    kind = lambda i: "hard negative" if pred.samples[i].source == "annotated" else "easy negative (Cropped, NEGATIVA)"
    chosen = [(i, "positive") for i in dict.fromkeys([*pos[:n], *pos[::-1][:n]])] + [(i, kind(i)) for i in neg[:2 * n]]
    return [(pred.samples[i], f"{kind}, score {pred.score[i]:.2f}: {pred.samples[i].path}") for i, kind in chosen]


def default_out(holdout: bool) -> str:
    """eval/ and eval-holdout/ side by side: a validation-only rerun never replaces the report with the HoldOut."""
    return "eval-holdout" if holdout else "eval"


def evaluate_checkpoint(args, device, flag: str = "--checkpoint") -> tuple[dict, Path]:
    """Score and analyze one checkpoint, write its eval folder; returns (metrics dict, folder). `flag`: the one the
    user typed (--cv and --ensemble evaluate their folds here), named in its messages."""
    path = checkpoint_file(args.checkpoint, flag)
    out = Path(args.out) if args.out else path.parent / default_out(args.holdout)
    eval_report.check_out_folder(out)
    ckpt = common.load_checkpoint(path)
    net, normalizer = model.from_checkpoint(ckpt, path, args.arch, device)
    data = common.load_data(data_root_of(ckpt, args.data_root, path, flag))
    parts = split_parts(ckpt, data, path, flag)
    known = identity.Known(data)
    groups = known.groups  # patients sharing byte-identical images: one resampling cluster
    holdout = data.holdout_patients if args.holdout else []
    if args.holdout:
        if not holdout:
            raise DataError(f"--holdout: {data.root} has no HoldOut patients (missing {common.TREES['holdout']}/ "
                            f"folder?)")
        splits.check_holdout_independent(data, known.shared)  # exit 1: a HoldOut that overlaps CV proves nothing
    rows, identical = analysis.count_identical_once(analysis.evaluation_rows(data, parts, holdout), known.identical)
    if not any(r.patch_eval for r in rows):
        raise DataError(f"validation patients of {path} have no labelled patches in {data.root}: empty split")
    cache = prepared_cache(args, ckpt, data, device)
    pred, bad = predict(net, normalizer, ckpt, data, rows, device, **scoring_options(args, cache))
    threshold = float(ckpt["threshold"])
    headline = "test" if parts["test"] else "val"
    sha = common.file_sha256(path)
    patient_model_out, mil_note = patient_model(args, path, sha, ckpt, net, normalizer, data,
                                                parts["val"] + parts["test"] + holdout, device, cache)
    stored = decision.load(ckpt, patient_model_out and {"decision": patient_model_out["decision"]})
    top_share = stored.top_share if stored.stored else args.top_share
    by_part, patient_rows = {}, []
    for stream, part in enumerate(("val", "test", "holdout")):  # the stored choice; else val chooses (old checkpoint)
        patients = holdout if part == "holdout" else parts[part]
        if not patients:
            continue
        draws = analysis.part_draws(patients, groups, args.bootstrap, args.seed, stream)
        chosen = {"rule": stored.rule if stored.stored else by_part["val"]["patient"] if part != "val" else None,
                  "mil_rule": stored.model or (by_part["val"].get("patient_mil") if part != "val" else None)}
        by_part[part], rows_of_part, _ = analysis.measure_part(
            pred.subset(pred.split == part), patients, data.diagnosis, threshold, args.top_k, groups, draws,
            mil_probability=patient_model_out and patient_model_out["probability"], top_share=top_share, **chosen)
        patient_rows += [{**r, "split": part} for r in rows_of_part]
    if not stored.stored:  # a checkpoint written before decisions were stored: validation's choice, said so
        stored = decision.load(ckpt, patient_model_out and {"decision": patient_model_out["decision"]},
                               fallback_rule=by_part["val"]["patient"])
    if stored.model is None and "patient_mil" in by_part["val"]:
        stored.model, stored.reason = by_part["val"]["patient_mil"], "the patient model stores no threshold: the " \
            "rule calls; the model's threshold is chosen on validation at evaluation"
    for r in patient_rows:  # a patient left with no patch here has none, or only copies counted for another
        r.update(decision.call(stored, r["n_patches"], r["score"], r.get("mil_probability"), note="" if r["n_patches"]
                               else "no patches of its own (none, or byte-identical copies of another patient's)"
                               ).as_row())
    if patient_model_out:  # where the model looks, on windows it never read: the headline part's Annotated ones
        shown = [p for p in parts[headline] if p in patient_model_out["annotated"]]
        looked = [patient_model_out["annotated"][p] for p in shown]
        by_part[headline]["patient_mil"]["attention"] = analysis.attention_evidence(
            np.concatenate([s for s, _ in looked]) if looked else [], [y for _, ys in looked for y in ys],
            [p for p, (_, ys) in zip(shown, looked) for _ in ys])
    result = dict(by_part[headline])
    if headline == "test":
        result["selection"] = by_part["val"]
    if holdout:
        result["holdout"] = {k: by_part["holdout"][k] for k in ("patient", "patient_mil", "patient_vs_mil")
                             if k in by_part["holdout"]}
        result["holdout"]["patches"] = int((pred.split == "holdout").sum())
    log = runlog.read(path.parent)  # what the best epoch was chosen among
    result["meta"] = {"checkpoint": str(path), "arch": ckpt["arch"], "image_size": int(ckpt["image_size"]),
                      "epoch": ckpt.get("epoch"), "data_root": str(data.root), "headline": headline,
                      "untouched_test": headline == "test",
                      "stain": f"macenko ({ckpt['stain'].get('mode', 'macenko')} mode)" if normalizer else None,
                      "stain_survey": stain_survey(path.parent),
                      "patch_threshold": threshold, "threshold_rule": ckpt.get("threshold_rule"),
                      "decision": stored.summary(),
                      "selection": {"epochs": len(log), "pr_auc_by_epoch": [r.get("pr_auc") for r in log],
                                    "patient_rule": by_part["val"]["patient"]["rule"],
                                    "patient_threshold": by_part["val"]["patient"]["threshold"]},
                      "training_val_metrics": ckpt.get("val_metrics"), "val_patients": parts["val"],
                      "test_patients": parts["test"], "holdout_patients": holdout, "duplicate_groups": groups,
                      "identical_not_counted": identical, "skipped_images": bad, "device": str(device),
                      "cache": cache, "amp": model.scoring_precision(ckpt, device, args.amp).amp,
                      "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "unit": "patient cluster",
                                    "min_clusters": metrics.MIN_CLUSTERS},
                      "patient_model": patient_model_out["meta"] if patient_model_out else None,
                      "patient_model_note": mil_note or (None if patient_model_out else
                                                         f"no {bags.patient_dir(path) / 'best.pt'}: run "
                                                         f"train_patient.py --checkpoint {path} for the patient model")}
    flags = number_flags(args, device)
    result["meta"].update(sha256=sha, evaluation=flags)
    looked = ["test"] * (headline == "test") + ["holdout"] * bool(holdout)
    where = ledger.path_for(path)
    keys = {part: ledger.key(kind="evaluate", sha256=sha, part=part, flags=flags,
                             patient_model=patient_model_out and patient_model_out["meta"]["sha256"],
                             data=ledger.data_digest(((r.sample.path, r.sample.label, r.sample.patient)
                                                      for r in rows if r.split in ("val", part)), data.diagnosis))
            for part in looked}
    if looked:
        result["meta"]["looks"] = disclosed_looks(where, [sha], looked, keys)
    shown = pred.subset(pred.split == headline)
    with eval_report.replaced_folder(out) as tmp:
        eval_report.write_predictions(tmp / "predictions.csv", pred, threshold)
        eval_report.write_patients(tmp / "patients.csv", patient_rows, result["patient"]["rule"])
        files = figures.write_figures(tmp, shown, result, patient_rows, part=headline)
        if log:
            figures.plot_learning_curves(log, tmp / "learning_curves.png", chosen=ckpt.get("epoch"))
            files.append("learning_curves.png")
        if patient_model_out:
            figures.attention_gallery(tmp / "attention_gallery.png", data.root, [
                (r["patient"], r["diagnosis"], r["mil_probability"], patient_model_out["attention"][r["patient"]])
                for r in patient_rows if r["split"] == headline], int(ckpt["image_size"]))
            files.append("attention_gallery.png")
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
        common.atomic_write_text(tmp / "report.html", html_report.evaluation_page(result, patient_rows, tmp, files))
        if looked:  # the last step before the report is swapped in: a look is recorded when its numbers are shown
            record_look(where, result["meta"]["looks"], keys, {
                "kind": "evaluate", "checkpoint": str(path), "sha256": sha, "parts": looked, "flags": flags,
                "headline": {p: v for p, v in headline_numbers(result).items() if p in looked}})
    return result, out


def headline_numbers(result: dict) -> dict:
    """What a ledger line keeps of a look: the headline patch and patient numbers of each part looked at."""
    pick = lambda m, keys: {k: m[k] for k in keys if k in m}
    out = {"test": {**{f"patch.{k}": v for k, v in pick(result.get("patch", {}), ("pr_auc", "roc_auc")).items()},
                    **{f"patient.{k}": v for k, v in pick(result.get("patient", {}), analysis.PATIENT_METRICS).items()},
                    **{f"patient_mil.{k}": v for k, v in pick(result.get("patient_mil", {}),
                                                              analysis.PATIENT_METRICS).items()}}}
    if "holdout" in result:
        h = result["holdout"]
        out["holdout"] = {**{f"patient.{k}": v for k, v in pick(h["patient"], analysis.PATIENT_METRICS).items()},
                          **{f"patient_mil.{k}": v for k, v in pick(h.get("patient_mil", {}),
                                                                    analysis.PATIENT_METRICS).items()}}
    return out


# The flags that change a number evaluate.py shows (with the device type, which changes scores under AMP): the same
# checkpoint, these and the same data again are a repeat of a look, not a new one.
NUMBER_FLAGS = ("top_k", "top_share", "bootstrap", "seed", "amp", "skip_bad_images")


def number_flags(args, device) -> dict:
    return {**{k: getattr(args, k) for k in NUMBER_FLAGS}, "device": getattr(device, "type", str(device))}


def disclosed_looks(where: Path, shas: list[str], parts: list[str], keys: dict) -> dict:
    """What the report says about the looks before this one (ledger.looks), read before anything is shown."""
    return {**ledger.looks(ledger.read(where), shas, parts, keys), "ledger": str(where)}


def record_look(where: Path, seen: dict, keys: dict, entry: dict) -> None:
    """Append this look to the runs folder's ledger, a repeat where disclosed_looks() found the same evaluation."""
    ledger.append(where, {**entry, "keys": keys, **ledger.repeats(seen)})


def run_evaluation(args, device) -> int:
    result, out = evaluate_checkpoint(args, device)
    print("\n".join(eval_report.summary_lines(result)))
    print(f"wrote {out}/report.md")
    return common.EXIT_OK


def check_fold_runs(runs: list[Path], flag: str) -> None:
    if len(runs) < 2 or len(set(runs)) != len(runs):
        raise DataError(f"{flag}: give the run folders of two or more folds, each once (got {len(runs)})")


def fold_data(runs: list[Path], args, flag: str):
    """The data the folds were trained on (or --data-root), after checking, before anything is scored, that the runs
    are the folds of one cross-validation (crossval.check_runs): a refusal shows no number and records no look."""
    for run in runs:
        if not (run / "best.pt").is_file():
            raise DataError(f"{flag} {run}: no best.pt (give the train.py run folders of the folds, runs/27-f*)")
    first = runs[0] / "best.pt"
    data = common.load_data(data_root_of(common.load_checkpoint(first), args.data_root, first, flag))
    crossval.check_runs(runs, data.cv_patients, flag)
    return data


def evaluated_folds(runs: list[Path], args, device, flag: str) -> list[crossval.Fold]:
    """Each fold run with its evaluation of its test part: eval/ (or eval-holdout/) reused when written for this very
    best.pt with the same number-changing flags, else evaluated here (its own look, or a repeat of it)."""
    folds = []
    for run in runs:
        flags = number_flags(args, device)
        folder = crossval.current_eval(run, common.file_sha256(run / "best.pt"), flags)
        if folder is None:
            print(f"{flag} {run}: no eval/ of this best.pt with these flags; evaluating it now (python evaluate.py "
                  f"--checkpoint {run / 'best.pt'})", file=sys.stderr)
            evaluate_checkpoint(argparse.Namespace(**{**vars(args), "checkpoint": str(run / "best.pt"), "out": None,
                                                      "holdout": False}), device, flag)
            folder = run / "eval"
        folds.append(crossval.read_fold(run, folder, flag))
    return sorted(folds, key=lambda f: f.split["fold"])


def run_cv(args, device) -> int:
    """Evaluate every fold run not yet evaluated, then pool their out-of-fold test predictions (crossval.py)."""
    runs = [Path(r) for r in args.cv]
    if args.holdout:
        raise DataError("--holdout: not used with --cv; the cross-validation's HoldOut model is evaluate.py --holdout "
                        "--ensemble RUN...")
    check_fold_runs(runs, "--cv")
    out = Path(args.out) if args.out else crossval.default_out(runs)
    eval_report.check_out_folder(out)
    data = fold_data(runs, args, "--cv")
    folds = evaluated_folds(runs, args, device, "--cv")
    crossval.check_folds(folds, data.cv_patients, "--cv")
    result, preds, pats = crossval.summarize(folds, args.bootstrap, args.seed)
    shas = [f.metrics["meta"]["sha256"] for f in folds]
    where = ledger.path_for(folds[0].run / "best.pt")
    keys = {"test": ledger.key(kind="cv", sha256s=sorted(shas), flags={"bootstrap": args.bootstrap, "seed": args.seed},
                               data=ledger.key(predictions=preds, patients=pats))}
    result["looks"] = disclosed_looks(where, shas, ["test"], keys)
    text = crossval.render(result)
    with eval_report.replaced_folder(out) as tmp:
        eval_report.write_json(tmp / "metrics.json", result)
        eval_report.write_csv(tmp / "predictions.csv", ["fold", *eval_report.PREDICTION_COLUMNS],
                              ([r["fold"], *(r[c] for c in eval_report.PREDICTION_COLUMNS)] for r in preds))
        eval_report.write_csv(tmp / "patients.csv", ["fold", *eval_report.PATIENT_COLUMNS, "rule"],
                              ([r["fold"], *(r.get(c, "") for c in [*eval_report.PATIENT_COLUMNS, "rule"])]
                               for r in pats))
        common.atomic_write_text(tmp / "report.md", text)
        record_look(where, result["looks"], keys, {
            "kind": "cv", "checkpoints": [str(f.run / "best.pt") for f in folds], "sha256s": shas, "parts": ["test"],
            "headline": {"test": {k: result["patient"][k] for k in crossval.PATIENT_KEYS}}})
    print(text)
    for run in result["patient_model_missing"]:
        print(f"warning: {run}: no patient model (train_patient.py --checkpoint {run}/best.pt): the patient model "
              f"is pooled from no fold", file=sys.stderr)
    print(f"wrote {out}/report.md")
    return common.EXIT_OK


ENSEMBLE_COLUMNS = ["patient", "split", "diagnosis", "label", "n_patches", "rule_score", "rule_call", "mil_probability",
                    "mil_call", "call", "agree", "votes", "prediction", "mil_prediction", "calibrated_mean"]


def fold_decision(fold, ckpt: dict, mil_out) -> decision.Decision:
    """A fold model's stored decision; for a fold checkpoint written before decisions were stored, the rule and the
    model threshold its own evaluation chose on its validation part (eval/metrics.json's selection)."""
    own = fold.metrics.get("selection") or {}
    d = decision.load(ckpt, mil_out and {"decision": mil_out["decision"]}, fallback_rule=own.get("patient"))
    if d.model is None and mil_out and own.get("patient_mil"):
        d.model = own["patient_mil"]
    return d


def calibrations(fold, d: decision.Decision) -> tuple[float, float] | None:
    """Platt scaling of the score that gives this fold's call, fitted on its own out-of-fold (test part) patients:
    what makes the fold models' scores comparable before they are averaged. None when the test part is one class."""
    key = "mil_probability" if d.call_by == "patient_model" else "score"
    rows = [r for r in fold.patients if r["split"] == "test" and r["label"] in ("0", "1") and r.get(key)
            and np.isfinite(float(r[key]))]  # a patient without patches has no score
    y = [int(r["label"]) for r in rows]
    return decision.platt([float(r[key]) for r in rows], y) if 0 < sum(y) < len(y) else None


def vote_metrics(rows: list[dict], call_key: str, rank_key: str, patients, groups, draws) -> dict:
    """Metrics of the calls in `call_key` (no-call patients left out, counted) with exact intervals; ROC-AUC and its
    interval from the mean score `rank_key`, which only ranks."""
    for r in rows:
        r["_vote"] = float(decision.as_label(r[call_key]))
    called = [r for r in rows if r["label"] >= 0 and r["_vote"] >= 0]
    m, _ = analysis.decide(rows, "_vote", "_vote_prediction", {"rule": "majority vote", "threshold": 0.5,
                                                               "reason": ""}, patients, groups, draws, called)
    ranked = [r for r in rows if r["label"] >= 0 and r[rank_key] != ""]
    for r in ranked:
        r["_rank"] = float(r[rank_key])
    rank, _ = analysis.decide(ranked, "_rank", "_rank_prediction", {"rule": "mean score", "threshold": 0.5,
                                                                     "reason": ""}, patients, groups, draws, ranked)
    m["roc_auc"] = rank["roc_auc"]
    for k in ("ci95", "ci_method", "ci_note", "bootstrap_undefined_share"):
        if k in rank and "roc_auc" in rank[k]:
            m.setdefault(k, {})["roc_auc"] = rank[k]["roc_auc"]
    m["roc_auc_of"] = f"the mean of the fold models' {rank_key.replace('_', ' ')}s (ranking only)"
    m["no_call"] = sum(r["label"] >= 0 and r["_vote"] < 0 for r in rows)
    for r in rows:
        for k in ("_vote", "_vote_prediction", "_rank", "_rank_prediction"):
            r.pop(k, None)
    return m


def run_ensemble(args, device) -> int:
    """evaluate.py --holdout --ensemble runs/27-f*: the one declared HoldOut model of a cross-validation. Each fold
    model calls every HoldOut patient at its own decision, stored with it and chosen on its own validation part (the
    patient rule and threshold, the patient model's threshold, which of them calls); the ensemble's call is their
    majority vote (a tie is no call). The mean of the fold models' scores ranks the patients (ROC-AUC) and decides
    only with --ensemble-decision calibrated-mean. The HoldOut's labels reach nothing but the metrics; the share of
    patients each fold model and the ensemble flag is reported without them."""
    runs = [Path(r) for r in args.ensemble]
    if not args.holdout:
        raise DataError("--ensemble: the ensemble is the cross-validation's HoldOut model; add --holdout")
    check_fold_runs(runs, "--ensemble")
    out = Path(args.out) if args.out else runs[0].parent / f"{crossval.default_out(runs).name[:-3]}-ensemble"
    eval_report.check_out_folder(out)
    data = fold_data(runs, args, "--ensemble")
    folds = evaluated_folds(runs, args, device, "--ensemble")
    paths = [f.run / "best.pt" for f in folds]
    ckpts = [common.load_checkpoint(p) for p in paths]
    shas = [common.file_sha256(p) for p in paths]
    crossval.check_folds(folds, data.cv_patients, "--ensemble")
    known = identity.Known(data)
    splits.check_holdout_independent(data, known.shared)
    groups = known.groups
    holdout = data.holdout_patients
    if not holdout:
        raise DataError(f"--ensemble: {data.root} has no HoldOut patients")
    rows, _ = analysis.count_identical_once(analysis.evaluation_rows(data, {}, holdout), known.identical)
    draws = analysis.part_draws(holdout, groups, args.bootstrap, args.seed)
    each, fold_rows = [], []
    for f, c, p, sha in zip(folds, ckpts, paths, shas):
        net, normalizer = model.from_checkpoint(c, p, args.arch, device)
        cache = prepared_cache(args, c, data, device)
        pred, _ = predict(net, normalizer, c, data, rows, device, **scoring_options(args, cache))
        mil_out = patient_model(args, p, sha, c, net, normalizer, data, holdout, device, cache)[0]
        d = fold_decision(f, c, mil_out)
        m, prows, _ = analysis.measure_part(pred, holdout, data.diagnosis, d.patch_threshold, args.top_k, groups, draws,
                                       rule=d.rule, mil_probability=mil_out and mil_out["probability"],
                                       mil_rule=d.model if mil_out else None, top_share=d.top_share)
        ab = calibrations(f, d) if args.ensemble_decision == "calibrated-mean" else None
        for r in prows:
            r.update(decision.call(d, r["n_patches"], r["score"], r.get("mil_probability") if mil_out else None
                                   ).as_row(), rule_score=r["score"])
            r["mil_probability"] = r.get("mil_probability", "") if mil_out else ""
            if ab is not None:
                own = r["mil_probability"] if d.call_by == "patient_model" else r["score"]
                r["calibrated"] = decision.calibrated(float(own), ab) if own != "" and np.isfinite(float(own)) \
                    else float("nan")
        each.append({"run": str(f.run), "fold": f.split.get("fold"), "decision": d.summary(),
                     "flagged": decision.flagged_share([r["call"] for r in prows]),
                     "calibration": ab, **{k: m[k] for k in ("patient", "patient_mil") if k in m}})
        fold_rows.append(prows)
        del net
    patient_rows = decision.joined(fold_rows)
    if args.ensemble_decision == "calibrated-mean":
        if any(e["calibration"] is None for e in each):
            raise DataError("--ensemble-decision calibrated-mean: a fold's test part is one class, its scores cannot "
                            "be calibrated; use the default vote")
        for r, rs in zip(patient_rows, zip(*fold_rows)):
            mean = float(np.mean([x["calibrated"] for x in rs]))
            r["calibrated_mean"] = mean
            if all(x["call"].startswith(decision.NO_CALL) for x in rs):  # e.g. too few patches: no model calls
                continue
            r["call"] = decision.POSITIVE if mean >= 0.5 else decision.NEGATIVE if np.isfinite(mean) else \
                f"{decision.NO_CALL}: no calibrated score"
    for r in patient_rows:
        r.update(prediction=decision.as_label(r["rule_call"]), split="holdout",
                 mil_prediction=decision.as_label(r["mil_call"]) if r["mil_call"] else "")
    with_model = all(r["mil_call"] for r in patient_rows)
    ensemble = {"call": vote_metrics(patient_rows, "call", "rule_score", holdout, groups, draws),
                "patient": vote_metrics(patient_rows, "rule_call", "rule_score", holdout, groups, draws)}
    if with_model:
        ensemble["patient_mil"] = vote_metrics(patient_rows, "mil_call", "mil_probability", holdout, groups, draws)
    where = ledger.path_for(paths[0])
    how = ("majority vote of the fold models, each at its own decision chosen on its own validation part"
           if args.ensemble_decision == "vote" else "mean of the fold models' scores, each first calibrated (Platt) "
           "on its own out-of-fold test patients, positive at >= 0.5")
    keys = {"holdout": ledger.key(kind="ensemble", sha256s=sorted(shas), flags=number_flags(args, device),
                                  patient_model=with_model, decision=args.ensemble_decision,
                                  data=ledger.data_digest(((r.sample.path, r.sample.label, r.sample.patient)
                                                           for r in rows), data.diagnosis))}
    table = {"ensemble": ensemble, "folds": each, "k": len(folds), "holdout_patients": holdout,
             "decision": {"ensemble": args.ensemble_decision, "how": how},
             "flagged": {"ensemble": decision.flagged_share([r["call"] for r in patient_rows]),
                         "folds": [e["flagged"] for e in each]},
             "looks": disclosed_looks(where, shas, ["holdout"], keys), "runs": [str(f.run) for f in folds],
             "patient_model_missing": crossval.without_model(folds)}
    text = eval_report.render_ensemble(table)
    with eval_report.replaced_folder(out) as tmp:
        eval_report.write_json(tmp / "metrics.json", table)
        eval_report.write_csv(tmp / "patients.csv", ENSEMBLE_COLUMNS,
                              ([eval_report.cell(r.get(c)) for c in ENSEMBLE_COLUMNS] for r in patient_rows))
        common.atomic_write_text(tmp / "report.md", text)
        # a HoldOut look by every fold model; the calibrated mean also reads each fold's test part (its calibration)
        record_look(where, table["looks"], keys, {
            "kind": "ensemble", "checkpoints": [str(p) for p in paths], "sha256s": shas, "parts": ["holdout"],
            **({"uses": {"test": shas}} if args.ensemble_decision == "calibrated-mean" else {}),
            "headline": {"holdout": {f"patient.{k}": ensemble["call"][k] for k in analysis.PATIENT_METRICS}}})
    print(text)
    for run in table["patient_model_missing"]:
        print(f"warning: {run}: no patient model (train_patient.py --checkpoint {run}/best.pt): the ensemble has "
              f"no patient model", file=sys.stderr)
    print(f"wrote {out}/report.md")
    return common.EXIT_OK


# Fewer shared validation patients than this and a bootstrap over patients has nothing to resample: one patient
# gives a zero-width interval that "excludes 0" for any difference. Refuse rather than print a verdict.
MIN_SHARED_PATIENTS = 5


def run_compare(args, device) -> int:
    """Models side by side on the patients they share, each with its own validation-chosen threshold and patient
    rule. On the validation part by default: where models are chosen among. --compare-on test uses the untouched
    part to choose, which the ledger records against every compared model, so their later reports say so."""
    if args.holdout:
        raise DataError("--holdout: not used with --compare (compare and choose on the validation part, then evaluate "
                        "the chosen checkpoint once with --holdout)")
    paths = [checkpoint_file(p, "--compare") for p in args.compare]
    out = Path(args.out) if args.out else paths[0].parent / "compare"
    eval_report.check_out_folder(out)
    ckpts = [common.load_checkpoint(p) for p in paths]
    data = common.load_data(data_root_of(ckpts[0], args.data_root, paths[0]))
    parts = [split_parts(c, data, p) for c, p in zip(ckpts, paths)]
    part = args.compare_on
    lacking = [str(p) for p, ps in zip(paths, parts) if not ps[part]]
    if lacking:
        raise DataError(f"--compare-on test: {', '.join(lacking)} has no test part (a two-part split); compare on "
                        f"the validation part")
    shared = sorted(set.intersection(*(set(ps[part]) for ps in parts)))
    if len(shared) < MIN_SHARED_PATIENTS:
        raise DataError(f"--compare: the checkpoints share {len(shared)} {part} patient(s) "
                        f"({', '.join(shared) or 'none'}); a paired comparison needs at least {MIN_SHARED_PATIENTS}: "
                        f"train the runs on one split (train.py --split runs/<id>/split.json)")
    known = identity.Known(data)
    groups = known.groups
    own_val = sorted({p for ps in parts for p in ps["val"]} - set(shared))  # where each model's rule is chosen
    scored = {"val": sorted(set(own_val) | set(shared))} if part == "val" else {"val": own_val, "test": shared}
    rows, _ = analysis.count_identical_once(analysis.evaluation_rows(data, scored), known.identical)
    if not any(r.patch_eval and r.sample.patient in set(shared) for r in rows):
        raise DataError(f"--compare: the shared {part} patients have no labelled patches in {data.root}")
    draws = analysis.part_draws(shared, groups, args.bootstrap, args.seed)  # the same resamples for every model: paired
    results = []
    for c, p, ps in zip(ckpts, paths, parts):
        net, normalizer = model.from_checkpoint(c, p, args.arch, device)
        cache = prepared_cache(args, c, data, device)
        pred, _ = predict(net, normalizer, c, data, rows, device, **scoring_options(args, cache))
        threshold = float(c["threshold"])
        of = lambda patients: pred.subset(np.isin(pred.patient, list(patients)))
        stored = decision.load(c)  # the rule stored with the model; chosen here on its validation part if none
        share = stored.top_share if stored.stored else args.top_share
        rule = stored.rule if stored.stored else analysis.measure_part(of(ps["val"]), ps["val"], data.diagnosis, threshold,
                                                                  args.top_k, top_share=share)[0]["patient"]
        result, _, boot = analysis.measure_part(of(shared), shared, data.diagnosis, threshold, args.top_k, groups, draws,
                                           rule=rule, top_share=share)
        results.append({"checkpoint": str(p), "metrics": result, "boot": boot})
        del net
    table = analysis.compare_table(results)
    table.update({"patients": shared, "part": part, "rule_chosen_on": "each model's own validation part",
                  "same_validation_patients": len({tuple(ps["val"]) for ps in parts}) == 1,
                  "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "unit": "patient cluster",
                                "paired": True}})
    if part == "test":  # choosing among models on the untouched part: every one of them carries it from now on
        shas = [common.file_sha256(p) for p in paths]
        where = ledger.path_for(paths[0])
        flags = number_flags(args, device)
        keys = {"test": ledger.key(kind="compare-test", sha256s=sorted(shas), flags=flags, data=ledger.data_digest(
            ((r.sample.path, r.sample.label, r.sample.patient) for r in rows), data.diagnosis))}
        seen = disclosed_looks(where, shas, ["test"], keys)
        table["ledger"] = str(where)
    with eval_report.replaced_folder(out) as tmp:
        eval_report.write_json(tmp / "compare.json", table)
        common.atomic_write_text(tmp / "compare.md", eval_report.render_compare(table))
        if part == "test":
            record_look(where, seen, keys, {"kind": "compare-test", "checkpoints": [str(p) for p in paths],
                                            "sha256s": shas, "parts": ["test"], "flags": flags, "headline": {
                                                "test": {m["checkpoint"]: m[analysis.PRIMARY]
                                                         for m in table["models"]}}})
    print(eval_report.render_compare(table))
    print(f"wrote {out}/compare.md")
    return common.EXIT_OK


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    def body():
        check_args(args)
        device = common.resolve_device(args.device)
        return run_compare(args, device) if args.compare else run_cv(args, device) if args.cv else \
            run_ensemble(args, device) if args.ensemble else run_evaluation(args, device)
    # workers ignore SIGTERM/SIGINT: left to Python's exit they would keep it waiting, so cleanup stops them
    return common.guarded_main(body, kept="no report written (a previous one is kept)",
                               again="run the same command again", cleanup=loaders.stop_workers,
                               leak=splits.IndependenceError)


if __name__ == "__main__":
    sys.exit(main())
