"""Train the patient model of a patch run: gated-attention MIL over each patient's bag of patch features.

    python train_patient.py --checkpoint runs/26/best.pt                                    # -> runs/26/patient/
    python train_patient.py --checkpoint runs/26/best.pt --data-root /scratch/$USER/HelicoDataSet --device cuda
    python train_patient.py --checkpoint runs/27-f3/best.pt --features imagenet  # frozen ImageNet backbone instead

1. Features (bags.py): one inference pass over every patch of every patient of the checkpoint's split and of the
   HoldOut: its Cropped (HoldOut) patches, the bag, and its original Annotated windows (only to check later where
   the attention falls). Each patch goes through the patch checkpoint's penultimate layer (--features checkpoint)
   with the stain normalization, image size and precision the checkpoint was validated with, and is stored per
   patient (float16, with its path) in runs/26/patient/bags/<key>/, keyed by the checkpoint's hash, the feature
   source, the stain and the image size: a stale bag is never reused, an interrupted extraction resumes at the
   first patient not yet stored. --cache/--cache-base read the patches as evaluate.py does.
2. Model (mil.py): gated attention (Ilse et al., 2018) on whole bags; NEGATIVA = 0, BAIXA/ALTA = 1; one bag per
   patient (all its folders). Trained on the split's training patients, the epoch chosen on its validation patients
   (lowest validation cross-entropy), on the CPU, deterministic by --seed. Test and HoldOut patients are extracted
   but their diagnoses are never read: changing them in PatientDiagnosis.csv changes no weight. Of patients whose
   images are byte-identical copies of another's (the split's duplicate groups), only the first is used.
   The same split as the patch run, so fold runs (--folds K --fold i) get fold-matched patient models.
3. Decision (decision.py): the model's threshold (Youden's J on the validation patients' probabilities) and which
   of the patient rule stored in the patch checkpoint and this model gives the project's call (the model only when
   its validation Youden's J is strictly higher), stored in patient/best.pt; evaluate.py and predict.py read it.
evaluate.py --checkpoint runs/26/best.pt then reports the rule and this model side by side on the same patients.

Writes runs/26/patient/: best.pt (self-describing: the patch checkpoint's path and sha256, split, feature source,
bag key, config), log.jsonl (one line per epoch: train_loss, val_loss, roc_auc and accuracy on validation),
learning_curves.png, bags/<key>/<patient>.pt. Re-running retrains from the stored bags (seconds) and replaces them.

Exit codes: 0 ok; 2 bad input (missing or foreign checkpoint, data root lacking a patient of the split, training
patients all one class, unreadable image without --skip-bad-images, ImageNet weights not in torchvision's cache);
5 no space left or an I/O error while writing (the folder named; bags written so far are kept); 130 Ctrl-C, 143
SIGTERM: the bags extracted so far are kept and the same command resumes; a second signal stops at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import common
from common import DataError
from helico import bags, decision, feeds, figures, helicodata, loaders, mil, model, packed_cache, runlog

INFECTED = ("BAIXA", "ALTA")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="the patch run's checkpoint (runs/26/best.pt); "
                   "the patient model goes to patient/ beside it")
    p.add_argument("--data-root", help="HelicoDataSet folder; default: the one stored in the checkpoint. Point it at "
                   "the staged copy on a cluster node")
    p.add_argument("--device", help="where features are extracted: cuda, cuda:1, cpu (default: cuda when available); "
                   "the patient model itself always trains on the CPU (small, and deterministic there)")
    p.add_argument("--seed", type=int, default=0, help="the patient model's initial weights, bag order and dropout")
    p.add_argument("--epochs", type=int, default=mil.DEFAULTS["epochs"], help="passes over the training patients' "
                   "bags (one bag a step); the epoch kept is the one with the lowest validation cross-entropy")
    p.add_argument("--lr", type=float, default=mil.DEFAULTS["lr"], help="AdamW learning rate of the patient model")
    p.add_argument("--features", choices=bags.SOURCES, default="checkpoint", help="checkpoint: the patch model's "
                   "penultimate layer; imagenet: the same architecture with torchvision's ImageNet weights, frozen "
                   "(needs them in torchvision's cache on an offline node)")
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
    p.add_argument("--no-amp", action="store_true", help="extract without autocast on CUDA (default: the patch "
                   "run's precision)")
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


def labelled_patients(patients: list[str], diagnosis: dict, duplicate_groups) -> tuple[list[str], list[int]]:
    """The patients of one part with a diagnosis, and their labels (NEGATIVA 0, BAIXA/ALTA 1); of a duplicate group
    only its first patient (the others' images are the same bytes)."""
    later = {p for g in duplicate_groups or [] for p in sorted(g)[1:]}
    kept = [p for p in patients if p not in later and diagnosis.get(p) in ("NEGATIVA", *INFECTED)]
    return kept, [int(diagnosis[p] in INFECTED) for p in kept]


def extract_bags(args, ckpt, data, device) -> tuple[str, object, dict]:
    """(bag key, bags folder, extraction counts) for every patient of the split and of the HoldOut."""
    path = args.checkpoint
    split = ckpt["split"]
    patients = sorted({p for part in ("train", "val", "test") for p in split.get(part) or []}
                      | set(data.holdout_patients))
    missing = sorted(set(patients) - set(data.cv_patients) - set(data.holdout_patients))
    if missing:
        raise DataError(f"data root {data.root} lacks patient(s) of the split of {path}: {', '.join(missing[:10])} "
                        f"(wrong --data-root, or an incomplete staged copy?)")
    net, normalizer = model.from_checkpoint(ckpt, path, None, torch.device("cpu"))
    sha = common.file_sha256(path)
    cache = packed_cache.for_checkpoint(ckpt, data, device, max(1, args.workers), args.cache, args.cache_base)
    stats = bags.ensure(path, sha, ckpt, net, normalizer.to(device) if normalizer is not None else None,
                        args.features, data, patients, device, batch_size=args.batch_size, workers=args.workers,
                        skip_bad=args.skip_bad_images, cache=cache, no_amp=args.no_amp,
                        resident_max_frac=args.resident_max_frac)
    for p in stats["skipped"]:
        print(f"warning: skipped unreadable {p} (--skip-bad-images)", file=sys.stderr)
    rate = f", {stats['img_s']:.0f} img/s on {device}" if stats["patches"] else ""
    print(f"features: {stats['extracted_patients']} patients extracted ({stats['patches']} patches{rate}), "
          f"{stats['reused_patients']} reused from {stats['folder']}")
    return stats["key"], stats["folder"], {**stats, "checkpoint_sha256": sha}


def part_bags(folder, key, patients) -> tuple[list[str], list[torch.Tensor]]:
    """The patients with a non-empty bag, and their bags (float32)."""
    kept, out = [], []
    for p in patients:
        bag = bags.load(folder, p, key)
        if bag is None:
            raise DataError(f"{bags.bag_file(folder, p)}: missing bag (extraction interrupted?); run again")
        b = bag.bag()
        if b.shape[0]:
            kept.append(p)
            out.append(b)
    return kept, out


def run(args) -> int:
    device = common.resolve_device(args.device)
    ckpt = model.load_checkpoint(args.checkpoint)
    root = args.data_root or (ckpt.get("config") or {}).get("data_root")
    if not root:
        raise DataError(f"--checkpoint {args.checkpoint}: no data_root in its config; pass --data-root")
    data = helicodata.load_data(root)
    out = common.writable_folder(bags.patient_dir(args.checkpoint), "--checkpoint")
    key, folder, stats = extract_bags(args, ckpt, data, device)
    split = ckpt["split"]
    groups = split.get("duplicate_groups")
    sets = {}
    for part in ("train", "val"):  # the only labels read: test and HoldOut diagnoses never reach the model
        patients, labels = labelled_patients(sorted(split.get(part) or []), data.diagnosis, groups)
        kept, bag_list = part_bags(folder, key, patients)
        sets[part] = (kept, [y for p, y in zip(patients, labels) if p in set(kept)], bag_list)
    (train_p, train_y, train_b), (val_p, val_y, val_b) = sets["train"], sets["val"]
    print(f"patient model: {len(train_p)} training patients ({sum(train_y)} infected), {len(val_p)} validation "
          f"({sum(val_y)} infected), {train_b[0].shape[1] if train_b else 0} features a patch; CPU, seed {args.seed}")
    start = time.perf_counter()
    interactive = sys.stdout.isatty()

    def progress(r):
        if interactive or r["epoch"] == args.epochs or r["epoch"] % 10 == 0:
            print(f"epoch {r['epoch']:3d}  train_loss {r['train_loss']:.4f}  val_loss {r['val_loss']:.4f}  "
                  f"val roc_auc {r['roc_auc']:.3f}  val accuracy@0.5 {r['accuracy']:.3f}")
    result = mil.fit(train_b, train_y, val_b, val_y, seed=args.seed, epochs=args.epochs, lr=args.lr,
                     on_epoch=progress)
    seconds = time.perf_counter() - start
    ckpt_out = mil.checkpoint(
        state=result["state"], config=result["config"],
        patch_checkpoint={"path": str(args.checkpoint), "sha256": stats["checkpoint_sha256"],
                          "arch": ckpt["arch"], "epoch": ckpt.get("epoch")},
        split=split, features={"source": args.features, "network": stats["network"], "image_size":
                               int(ckpt["image_size"]), "stain": "macenko" if ckpt["stain"] is not None else None,
                               "dtype": "float16", "bags": f"bags/{key[:16]}"},
        bag_key=key, epoch=result["epoch"], val_loss=min(r["val_loss"] for r in result["records"]))
    ckpt_out["patients"] = {"train": train_p, "val": val_p}
    net_mil = mil.from_checkpoint(ckpt_out)  # the kept epoch: its validation probabilities choose the threshold
    probs = {p: mil.predict(net_mil, b)[0] for p, b in zip(val_p, val_b)}
    ckpt_out["decision"] = decision.choose_model(ckpt.get("decision"), probs, dict(zip(val_p, val_y)))
    common.atomic_torch_save(ckpt_out, out / "best.pt")
    runlog.write(out, result["records"])
    figures.plot_learning_curves(result["records"], out / "learning_curves.png", chosen=result["epoch"])
    best = result["records"][result["epoch"] - 1]
    print(f"patient model: epoch {result['epoch']} kept (lowest validation cross-entropy {best['val_loss']:.4f}, "
          f"val roc_auc {best['roc_auc']:.3f}); trained in {seconds:.1f} s")
    print(f"wrote {out}/best.pt; evaluate.py --checkpoint {args.checkpoint} now reports it beside the patient rule")
    return common.EXIT_OK


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    def body():
        check_args(args)
        return run(args)
    return common.guarded_main(body, kept="the bags extracted so far are kept", again="run the same command again "
                               "to resume", cleanup=loaders.stop_workers)


if __name__ == "__main__":
    sys.exit(main())
