"""Train the patient model of a patch run: gated-attention MIL over each patient's bag of patch features.

    python train_patient.py --checkpoint runs/26/best.pt                                    # -> runs/26/patient/
    python train_patient.py --checkpoint runs/26/best.pt --data-root /scratch/$USER/HelicoDataSet --device cuda
    python train_patient.py --checkpoint runs/27-f3/best.pt --features imagenet  # frozen ImageNet backbone instead
    python train_patient.py --checkpoint runs/26/best.pt --features uni --encoder-weights ~/models/uni.bin
    python train_patient.py --checkpoint runs/26/best.pt --features timm:vit_small_patch16_224 --encoder-weights W

1. Features (bags.py): one inference pass over every patch of every patient of the checkpoint's split and of the
   HoldOut: its Cropped (HoldOut) patches, the bag, and its original Annotated windows (only to check later where
   the attention falls). Each patch goes through the patch checkpoint's penultimate layer (--features checkpoint),
   torchvision's ImageNet backbone (imagenet) or a pathology foundation encoder read from a local file (uni, uni2-h,
   virchow2, h-optimus-0, phikon, or any timm:ARCH, with --encoder-weights; needs timm; nothing is downloaded),
   with the stain normalization, image size and precision the checkpoint was validated with, and is stored per
   patient (float16, with its path) in runs/26/patient/bags/<key>/, keyed by the network (the checkpoint's or the
   weights file's hash), the stain and the image size, and valid only for the same files (path, size and mtime):
   a rewritten PNG is extracted again, an interrupted extraction resumes at the first patient not yet stored.
   --cache/--cache-base read the patches as evaluate.py does.
2. Training bags: no patch a training bag holds was a training example of the encoder. With checkpoint features a
   training patient's bag is the half of its Cropped windows train.py kept out of the easy negatives
   (--easy-negatives half, its default; the half is chosen by a hash of the window, not by label, for infected and
   NEGATIVA patients alike); label-free encoders (imagenet, foundation) read every Cropped patch. A checkpoint
   trained with --easy-negatives all is refused unless --allow-seen-patches. Validation, test and HoldOut bags are
   whole. features.json says what was read and the shift it can measure.
3. Model (mil.py): gated attention (Ilse et al., 2018) on whole bags; NEGATIVA = 0, BAIXA/ALTA = 1; one bag per
   patient (all its folders). --mil-seeds models trained on the split's training patients; the one epoch kept is
   where the mean of their probabilities has the lowest class-balanced validation cross-entropy; on the CPU,
   deterministic by --seed. Test and HoldOut patients are extracted but their diagnoses are never read: changing
   them in PatientDiagnosis.csv changes no weight. Of patients whose images are byte-identical copies of
   another's (the split's duplicate groups), only the first is used. The same split as the patch run, so fold runs
   (--folds K --fold i) get fold-matched patient models.
4. Decision (decision.py): the model's threshold (Youden's J on the validation patients' probabilities) and which
   of the patient rule stored in the patch checkpoint and this model gives the project's call (the model only when
   its validation Youden's J is strictly higher), stored in patient/best.pt; evaluate.py and predict.py read it.
evaluate.py --checkpoint runs/26/best.pt then reports the rule and this model side by side on the same patients.

Writes runs/26/patient/ for best.pt (runs/26/patient-last/ for last.pt: one patient model per patch checkpoint):
best.pt (self-describing: the patch checkpoint's path and sha256, split, feature source, bag key, config),
features.json (source, training_bag_patches, seen_in_training, and the shift between training and validation
NEGATIVA patients), log.jsonl (one line per epoch: train_loss and val_loss, both class-balanced, val roc_auc and
accuracy of the mean probability), learning_curves.png, bags/<key>/<patient>.pt. Re-running retrains from the stored
bags (seconds) and replaces them. A second train_patient.py on the same folder is refused while the first runs.

Exit codes: 0 ok; 2 bad input (missing or foreign checkpoint, data root lacking a patient of the split, training
patients all one class, a checkpoint whose training bags would hold patches it trained on, missing timm or encoder
weights file, weights that do not fit the encoder, the folder in use by another train_patient.py, unreadable image
without --skip-bad-images, ImageNet weights not in torchvision's cache); 5 no space left or an I/O error while
writing (the folder named; bags written so far are kept); 130 Ctrl-C, 143 SIGTERM: the bags extracted so far are
kept and the same command resumes; a second signal stops at once.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import DataError
from helico import bags, decision, encoders, feeds, figures, loaders, mil, model, packed_cache, runlog, unseen

INFECTED = ("BAIXA", "ALTA")
LOCK = ".train_patient.lock"  # in the patient folder: flock-ed for the whole run, holds its pid


def features_flag(text: str) -> str:
    """--features: a named source or timm:ARCH."""
    if text in bags.SOURCES or (text.startswith("timm:") and len(text) > len("timm:")):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(bags.SOURCES)}, or timm:ARCH")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=common.HelpFormatter, allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="the patch run's checkpoint (runs/26/best.pt); "
                   "the patient model goes to patient/ beside it (patient-<name>/ for another file name than best.pt)")
    p.add_argument("--data-root", help="HelicoDataSet folder; default: the one stored in the checkpoint. Point it at "
                   "the staged copy on a cluster node")
    common.add_device_flag(p, what="where features are extracted", note="the patient model itself always trains on "
                           "the CPU (small, and deterministic there)")
    p.add_argument("--seed", type=int, default=0, help="the patient model's initial weights, bag order and dropout")
    p.add_argument("--epochs", type=int, default=mil.DEFAULTS["epochs"], help="passes over the training patients' "
                   "bags (one bag a step); the epoch kept is where the mean of the --mil-seeds models' probabilities "
                   "has the lowest class-balanced validation cross-entropy (default: %(default)s)")
    p.add_argument("--mil-seeds", type=int, default=mil.DEFAULTS["seeds"], help="models trained (seeds --seed, "
                   "--seed+1, ...), their probabilities averaged, one epoch chosen for all on the mean: steadier "
                   "than one model on a few validation patients; each takes seconds on the demo, about 40 s at a real "
                   "fold's size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=mil.DEFAULTS["lr"], help="AdamW learning rate of the patient model")
    p.add_argument("--features", type=features_flag, default="checkpoint", metavar="SOURCE", help="checkpoint: the "
                   "patch model's penultimate layer, training bags from the patches it never trained on; imagenet: "
                   "the same architecture with torchvision's ImageNet weights, frozen (needs them in torchvision's "
                   f"cache on an offline node); {', '.join(encoders.NAMES)}: that pathology foundation encoder, or "
                   "timm:ARCH any timm model, with --encoder-weights (needs timm: pip install timm)")
    p.add_argument("--encoder-weights", metavar="FILE", help="the foundation encoder's weights (.bin/.pt or "
                   ".safetensors, as published), read from disk: nothing is downloaded")
    p.add_argument("--allow-seen-patches", action="store_true", help="with --features checkpoint of a patch run "
                   "trained with --easy-negatives all: train on bags of patches that run trained on (its NEGATIVA "
                   "patients' only). The patient model then learns the encoder's memory, not the patients: the "
                   "report says so")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch; lower it if the GPU runs "
                   "out of memory")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader processes decoding "
                   "PNGs for the extraction (0 = in the main process)")
    p.add_argument("--cache", metavar="DIR", help="read patches from this packed cache (see patch_cache.py), as "
                   "evaluate.py --cache does")
    p.add_argument("--cache-base", metavar="DIR", help="the cache train.py --cache-base DIR names for this "
                   "checkpoint; if the disk fails there, a warning and PNGs. --cache DIR wins")
    p.add_argument("--resident-max-frac", type=float, default=feeds.DEFAULT_MAX_FRAC, metavar="F", help="with a "
                   "cache: extract from one uint8 tensor on the device when it takes at most F of its free memory, "
                   "else stream from the host cache")
    common.add_amp_flag(p, "the patch run's own (its autocast on CUDA, as evaluate.py scores)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave undecodable PNGs out of the bags (named on "
                   "stderr) instead of stopping with an error")
    return p


def check_args(args) -> None:
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise DataError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.workers < 0:
        raise DataError(f"--workers {args.workers}: must be >= 0")
    if not args.lr > 0:
        raise DataError(f"--lr {args.lr}: must be > 0")
    if not 0 <= args.resident_max_frac <= 1:
        raise DataError(f"--resident-max-frac {args.resident_max_frac}: expected a share in [0, 1]")
    if args.mil_seeds < 1:
        raise DataError(f"--mil-seeds {args.mil_seeds}: must be >= 1")
    if encoders.is_encoder(args.features):
        encoders.need_timm(args.features)
        if not args.encoder_weights:
            raise DataError(f"--features {args.features} needs --encoder-weights FILE (nothing is downloaded)")
        if not os.path.isfile(args.encoder_weights):
            raise DataError(f"--encoder-weights {args.encoder_weights}: no such file")
    elif args.encoder_weights:
        raise DataError(f"--encoder-weights: only with a foundation encoder or timm:ARCH, not --features "
                        f"{args.features}")


def labelled_patients(patients: list[str], diagnosis: dict, duplicate_groups) -> tuple[list[str], list[int]]:
    """The patients of one part with a diagnosis, and their labels (NEGATIVA 0, BAIXA/ALTA 1); of a duplicate group
    only its first patient (the others' images are the same bytes)."""
    later = {p for g in duplicate_groups or [] for p in sorted(g)[1:]}
    kept = [p for p in patients if p not in later and diagnosis.get(p) in ("NEGATIVA", *INFECTED)]
    return kept, [int(diagnosis[p] in INFECTED) for p in kept]


def extract_bags(args, ckpt, net, normalizer, data, device) -> dict:
    """bags.ensure's counts (key, folder, network) for every patient of the split and of the HoldOut."""
    path = args.checkpoint
    split = ckpt["split"]
    patients = sorted({p for part in ("train", "val", "test") for p in split.get(part) or []}
                      | set(data.holdout_patients))
    missing = sorted(set(patients) - set(data.cv_patients) - set(data.holdout_patients))
    if missing:
        raise DataError(f"data root {data.root} lacks patient(s) of the split of {path}: {', '.join(missing[:10])} "
                        f"(wrong --data-root, or an incomplete staged copy?)")
    sha = common.file_sha256(path)
    cache = packed_cache.for_checkpoint(ckpt, data, device, max(1, args.workers), args.cache, args.cache_base)
    stats = bags.ensure(path, sha, ckpt, net, normalizer.to(device) if normalizer is not None else None,
                        args.features, data, patients, device, batch_size=args.batch_size, workers=args.workers,
                        skip_bad=args.skip_bad_images, cache=cache, amp=args.amp,
                        resident_max_frac=args.resident_max_frac, encoder_weights=args.encoder_weights)
    for p in stats["skipped"]:
        print(f"warning: skipped unreadable {p} (--skip-bad-images)", file=sys.stderr)
    rate = f", {stats['img_s']:.0f} img/s on {device}" if stats["patches"] else ""
    print(f"features: {stats['extracted_patients']} patients extracted ({stats['patches']} patches{rate}), "
          f"{stats['reused_patients']} reused from {stats['folder']}")
    return {**stats, "checkpoint_sha256": sha}


def seen_by_encoder(args, ckpt, data) -> set:
    """The windows the feature network trained on: none for a label-free encoder; for checkpoint features those of
    train.py's training samples (the checkpoint's split, --easy-negatives, --limit-samples and seed). A run made
    before --easy-negatives trained on every easy negative: refused unless --allow-seen-patches."""
    if bags.label_free(args.features):
        return set()
    config = ckpt.get("config") or {}
    easy = config.get("easy_negatives", "all")
    if easy == "all" and not args.allow_seen_patches:
        raise DataError(f"--checkpoint {args.checkpoint}: trained with --easy-negatives all, so every Cropped patch "
                        f"of its training NEGATIVA patients was one of its training examples and none of its "
                        f"infected patients' were: its features would let the patient model tell them apart by "
                        f"memory. Retrain it with train.py's default (--easy-negatives half), use --features "
                        f"imagenet or a foundation encoder, or pass --allow-seen-patches (the report says so)")
    samples = unseen.encoder_training_samples(data, ckpt["split"]["train"], easy, config.get("limit_samples"),
                                              config.get("seed", 0))
    return unseen.seen_windows(samples)


def part_bags(folder, key, patients, rows_of=None) -> tuple[list[str], list[torch.Tensor], list]:
    """The patients with a non-empty bag, their bags (float32) and the paths of the rows read; rows_of(bag) picks the
    rows of a training patient's bag (default: the whole bag)."""
    kept, out, paths = [], [], []
    for p in patients:
        bag = bags.load(folder, p, key)
        if bag is None:
            raise DataError(f"{bags.bag_file(folder, p)}: missing bag (extraction interrupted?); run again")
        rows = np.array(rows_of(bag) if rows_of else bag.rows(), dtype=bool)
        if rows.any():
            kept.append(p)
            out.append(bag.features[torch.from_numpy(rows)].float())
            paths.append([q for q, r in zip(bag.paths, rows) if r])
    return kept, out, paths


def negatives_loss(head, bag_list, labels) -> dict:
    """The patch model's mean loss (label 0) over the bag patches of NEGATIVA patients, and how many."""
    x = [b for b, y in zip(bag_list, labels) if y == 0]
    if not x:
        return {"loss": float("nan"), "patches": 0, "patients": 0}
    with torch.no_grad():
        logits = head(torch.cat(x)).float().reshape(-1)
    return {"loss": float(F.softplus(logits).mean()), "patches": int(logits.numel()), "patients": len(x)}


def mean_negative_probability(net, bag_list, labels) -> dict:
    p = [mil.predict(net, b)[0] for b, y in zip(bag_list, labels) if y == 0]
    return {"mean_probability": float(np.mean(p)) if p else float("nan"), "patients": len(p)}


def hold_folder(folder) -> int:
    """Lock the patient folder for this run (a second train_patient.py on it: exit 2); the kernel drops the lock
    with the process, so a killed run leaves none."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid not yet recorded"
        os.close(fd)
        raise DataError(f"{folder} is in use by another train_patient.py ({holder}): wait for it to end") from None
    except OSError:  # a file system without flock: unguarded, as train.py
        return fd
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


def run(args) -> int:
    device = common.resolve_device(args.device)
    ckpt = common.load_checkpoint(args.checkpoint)
    root = args.data_root or (ckpt.get("config") or {}).get("data_root")
    if not root:
        raise DataError(f"--checkpoint {args.checkpoint}: no data_root in its config; pass --data-root")
    data = common.load_data(root)
    out = common.writable_folder(bags.patient_dir(args.checkpoint), "--checkpoint")
    seen = seen_by_encoder(args, ckpt, data)
    lock = hold_folder(out)
    try:
        return train(args, ckpt, data, device, out, seen)
    finally:
        os.close(lock)


def train(args, ckpt, data, device, out, seen: set) -> int:
    net, normalizer = model.from_checkpoint(ckpt, args.checkpoint, None, torch.device("cpu"))
    stats = extract_bags(args, ckpt, net, normalizer, data, device)
    key, folder = stats["key"], stats["folder"]
    split = ckpt["split"]
    groups = split.get("duplicate_groups")
    label_free = bags.label_free(args.features)
    training_rows = lambda bag: unseen.training_bag_rows(bag.paths, bag.roles, seen, label_free,
                                                         args.allow_seen_patches)
    sets = {}
    for part in ("train", "val"):  # the only labels read: test and HoldOut diagnoses never reach the model
        patients, labels = labelled_patients(sorted(split.get(part) or []), data.diagnosis, groups)
        kept, bag_list, paths = part_bags(folder, key, patients, training_rows if part == "train" else None)
        sets[part] = (kept, [y for p, y in zip(patients, labels) if p in set(kept)], bag_list, paths)
    (train_p, train_y, train_b, train_paths), (val_p, val_y, val_b, _) = sets["train"], sets["val"]
    seen_count = sum(unseen.window_key(q) in seen for ps in train_paths for q in ps)
    print(f"patient model: {len(train_p)} training patients ({sum(train_y)} infected; "
          f"{sum(map(len, train_paths))} bag patches, {seen_count} of them training examples of the encoder), "
          f"{len(val_p)} validation ({sum(val_y)} infected), {train_b[0].shape[1] if train_b else 0} features a "
          f"patch; CPU, {args.mil_seeds} seed(s) from {args.seed}")
    start = time.perf_counter()
    interactive = sys.stdout.isatty()

    def progress(r):
        if interactive or r["epoch"] == args.epochs or r["epoch"] % 10 == 0:
            print(f"epoch {r['epoch']:3d}  train_loss {r['train_loss']:.4f}  val_loss {r['val_loss']:.4f}  "
                  f"val roc_auc {r['roc_auc']:.3f}  val accuracy@0.5 {r['accuracy']:.3f}")
    result = mil.fit(train_b, train_y, val_b, val_y, seed=args.seed, seeds=args.mil_seeds, epochs=args.epochs,
                     lr=args.lr, on_epoch=progress)
    seconds = time.perf_counter() - start
    features = {"source": args.features, "network": stats["network"], "image_size": int(ckpt["image_size"]),
                "stain": "macenko" if ckpt["stain"] is not None else None, "dtype": "float16",
                "bags": f"bags/{key[:16]}",
                "encoder_weights": os.path.abspath(args.encoder_weights) if args.encoder_weights else None,
                "training_bag_patches": sum(map(len, train_paths)), "seen_in_training": seen_count}
    ckpt_out = mil.checkpoint(
        state=result["states"], config=result["config"],
        patch_checkpoint={"path": str(args.checkpoint), "sha256": stats["checkpoint_sha256"],
                          "arch": ckpt["arch"], "epoch": ckpt.get("epoch")},
        split=split, features=features, bag_key=key, epoch=result["epoch"],
        val_loss=result["records"][result["epoch"] - 1]["val_loss"])
    ckpt_out["patients"] = {"train": train_p, "val": val_p}
    net_mil = mil.from_checkpoint(ckpt_out)  # the kept epoch: its validation probabilities choose the threshold
    probs = {p: mil.predict(net_mil, b)[0] for p, b in zip(val_p, val_b)}
    ckpt_out["decision"] = decision.choose_model(ckpt.get("decision"), probs, dict(zip(val_p, val_y)))
    common.atomic_torch_save(ckpt_out, out / "best.pt")
    report = features_report(args, features, net, result, train_b, train_y, val_b, val_y, ckpt_out)
    common.atomic_write_text(out / "features.json", json.dumps(report, indent=1) + "\n")
    runlog.write(out, result["records"])
    figures.plot_learning_curves(result["records"], out / "learning_curves.png", chosen=result["epoch"])
    best = result["records"][result["epoch"] - 1]
    print(f"patient model: epoch {result['epoch']} kept ({result['config']['selection']} {best['val_loss']:.4f}, "
          f"val roc_auc {best['roc_auc']:.3f}); trained in {seconds:.1f} s")
    shift = report["patient_model_negatives"]
    print(f"features.json: {features['seen_in_training']} of {features['training_bag_patches']} training-bag "
          f"patches were training examples of the encoder; the patient model's mean probability for NEGATIVA "
          f"patients: training {shift['train']['mean_probability']:.3f}, validation "
          f"{shift['val']['mean_probability']:.3f}")
    print(f"wrote {out}/best.pt; evaluate.py --checkpoint {args.checkpoint} now reports it beside the patient rule")
    return common.EXIT_OK


def features_report(args, features, net, result, train_b, train_y, val_b, val_y, ckpt_out) -> dict:
    """features.json: what the training bags hold and the shift between training and validation NEGATIVA patients
    measurable here: the patient model's mean probability, and for checkpoint features the patch model's own loss
    on their bag patches (lower on training patients: patches it had fitted)."""
    ensemble = mil.from_checkpoint(ckpt_out)
    report = {k: features[k] for k in ("source", "network", "encoder_weights", "training_bag_patches",
                                       "seen_in_training")}
    report["training_bags"] = ("every Cropped patch of each training patient (a label-free encoder)"
                               if bags.label_free(args.features) else
                               "every Cropped patch of each training patient, patches the encoder trained on "
                               "included (--allow-seen-patches)" if args.allow_seen_patches else
                               "the Cropped patches of each training patient in the half of its windows train.py "
                               "kept out of the easy negatives, less any window it trained on")
    report["patient_model_negatives"] = {"train": mean_negative_probability(ensemble, train_b, train_y),
                                         "val": mean_negative_probability(ensemble, val_b, val_y)}
    if bags.label_free(args.features):
        report["patch_model_negatives_loss"] = None
    else:
        head = model.penultimate(net)[1].float().eval()
        report["patch_model_negatives_loss"] = {"train": negatives_loss(head, train_b, train_y),
                                                "val": negatives_loss(head, val_b, val_y)}
    report["epoch"], report["mil_seeds"] = result["epoch"], args.mil_seeds
    return report


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    def body():
        check_args(args)
        return run(args)
    return common.guarded_main(body, kept="the bags extracted so far are kept", again="run the same command again "
                               "to resume", cleanup=loaders.stop_workers)


if __name__ == "__main__":
    sys.exit(main())
