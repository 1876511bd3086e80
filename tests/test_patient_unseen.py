"""The patient model learns from patients, not from its encoder's memory: training bags of patches the patch model
never trained on (unseen.py), features.json, foundation encoders from a local file (encoders.py), bags valid only
for the same files, one patient model per patch checkpoint, the folder lock, and the steadier choice of epoch."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.metrics import log_loss

import train
import train_patient
import common
from helico import analysis, bags, encoders, eval_report, metrics, mil, model, unseen

# The smallest patch run with a stain reference: 32 px, Macenko on, 48 samples, one epoch (test_patient_model's).
PATCH_FLAGS = ["--device", "cpu", "--image-size", "32", "--batch-size", "16", "--weights", "none", "--workers", "0",
               "--seed", "0", "--limit-samples", "48", "--epochs", "1"]
PATIENT_FLAGS = ["--device", "cpu", "--workers", "0", "--mil-seeds", "2", "--epochs", "3"]


# ----------------------------------------------------------------------------------------------- which patches
def test_the_bag_half_is_a_property_of_the_window_and_splits_both_classes(small_demo_root):
    data = common.load_data(small_demo_root)
    for s in data.cropped:  # an Aug copy falls with its window
        if s.aug is not None:
            base = s.path.rsplit("/", 1)[0] + f"/{s.window:05d}.png"
            assert unseen.in_bag_half(s.path) == unseen.in_bag_half(base)
    for dx in ("NEGATIVA", "ALTA"):
        half = [unseen.in_bag_half(s.path) for s in data.cropped if s.diagnosis == dx]
        assert 0.25 < np.mean(half) < 0.75  # about half of each class, chosen without the label


def test_half_keeps_the_bag_half_out_of_the_encoders_training_and_all_does_not(small_demo_root):
    data = common.load_data(small_demo_root)
    patients = data.cv_patients
    half = unseen.encoder_training_samples(data, patients, "half", None, 0)
    everything = unseen.encoder_training_samples(data, patients, "all", None, 0)
    assert {s.path for s in half} < {s.path for s in everything}
    assert not any(s.source == "supplemental" and unseen.in_bag_half(s.path) for s in half)
    assert {s.path for s in everything} - {s.path for s in half} == \
        {s.path for s in everything if s.source == "supplemental" and unseen.in_bag_half(s.path)}
    seen = unseen.seen_windows(half)
    rows = [(s.path, "cropped") for s in data.cropped]
    keep = unseen.training_bag_rows([p for p, _ in rows], [r for _, r in rows], seen, label_free=False)
    assert any(keep) and not any(unseen.window_key(p) in seen for (p, _), k in zip(rows, keep) if k)
    assert all(unseen.training_bag_rows([p for p, _ in rows], [r for _, r in rows], seen, label_free=True))


# ----------------------------------------------------------------------------------------------- the steadier choice
def test_balanced_cross_entropy_is_sklearns_log_loss_with_balanced_weights():
    g = np.random.default_rng(0)
    y, p = np.array([0] * 9 + [1] * 3), g.uniform(0.05, 0.95, 12)
    w = np.where(y == 1, 9 / 3, 1.0)
    assert mil.balanced_cross_entropy(p, y) == pytest.approx(log_loss(y, p, sample_weight=w), rel=1e-12)


def test_the_epoch_kept_minimizes_the_validation_loss_of_the_mean_of_the_seeds_models():
    g = np.random.default_rng(1)
    make = lambda n: [torch.tensor(g.normal(size=(10, 4)) + [3 * (i % 2), 0, 0, 0], dtype=torch.float32)
                      for i in range(n)]
    tb, vb = make(10), make(6)
    ty, vy = [i % 2 for i in range(10)], [i % 2 for i in range(6)]
    fit = mil.fit(tb, ty, vb, vy, seed=0, seeds=3, epochs=4)
    assert len(fit["states"]) == 3 and fit["config"]["seeds"] == 3
    ckpt = mil.checkpoint(state=fit["states"], config=fit["config"], patch_checkpoint={}, split={}, features={},
                          bag_key="k", epoch=fit["epoch"], val_loss=0.0)
    ensemble = mil.from_checkpoint(ckpt)
    p = [mil.predict(ensemble, b)[0] for b in vb]
    kept = fit["records"][fit["epoch"] - 1]
    assert kept["val_loss"] == pytest.approx(mil.balanced_cross_entropy(p, vy), rel=1e-5)  # the mean's, as kept
    assert kept["val_loss"] == min(r["val_loss"] for r in fit["records"])
    singles = [mil.predict(mil.from_checkpoint({**ckpt, "model": [s]}), vb[0])[0] for s in fit["states"]]
    assert mil.predict(ensemble, vb[0])[0] == pytest.approx(np.mean(singles), rel=1e-5)


def test_attention_within_patients_equals_brute_force_over_pairs_of_one_patient():
    scores = [0.9, 0.1, 0.5, 0.4, 0.8, 0.2, 0.3]
    presence = [1, 0, 1, 0, 0, 1, 0]
    patients = ["A", "A", "A", "B", "B", "B", "C"]
    pairs = [(s1 > s0) + 0.5 * (s1 == s0) for i, (s1, y1, p1) in enumerate(zip(scores, presence, patients)) if y1
             for s0, y0, p0 in zip(scores, presence, patients) if not y0 and p0 == p1]
    out = analysis.attention_evidence(scores, presence, patients)
    assert out["within_patient_roc_auc"] == pytest.approx(np.mean(pairs))
    assert out["roc_auc"] == pytest.approx(metrics.roc_auc(presence, scores)) and out["patients_with_both"] == 2


def test_the_patient_models_ece_is_shown_with_its_n_and_not_below_30_patients():
    cal = {"ece": 0.12, "n_bins": 5}
    assert eval_report.ece_text(cal, 30) == "ECE 0.120 (5 bins, n = 30 patients)"
    assert "not shown" in eval_report.ece_text(cal, 29) and "0.120" not in eval_report.ece_text(cal, 29)


def test_a_model_trained_on_seen_patches_says_so_in_its_report_line():
    seen = eval_report._features_lines({"seen_in_training": 12, "training_bag_patches": 40}, {})[1]
    clean = eval_report._features_lines({"seen_in_training": 0, "training_bag_patches": 40}, {})[1]
    assert "12 of them training examples of the encoder" in seen and "optimistic" in seen
    assert "0 of them" in clean and "optimistic" not in clean


# ----------------------------------------------------------------------------------------------- encoders
PUBLISHED = {  # parameters (model cards) and key shapes of the published checkpoints
    "uni": (303e6, {"pos_embed": (1, 197, 1024), "blocks.23.ls2.gamma": (1024,), "norm.weight": (1024,)}),
    "uni2-h": (681e6, {"reg_token": (1, 8, 1536), "pos_embed": (1, 256, 1536), "blocks.23.mlp.fc1.weight": (8192, 1536),
                       "blocks.23.mlp.fc2.weight": (1536, 4096)}),
    "virchow2": (632e6, {"reg_token": (1, 4, 1280), "pos_embed": (1, 261, 1280), "blocks.31.mlp.fc1.weight":
                         (6832, 1280), "blocks.31.mlp.fc2.weight": (1280, 3416)}),
    "h-optimus-0": (1.13e9, {"reg_token": (1, 4, 1536), "pos_embed": (1, 256, 1536), "blocks.39.ls1.gamma": (1536,)}),
    "phikon": (86e6, {"pos_embed": (1, 197, 768), "blocks.11.attn.qkv.weight": (2304, 768)}),
}


@pytest.mark.parametrize("name", encoders.NAMES)
def test_each_named_encoder_has_its_published_checkpoints_size_and_keys(name):
    net, spec = encoders.architecture(name)  # on the meta device: no weights, no network
    sd = net.state_dict()
    params, shapes = PUBLISHED[name]
    assert sum(v.numel() for v in sd.values()) == pytest.approx(params, rel=0.01)
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert {"cls_token", "patch_embed.proj.weight"} <= set(sd)


def test_phikons_published_transformers_keys_load_into_the_timm_vit():
    net, spec = encoders.architecture("phikon")
    meta = lambda *shape: torch.empty(shape, device="meta")
    hf = {"embeddings.cls_token": meta(1, 1, 768), "embeddings.position_embeddings": meta(1, 197, 768),
          "embeddings.patch_embeddings.projection.weight": meta(768, 3, 16, 16),
          "embeddings.patch_embeddings.projection.bias": meta(768), "layernorm.weight": meta(768),
          "layernorm.bias": meta(768), "pooler.dense.weight": meta(768, 768), "pooler.dense.bias": meta(768)}
    for i in range(12):
        for name, shape in (("attention.attention.query", (768, 768)), ("attention.attention.key", (768, 768)),
                            ("attention.attention.value", (768, 768)), ("attention.output.dense", (768, 768)),
                            ("intermediate.dense", (3072, 768)), ("output.dense", (768, 3072)),
                            ("layernorm_before", None), ("layernorm_after", None)):
            hf[f"encoder.layer.{i}.{name}.weight"] = meta(*(shape or (768,)))
            hf[f"encoder.layer.{i}.{name}.bias"] = meta(shape[0] if shape else 768)
    fitted = encoders.check_fit(net, hf, spec, "phikon.bin")
    assert set(fitted) == set(net.state_dict())
    del hf["encoder.layer.4.output.dense.bias"]
    with pytest.raises(encoders.DataError, match=r"phikon.bin: does not fit .*missing key 'blocks.4.mlp.fc2.bias'"):
        encoders.check_fit(net, hf, spec, "phikon.bin")


def test_the_encoder_resizes_renormalizes_and_pools_as_its_card_says():
    net, _ = encoders.architecture("timm:test_vit", "cpu")
    spec = encoders.Spec("test_vit", {}, (0.7, 0.6, 0.7), (0.2, 0.2, 0.2), output="cls+mean", input_size=160)
    enc = encoders.Encoder(net, spec).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = model.model_input(images)
    with torch.no_grad():
        got = enc(x)
        unit = torch.nn.functional.interpolate(images.float() / 255, size=(160, 160), mode="bilinear")
        tokens = net.forward_features((unit - torch.tensor([.7, .6, .7]).view(1, 3, 1, 1)) / 0.2)
    expected = torch.cat([tokens[:, 0], tokens[:, net.num_prefix_tokens:].mean(1)], -1)
    assert got.shape == (2, 2 * net.num_features) and torch.allclose(got, expected, atol=1e-4)


# ----------------------------------------------------------------------------------------------- on the demo
@pytest.fixture(scope="module")
def run(small_demo_root, tmp_path_factory):
    """A patch run on a copy of the small demo (its pixels may be rewritten), and its default patient model."""
    base = tmp_path_factory.mktemp("unseen")
    root = shutil.copytree(small_demo_root, base / "HelicoDataSet")
    assert train.main(["--data-root", str(root), "--runs-dir", str(base / "runs"), "--run-id", "u",
                       *PATCH_FLAGS]) == 0
    run_dir = base / "runs" / "u"
    assert train_patient.main(["--checkpoint", str(run_dir / "best.pt"), *PATIENT_FLAGS]) == 0
    return run_dir


def test_by_default_no_training_bag_patch_was_a_training_example_of_the_encoder(run):
    info = json.loads((run / "patient" / "features.json").read_text())
    assert info["source"] == "checkpoint" and info["seen_in_training"] == 0 and info["training_bag_patches"] > 0
    shift = info["patch_model_negatives_loss"]
    assert shift["train"]["patches"] > 0 and shift["val"]["patches"] > 0
    assert {"train", "val"} == set(info["patient_model_negatives"])
    ckpt = mil.load_checkpoint(run / "patient" / "best.pt")
    assert ckpt["features"]["seen_in_training"] == 0 and len(ckpt["model"]) == 2  # --mil-seeds 2


def test_a_run_trained_on_every_easy_negative_is_refused_unless_allowed_and_then_counts_them(run, tmp_path, capsys):
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["config"]["easy_negatives"] = "all"
    ckpt["config"]["limit_samples"] = None  # as such a run trained: every easy negative of its training patients
    (tmp_path / "r").mkdir()
    torch.save(ckpt, tmp_path / "r" / "best.pt")
    argv = ["--checkpoint", str(tmp_path / "r" / "best.pt"), *PATIENT_FLAGS]
    assert train_patient.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--easy-negatives all" in err and "--allow-seen-patches" in err
    assert not (tmp_path / "r" / "patient" / "best.pt").exists()
    assert train_patient.main([*argv, "--allow-seen-patches"]) == 0
    info = json.loads((tmp_path / "r" / "patient" / "features.json").read_text())
    assert info["seen_in_training"] > 0 and "--allow-seen-patches" in info["training_bags"]


def test_rewritten_pixels_make_that_patients_bag_stale_and_its_probability_change(run, capsys):
    ckpt = common.load_checkpoint(run / "best.pt")
    root = ckpt["config"]["data_root"]
    patient = sorted(ckpt["split"]["test"])[0]
    before_model = mil.load_checkpoint(run / "patient" / "best.pt")
    key, folder = before_model["bag_key"], run / "patient" / before_model["features"]["bags"]
    before = bags.load(folder, patient, key)
    net = mil.from_checkpoint(before_model)
    for path in before.paths:  # every PNG of the patient, rewritten (same size on disk is not needed to be caught)
        with Image.open(os.path.join(root, path)) as im:
            Image.eval(im.convert("RGB"), lambda v: 255 - v).save(os.path.join(root, path))
    capsys.readouterr()
    assert train_patient.main(["--checkpoint", str(run / "best.pt"), *PATIENT_FLAGS]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("features:"))
    assert line.startswith("features: 1 patients extracted")
    after = bags.load(folder, patient, key)
    assert after.paths == before.paths and not torch.equal(after.features, before.features)
    assert mil.predict(net, after.bag())[0] != mil.predict(net, before.bag())[0]


def test_training_on_last_pt_leaves_best_pts_patient_model_as_it_was(run):
    shutil.copy(run / "best.pt", run / "last-copy.pt")
    before = (run / "patient" / "best.pt").read_bytes()
    assert train_patient.main(["--checkpoint", str(run / "last-copy.pt"), *PATIENT_FLAGS]) == 0
    assert (run / "patient-last-copy" / "best.pt").is_file()
    assert (run / "patient" / "best.pt").read_bytes() == before


def test_a_second_train_patient_on_the_same_folder_is_refused_in_one_line(run, capsys):
    fd = train_patient.hold_folder(run / "patient")
    try:
        assert train_patient.main(["--checkpoint", str(run / "best.pt"), *PATIENT_FLAGS]) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "in use by another train_patient.py" in err and str(run / "patient") in err


def test_a_small_timm_model_from_a_file_runs_end_to_end_and_keys_its_bags_by_the_weights(run, tmp_path, capsys):
    weights = tmp_path / "test_vit.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), weights)
    argv = ["--checkpoint", str(run / "best.pt"), "--features", "timm:test_vit", "--encoder-weights", str(weights),
            *PATIENT_FLAGS]
    assert train_patient.main(argv) == 0
    m = mil.load_checkpoint(run / "patient" / "best.pt")
    assert m["features"]["source"] == "timm:test_vit" and m["config"]["in_dim"] == 64
    info = json.loads((run / "patient" / "features.json").read_text())
    assert info["seen_in_training"] == 0 and info["patch_model_negatives_loss"] is None
    sd = torch.load(weights, weights_only=True)
    sd["norm.weight"] = sd["norm.weight"] + 1  # other weights: other bags
    torch.save(sd, weights)
    assert train_patient.main(argv) == 0
    assert mil.load_checkpoint(run / "patient" / "best.pt")["bag_key"] not in (m["bag_key"],)
    del sd["norm.bias"]
    torch.save(sd, weights)
    capsys.readouterr()
    assert train_patient.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(weights) in err and "missing key 'norm.bias'" in err


def test_encoder_flags_fail_in_one_line_naming_the_file_or_the_install(run, tmp_path, capsys, monkeypatch):
    base = ["--checkpoint", str(run / "best.pt"), *PATIENT_FLAGS]
    assert train_patient.main([*base, "--features", "uni", "--encoder-weights", str(tmp_path / "no.bin")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --encoder-weights {tmp_path / 'no.bin'}: no such file"
    assert train_patient.main([*base, "--features", "uni"]) == 2
    assert "needs --encoder-weights FILE" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "timm", None)  # as without timm installed
    assert train_patient.main([*base, "--features", "uni", "--encoder-weights", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install timm" in err
