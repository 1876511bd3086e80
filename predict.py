"""Diagnose new patients: folders of unlabelled patches -> a call per patient, its evidence, one self-contained page.

    python predict.py --checkpoint runs/26/best.pt --input /data/new_slides    # -> runs/26/predictions/new_slides/
    python predict.py --checkpoint runs/26/best.pt --input /data/B23-7_0 --out /tmp/b23-7    # one folder of PNGs
    python predict.py --ensemble runs/27-f* --input /data/new_slides           # the fold models' majority vote

--input is a folder of patient folders `<PatID>_<section>/*.png` (the HoldOut layout: the sections of one patient
are one patient) or one folder of PNGs (one patient). No label is read, even when a diagnosis file lies beside the
patches, and no training data is needed: everything comes from the checkpoint (weights, image size, stain
reference) and the decision stored with it (helico/decision.py): the patch threshold, the patient rule and its
threshold, the patient model's threshold (when train_patient.py wrote runs/26/patient/best.pt for this very
checkpoint), and which of the rule and the patient model gives the call, all chosen on the validation patients
before any new patient was seen. `--ensemble`: each fold model calls at its own stored decision, the call is their
majority (a tie is no call); the mean of their scores is written to rank patients, never thresholded.

Writes --out (default predictions/<input name>/ beside the checkpoint; runs/27-predictions/<input name>/ for
--ensemble runs/27-f*), built in a temp folder and swapped in whole:
  patients.csv   patient, sections, n_patches, n_skipped, rule_score, rule_call, mil_probability, mil_call, call,
                 agree (call: positive, negative, or "no call: <reason>", e.g. too few readable patches)
  patches.csv    path, score (the patch model's probability), attention (the patient model's share of the bag)
  evidence/<patient>.png  the patches with the highest score and the highest attention, with Grad-CAM overlays
  report.html    one self-contained page (images embedded): the calls, each patient's evidence, the stain check, how
                 the thresholds were chosen. A research tool, not a diagnostic device.
  qc.json        per patient: unreadable, off-size and non-PNG files by name; each slide's DAB-hue angle from the
                 checkpoint's stain reference (slides more than 4 degrees away are named in a warning: normalization
                 keeps the reference's DAB vector, so another lab's stainer shifts their scores)

Quality control: unreadable and non-PNG files are counted per patient (n_skipped) and named, and the run goes on;
off-size patches are scored after resizing (as in evaluation) and named; a patient with fewer readable patches than
the stored minimum gets no call, never a guess.

Exit codes: 0 ok (files skipped are named, not fatal); 2 bad input (missing or unreadable checkpoint, one without a
stored patient rule, --input that is not a folder or holds no PNG at all, an --out this script did not write); 5 no
space left or an I/O error while writing (the previous output is kept); 130 Ctrl-C, 143 SIGTERM: nothing written,
the previous output kept whole.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import common
from common import DataError
from helico import (
    analysis, bags, crossval, decision, eval_report, figures, gradcam, html_report, identity, inference, loaders,
    mil, model, staining
)

MARKERS = ("patients.csv",)  # an existing --out holding it was written here and may be replaced whole


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=common.HelpFormatter, allow_abbrev=False)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="CKPT", help="a train.py checkpoint (runs/26/best.pt); its patient "
                      "model (patient/best.pt beside it) is used when it was trained for this checkpoint")
    what.add_argument("--ensemble", nargs="+", metavar="RUN", help="the fold runs of one cross-validation "
                      "(runs/27-f*): each fold model calls at its own stored decision, the call is their majority")
    p.add_argument("--input", required=True, metavar="DIR", help="a folder of patient folders <PatID>_<section>/ "
                   "holding PNG patches, or one folder of PNGs (one patient)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: predictions/<input name>/ beside the "
                   "checkpoint; runs/27-predictions/<input name>/ for --ensemble runs/27-f*); an existing one is "
                   "replaced whole, but only if it holds a previous patients.csv")
    p.add_argument("--evidence", type=int, default=4, help="patches per patient shown by score and by attention in "
                   "evidence/<patient>.png (with Grad-CAM); 0 skips the evidence images")
    p.add_argument("--batch-size", type=int, default=256, help="inference batch; lower it if the GPU runs out of "
                   "memory")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader processes decoding "
                   "PNGs; most CPU cores of the node (0 = in the main process)")
    common.add_device_flag(p, what="where the patches are scored")
    common.add_amp_flag(p, "the run's own precision on CUDA (the thresholds were chosen on those scores), off on CPU",
                        "--no-amp is slower and its scores match a float32 run")
    return p


def check_args(args) -> None:
    for flag in ("evidence", "workers"):
        if getattr(args, flag) < 0:
            raise DataError(f"--{flag} {getattr(args, flag)}: must be >= 0")
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: must be >= 1")


# ----------------------------------------------------------------------------------------------- the new slides
@dataclass
class Patient:
    patient: str
    sections: list[str] = field(default_factory=list)   # folder names
    patches: list[str] = field(default_factory=list)    # PNG paths relative to --input, in scan order
    not_png: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    off_size: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)     # `_AugK` re-crops of another patch: not counted twice


def is_png(name: str) -> bool:
    return name.lower().endswith(".png")


def scan_input(root: Path) -> tuple[Path, dict[str, Patient]]:
    """(the folder patch paths are relative to, the patients of --input): its subfolders (sections of one patient,
    common.patient_id, joined) or, without subfolders, the folder itself as one patient (paths then keep its
    name, the slide the stain survey groups by). Files are sorted by name within each folder."""
    if not root.is_dir():
        raise DataError(f"--input {root}: {'not found' if not root.exists() else 'not a folder'}")
    folders = sorted((e for e in root.iterdir() if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
    base = root if folders else root.resolve().parent
    patients: dict[str, Patient] = {}
    for folder in folders or [root.resolve()]:
        pid = common.patient_id(folder.name)
        p = patients.setdefault(pid, Patient(pid))
        p.sections.append(folder.name)
        for f in sorted(folder.iterdir(), key=lambda e: e.name):
            if f.name.startswith(".") or f.is_dir():
                continue
            rel = f.relative_to(base).as_posix()
            parsed = common.parse_patch_name(f.name)
            if not is_png(f.name):
                p.not_png.append(rel)
            elif parsed and parsed[1] is not None:
                p.copies.append(rel)
            else:
                p.patches.append(rel)
    loose = [f.name for f in root.iterdir() if folders and f.is_file() and is_png(f.name)]
    if loose:  # beside patient folders a PNG belongs to no patient: named, never guessed
        print(f"warning: --input {root}: {len(loose)} PNG(s) outside any patient folder ignored ({', '.join(loose[:5])}"
              f"{', ...' if len(loose) > 5 else ''})", file=sys.stderr)
    if not any(p.patches for p in patients.values()):
        raise DataError(f"--input {root}: no PNG patch found (expected <PatID>_<section>/*.png folders or a folder "
                        f"of PNGs)")
    return base, patients


def check_images(root: Path, patients: dict[str, Patient]) -> None:
    """Read each PNG's header (identity.png_size): unreadable ones leave the patch list (named), off-size ones (not
    the most common size of the input) are named and still scored after resizing, as in evaluation. Pixels that do
    not decode are found, and named, by the scoring pass."""
    sizes = {}
    for p in patients.values():
        for rel in p.patches:
            size = identity.png_size(root / rel)
            if size is None:
                p.unreadable.append(rel)
            else:
                sizes[rel] = size
    usual = Counter(sizes.values()).most_common(1)[0][0] if sizes else None
    for p in patients.values():
        p.patches = [rel for rel in p.patches if rel in sizes]
        p.off_size = [rel for rel in p.patches if sizes[rel] != usual]


# ----------------------------------------------------------------------------------------------- one model
class ScoreAndFeatures(torch.nn.Module):
    """head(body(x)) beside body(x): the patch logit and the patient model's features from one forward pass (head and
    body are model.penultimate's: head(body(x)) is net(x))."""
    def __init__(self, net):
        super().__init__()
        self.body, self.head = model.penultimate(net)

    def forward(self, x):
        f = self.body(x)
        return torch.cat([self.head(f), f], dim=1)


@dataclass
class Model:
    """A checkpoint ready to score: its network, stain normalizer, stored decision and patient model."""
    path: Path
    ckpt: dict
    net: object
    normalizer: object
    decision: decision.Decision
    mil_net: object = None
    mil_note: str = ""


def load_model(path: Path, device) -> Model:
    if path.is_dir():
        raise DataError(f"--checkpoint {path}: a folder, not a checkpoint; pass {path / 'best.pt'}")
    ckpt = common.load_checkpoint(path)
    net, normalizer = model.from_checkpoint(ckpt, path, None, device)
    mil_path, mil_ckpt, note = bags.patient_dir(path) / "best.pt", None, ""
    if mil_path.is_file():
        mil_ckpt = mil.load_checkpoint(mil_path)
        if mil_ckpt["patch_checkpoint"]["sha256"] != common.file_sha256(path):
            mil_ckpt, note = None, f"{mil_path} belongs to another checkpoint: not used"
        elif mil_ckpt["features"]["source"] != "checkpoint":
            mil_ckpt, note = None, f"{mil_path} reads ImageNet features, which predict.py does not extract: not used"
    d = decision.load(ckpt, mil_ckpt)
    if not d.stored:  # never chosen here: a new patient must not meet a rule tuned after the fact
        raise DataError(f"--checkpoint {path}: stores no patient rule (written before rules were stored); run its "
                        f"train.py command again: the run is complete, so it trains nothing and stores the rule")
    return Model(path, ckpt, net, normalizer, d, mil.from_checkpoint(mil_ckpt) if mil_ckpt else None, note)


def score(m: Model, root: Path, samples: list, device, args) -> tuple[np.ndarray, np.ndarray, list[int], float]:
    """(patch scores, float16-rounded features as the patient model's bags store them, indices undecodable, img/s):
    one inference pass (inference.run) under the run's precision."""
    both = ScoreAndFeatures(m.net).eval()
    scores, feats = np.full(len(samples), np.nan), {}

    def keep(idx, out, dropped):
        if out is not None:
            scores[idx] = torch.sigmoid(out[:, 0]).numpy()
            for k, i in enumerate(idx.tolist()):
                feats[i] = out[k, 1:].half()
    start = time.perf_counter()
    bad = inference.run(both, m.normalizer, root, samples, int(m.ckpt["image_size"]), device, keep,
                        batch_size=args.batch_size, workers=args.workers, skip_bad=True,
                        precision=model.scoring_precision(m.ckpt, device, args.amp), desc="predicting")
    rate = len(samples) / max(time.perf_counter() - start, 1e-9)
    features = torch.zeros(len(samples), next(iter(feats.values())).numel() if feats else 0, dtype=torch.float16)
    for i, f in feats.items():
        features[i] = f
    return scores, features, bad, rate


def patient_rows(m: Model, patients: dict[str, Patient], samples: list, scores, features, ok) -> list[dict]:
    """One row per patient: rule score, patient-model probability and calls under the model's stored decision, and
    each patch's attention (row["attention"]: sample index -> share of the bag)."""
    keep = np.flatnonzero(ok)
    pred = analysis.Predictions([samples[i] for i in keep], np.array(["new"] * len(keep)), np.zeros(len(keep), bool),
                                np.ones(len(keep), bool), scores[keep])
    d = m.decision
    rows = {r["patient"]: r for r in analysis.patient_scores(pred, list(patients), {}, d.patch_threshold, 10,
                                                             d.top_share)}  # no diagnosis given: no label read
    owner = np.array([s.patient for s in samples], dtype=object)
    out = []
    for pid, p in patients.items():
        r, mine = rows[pid], keep[owner[keep] == pid]
        prob, attention = float("nan"), {}
        if m.mil_net is not None and len(mine):
            prob, attn, _ = mil.predict(m.mil_net, features[torch.from_numpy(mine)].float())
            w = np.exp(attn - attn.max())
            attention = dict(zip(mine.tolist(), (w / w.sum()).tolist()))
        rule = decision.rule_score(r, d)
        c = decision.call(d, r["n_patches"], rule, prob if m.mil_net is not None else None)
        out.append({"patient": pid, "sections": " ".join(p.sections), "n_patches": r["n_patches"],
                    "n_skipped": len(p.unreadable) + len(p.not_png),
                    "rule_score": rule, "mil_probability": prob if m.mil_net is not None else "", **c.as_row(),
                    "attention": attention})
    return out


# ----------------------------------------------------------------------------------------------- ensemble
def ensemble_rows(fold_rows: list[list[dict]]) -> list[dict]:
    """The fold models' rows joined (decision.joined: majority vote, mean scores), attention averaged."""
    out = decision.joined(fold_rows)
    for row, rows in zip(out, zip(*fold_rows)):
        row["attention"] = {}
        for r in rows:
            for i, w in r["attention"].items():
                row["attention"][i] = row["attention"].get(i, 0.0) + w / len(rows)
    return out


# ----------------------------------------------------------------------------------------------- evidence
def evidence_image(path: Path, m: Model, root: Path, samples, scores, row: dict, n: int, device) -> bool:
    """evidence/<patient>.png: the n highest-scored patches and the n most attended, each beside its Grad-CAM."""
    mine = [i for i, s in enumerate(samples) if s.patient == row["patient"] and np.isfinite(scores[i])]
    if not mine or n == 0:
        return False
    by_score = sorted(mine, key=lambda i: -scores[i])[:n]
    by_attention = sorted(row["attention"], key=lambda i: -row["attention"][i])[:n]
    picks = [(i, f"score {scores[i]:.3f}") for i in by_score] + \
            [(i, f"attention {row['attention'][i]:.3f}, score {scores[i]:.3f}") for i in by_attention]
    ds = common.PatchDataset(root, [samples[i] for i, _ in picks], image_size=int(m.ckpt["image_size"]))
    images = torch.stack([ds[k][0] for k in range(len(ds))])
    x = model.model_input(images.to(device), m.normalizer)
    layer = gradcam.gradcam_layer(m.net, x[:1])[0]
    cams = gradcam.gradcam(m.net, layer, x)[0].cpu().numpy()
    fig, axes = figures.subplots(len(picks), 2, figsize=(5, 2.5 * len(picks)), squeeze=False, layout="constrained")
    for k, ((i, caption), (a, b)) in enumerate(zip(picks, axes)):
        rgb = images[k].permute(1, 2, 0).numpy()
        a.imshow(rgb)
        b.imshow(rgb)
        b.imshow(cams[k], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        a.set_title(("top score  " if k < len(by_score) else "top attention  ") + samples[i].path.rsplit("/", 1)[-1],
                    fontsize=8)
        b.set_title(f"Grad-CAM, {caption}", fontsize=8)
        a.axis("off")
        b.axis("off")
    fig.suptitle(f"{row['patient']}: call {row['call']}", fontsize=10)
    figures.save(fig, path)
    return True


# ----------------------------------------------------------------------------------------------- report
COLUMNS = ["patient", "sections", "n_patches", "n_skipped", "rule_score", "rule_call", "mil_probability", "mil_call",
           "call", "agree"]


def stain_check(m: Model, root: Path, samples) -> dict | None:
    """The DAB-hue survey of each new slide against the checkpoint's stain reference (staining.dab_hue_survey); one
    warning line naming the far ones."""
    if m.normalizer is None:
        return None
    survey = staining.dab_hue_survey(root, samples, m.normalizer)
    if survey["far"]:
        print(staining.far_warning(survey, "new slides", "their DAB amount changes under normalization, so their "
                                   "calls deserve a second look"), file=sys.stderr)
    return survey


def qc_lines(patients: dict[str, Patient]) -> list[str]:
    out = []
    for p in patients.values():
        for what, files in (("unreadable", p.unreadable), ("not a PNG", p.not_png), ("off-size (resized)", p.off_size),
                            ("an _AugK copy (not counted)", p.copies)):
            out += [f"{p.patient}: {what}: {f}" for f in files]
        if not p.patches:
            out.append(f"{p.patient}: no readable PNG in {', '.join(p.sections)}")
    return out


def render(rows, models: list[Model], survey, qc: list[str], evidence: dict[str, Path], ensemble: bool) -> str:
    d = models[0].decision
    parts = [html_report.note(),
             html_report.paragraph(f"{'Majority vote of ' + str(len(models)) + ' fold models: ' if ensemble else ''}"
                                   + ", ".join(str(m.path) for m in models) + ". No label was read."),
             html_report.heading("Patients"),
             html_report.table(COLUMNS + (["votes"] if ensemble else []),
                               [[r.get(c, "") for c in COLUMNS + (["votes"] if ensemble else [])] for r in rows]),
             html_report.heading("How the call is made"),
             html_report.items(html_report.decision_lines(d.summary()) + (
                 ["Each fold model calls at its own stored decision; the call is their majority, a tie is no call; "
                  "the mean score only ranks."] if ensemble else [])),
             html_report.heading("Stain check"),
             html_report.paragraph("No stain normalization in this model." if survey is None else
                                   f"Slides whose DAB hue lies more than {survey['threshold_deg']:g} degrees from the "
                                   f"checkpoint's stain reference: {len(survey['far'])} of {len(survey['angles'])}"
                                   + (f" ({', '.join(survey['far'])}): their calls deserve a second look"
                                      if survey["far"] else "") + "."),
             html_report.heading("Quality control"),
             html_report.items(qc) or html_report.paragraph("Every file was a readable PNG of the usual size."),
             html_report.heading("Evidence")]
    parts += [html_report.image(path, f"{pid}: the highest-scored and the most attended patches, with Grad-CAM")
              for pid, path in evidence.items()]
    return html_report.page("H. pylori calls for new patients", parts)


def default_out(args, first: Path, input_dir: Path) -> Path:
    """runs/26/predictions/<input name>/; for an ensemble runs/27-predictions/<input name>/ (runs/27-ensemble/ is
    evaluate.py's, replaced whole by it)."""
    if args.ensemble:
        return first.parent.parent / f"{crossval.default_out(args.ensemble).name[:-3]}-predictions" / \
            input_dir.resolve().name
    return first.parent / "predictions" / input_dir.resolve().name


def run(args) -> int:
    device = common.resolve_device(args.device)
    root = Path(args.input)
    paths = [Path(r) / "best.pt" for r in args.ensemble] if args.ensemble else [Path(args.checkpoint)]
    for path in paths:  # before any work: a missing model is one line
        if not path.exists():
            raise DataError(f"{'--ensemble' if args.ensemble else '--checkpoint'} {path}: file not found")
    out = Path(args.out) if args.out else default_out(args, paths[0], root)
    eval_report.check_out_folder(out, MARKERS)
    root, patients = scan_input(root)
    check_images(root, patients)
    samples = [common.Sample(rel, p.patient, "new", -1, 0) for p in patients.values() for rel in p.patches]
    models = [load_model(p, device) for p in paths]
    for m in models:
        if m.mil_note:
            print(f"warning: {m.mil_note}", file=sys.stderr)
    fold_rows, first_scores = [], None
    for m in models:
        scores, features, bad, rate = score(m, root, samples, device, args)
        print(f"{m.path}: {len(samples)} patches, {rate:.0f} img/s on {device}", file=sys.stderr)
        for i in bad:
            owner = patients[samples[i].patient]
            if samples[i].path not in owner.unreadable:
                owner.unreadable.append(samples[i].path)
            if samples[i].path in owner.off_size:  # named once, as what it is: unreadable
                owner.off_size.remove(samples[i].path)
        ok = np.isfinite(scores)
        fold_rows.append(patient_rows(m, patients, samples, scores, features, ok))
        first_scores = scores if first_scores is None else first_scores + scores
    scores = first_scores / len(models)
    rows = ensemble_rows(fold_rows) if args.ensemble else fold_rows[0]
    survey = stain_check(models[0], root, [s for s, k in zip(samples, np.isfinite(scores)) if k])
    qc = qc_lines(patients)
    for line in qc:
        print(f"warning: {line}", file=sys.stderr)
    with eval_report.replaced_folder(out, MARKERS) as tmp:
        eval_report.write_csv(tmp / "patients.csv", COLUMNS + (["votes"] if args.ensemble else []),
                              ([eval_report.cell(r.get(c)) for c in COLUMNS + (["votes"] if args.ensemble else [])]
                               for r in rows))
        attention = {i: w for r in rows for i, w in r["attention"].items()}
        eval_report.write_csv(tmp / "patches.csv", ["path", "score", "attention"],
                              ([s.path, eval_report.cell(float(sc)) if np.isfinite(sc) else "",
                                eval_report.cell(attention[i]) if i in attention else ""]
                               for i, (s, sc) in enumerate(zip(samples, scores))))
        evidence = {}
        for r in rows:
            where = tmp / "evidence" / f"{r['patient']}.png"
            if evidence_image(where, models[0], root, samples, scores, r, args.evidence, device):
                evidence[r["patient"]] = where
        eval_report.write_json(tmp / "qc.json", {
            "patients": {p.patient: {"sections": p.sections, "unreadable": p.unreadable, "not_png": p.not_png,
                                     "off_size": p.off_size, "aug_copies": p.copies} for p in patients.values()},
            "stain_survey": survey, "decision": [m.decision.summary() for m in models]})
        common.atomic_write_text(tmp / "report.html", render(rows, models, survey, qc, evidence, bool(args.ensemble)))
    for r in rows:
        print(f"{r['patient']}: {r['call']}")
    print(f"wrote {out}/report.html")
    return common.EXIT_OK


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    def body():
        check_args(args)
        return run(args)
    return common.guarded_main(body, kept="nothing written (a previous output is kept)",
                               again="run the same command again", cleanup=loaders.stop_workers)


if __name__ == "__main__":
    sys.exit(main())
