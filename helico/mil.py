"""The patient model: gated-attention multiple-instance learning (Ilse, Tomczak & Welling, 2018) over a patient's bag
of patch features (bags.py), its training, and its checkpoint schema (runs/<id>/patient/best.pt).

    net = mil.GatedAttentionMIL(in_dim=512)
    logit, attention = net(bag)                      # bag: float32 (n, d); attention: one raw score per patch
    fitted = mil.fit(train_bags, train_labels, val_bags, val_labels, seed=0, seeds=5, epochs=40)
    probability, attention, _ = mil.predict(mil.from_checkpoint(ckpt), bag)

Model: each patch feature x_i is standardized (mean and sd of the training bags' patches), embedded
h_i = ReLU(W x_i) (dropout in training), scored a_i = w^T (tanh(V h_i) * sigmoid(U h_i)), and the bag is
z = sum_i softmax(a)_i h_i, logit = c^T z + b. Label: NEGATIVA 0, BAIXA/ALTA 1; one bag per patient, whole (no
windows or sampling of patches).

Training: AdamW, one bag per step in a seeded order, binary cross-entropy with the positive class weighted by
n_negative / n_positive of the training patients; `seeds` models (seed, seed+1, ...) trained alike. Selection: the
one epoch at which the mean of their probabilities has the lowest validation cross-entropy, class-balanced (each
class's mean, averaged: the footing of the weighted training loss, which the log reports the same way); the earlier
epoch on a tie. The patient model is those models at that epoch, their probabilities averaged. One model's lowest
validation loss on 7-30 patients lands on an epoch mostly by chance; the mean of several seeds is a smoother curve
and a steadier probability. Cross-entropy, a proper scoring rule, rather than validation accuracy or ROC-AUC: on a
handful of validation patients those tie across most epochs. It trains on the CPU, where a seed gives the same
weights run after run on one machine (another CPU may round differently): the bags are small, each model takes
seconds on the demo. Only training and validation labels are ever read here; test and HoldOut patients are scored,
never fitted.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import DataError
from helico import metrics

VERSION = 2  # 2: "model" holds one state dict per seed (1: a single state dict)
DEFAULTS = {"hidden": 128, "attention": 64, "dropout": 0.25, "lr": 5e-4, "weight_decay": 1e-4, "epochs": 40,
            "seeds": 5}


class GatedAttentionMIL(nn.Module):
    def __init__(self, in_dim: int, hidden: int = DEFAULTS["hidden"], attention: int = DEFAULTS["attention"],
                 dropout: float = DEFAULTS["dropout"]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.V, self.U, self.w = nn.Linear(hidden, attention), nn.Linear(hidden, attention), nn.Linear(attention, 1)
        self.head = nn.Linear(hidden, 1)

    def attend(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings h_i, raw attention scores a_i) of patch features (n, d)."""
        h = self.embed((patches - self.mean) / self.std)
        return h, self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the bag's logit, a scalar; each patch's raw attention score a_i, shape (n,))."""
        h, a = self.attend(bag)
        z = torch.softmax(a, dim=0) @ h
        return self.head(z).squeeze(-1), a


def standardization(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd of every patch feature of the training bags (no label involved); sd floored so a constant
    feature stays finite."""
    x = torch.cat([b.double() for b in bags])
    return x.mean(0).float(), x.std(0).clamp_min(1e-6).float()


def balanced_cross_entropy(probability, labels) -> float:
    """Mean cross-entropy of each class, averaged over the two classes: the training loss's footing (the positive
    class weighted n_negative / n_positive is this, up to a constant), so training and validation curves compare."""
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(labels, dtype=np.int64)
    per = np.where(y == 1, -np.log(p), -np.log1p(-p))
    return float(np.mean([per[y == c].mean() for c in (0, 1) if (y == c).any()]))


def _probabilities(net, bags) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return np.array([torch.sigmoid(net(b)[0]).item() for b in bags], dtype=np.float64)


def _train_one(train_bags, y_train, val_bags, *, seed, epochs, lr, weight_decay, hidden, attention, dropout):
    """One model: (its state after each epoch, its validation probabilities after each epoch, its training loss per
    epoch on the balanced footing)."""
    torch.manual_seed(seed)  # initial weights and dropout
    order_gen = torch.Generator().manual_seed(seed)
    net = GatedAttentionMIL(train_bags[0].shape[1], hidden, attention, dropout)
    net.mean, net.std = standardization(train_bags)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    pos_weight = torch.tensor((y_train == 0).sum() / (y_train == 1).sum(), dtype=torch.float32)
    weight = np.where(y_train == 1, float(pos_weight), 1.0)
    states, val_p, train_loss = [], [], []
    for _ in range(epochs):
        net.train()
        total = 0.0
        for i in torch.randperm(len(train_bags), generator=order_gen).tolist():
            logit, _ = net(train_bags[i])  # one bag a step
            loss = F.binary_cross_entropy_with_logits(logit, torch.tensor(float(y_train[i])), pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        train_loss.append(total / weight.sum())  # sum of weighted losses / sum of weights: the balanced mean
        val_p.append(_probabilities(net, val_bags))
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return states, np.array(val_p), np.array(train_loss)


def fit(train_bags: list[torch.Tensor], train_labels, val_bags: list[torch.Tensor], val_labels, *, seed: int = 0,
        seeds: int = DEFAULTS["seeds"], epochs: int = DEFAULTS["epochs"], lr: float = DEFAULTS["lr"],
        weight_decay: float = DEFAULTS["weight_decay"], hidden: int = DEFAULTS["hidden"],
        attention: int = DEFAULTS["attention"], dropout: float = DEFAULTS["dropout"], on_epoch=None) -> dict:
    """Train `seeds` models (seeds seed, seed+1, ...) on the training bags and keep each at the one epoch where the
    mean of their probabilities has the lowest validation cross-entropy (class-balanced, as the training loss).
    Returns {"states": [one per seed], "epoch", "records", "config"}; on_epoch(record) after each epoch."""
    y_train = np.asarray(train_labels, dtype=np.int64)
    y_val = np.asarray(val_labels, dtype=np.int64)
    if not train_bags or y_train.min() == y_train.max():
        raise DataError(f"patient model: the training patients with a bag are all one class ({len(train_bags)} "
                        f"patients, {int(y_train.sum())} infected): nothing to learn")
    if not val_bags:
        raise DataError("patient model: no validation patient has a bag to select the epoch on")
    runs = [_train_one(train_bags, y_train, val_bags, seed=seed + k, epochs=epochs, lr=lr,
                       weight_decay=weight_decay, hidden=hidden, attention=attention, dropout=dropout)
            for k in range(seeds)]
    mean_p = np.mean([r[1] for r in runs], axis=0)  # (epochs, validation patients)
    records = []
    for e in range(epochs):
        p = mean_p[e]
        record = {"epoch": e + 1, "train_loss": float(np.mean([r[2][e] for r in runs])),
                  "val_loss": balanced_cross_entropy(p, y_val),
                  "roc_auc": metrics.roc_auc(y_val, p) if 0 < y_val.sum() < y_val.size else float("nan"),
                  "accuracy": float(np.mean((p >= 0.5) == y_val))}
        records.append(record)
        if on_epoch:
            on_epoch(record)
    best = min(range(epochs), key=lambda e: (records[e]["val_loss"], e))  # the earlier epoch on a tie
    pos_weight = float((y_train == 0).sum() / (y_train == 1).sum())
    config = {"in_dim": int(train_bags[0].shape[1]), "hidden": hidden, "attention": attention, "dropout": dropout,
              "lr": lr, "weight_decay": weight_decay, "epochs": epochs, "seed": seed, "seeds": seeds,
              "pos_weight": pos_weight,
              "selection": "lowest class-balanced validation cross-entropy" +
                           (f" of the mean of {seeds} models" if seeds > 1 else "")}
    return {"states": [r[0][best] for r in runs], "epoch": best + 1, "records": records, "config": config}


# ----------------------------------------------------------------------------------------------- checkpoint
REQUIRED = ("model", "config", "patch_checkpoint", "split", "features", "bag_key", "epoch", "version")


def checkpoint(*, state, config: dict, patch_checkpoint: dict, split: dict, features: dict, bag_key: str,
               epoch: int, val_loss: float) -> dict:
    """The patient model's checkpoint: self-describing, plain values (torch.load(weights_only=True) reads it), and
    nothing a test or HoldOut label could change (no time stamp, no label counts of those parts)."""
    return {"model": state, "config": config, "patch_checkpoint": patch_checkpoint, "split": split,
            "features": features, "bag_key": bag_key, "epoch": epoch, "val_loss": val_loss, "version": VERSION}


def load_checkpoint(path) -> dict:
    if Path(path).is_dir():
        raise DataError(f"{path}: a folder, not a patient model; pass {Path(path) / 'best.pt'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path}: unreadable patient model ({type(e).__name__}); run train_patient.py again") from None
    missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise DataError(f"{path}: not a train_patient.py checkpoint (missing {', '.join(missing)})")
    return ckpt


class Ensemble(nn.Module):
    """Models of several seeds read as one: the mean of their probabilities, and of their attention weights."""

    def __init__(self, nets: list[GatedAttentionMIL]):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def attend(self, patches):
        """(None, the mean raw attention score of each patch over the models)."""
        return None, torch.stack([n.attend(patches)[1] for n in self.nets]).mean(0)

    def forward(self, bag):
        """(the logit of the mean probability; log of the mean attention weights, so softmax gives them back)."""
        outs = [n(bag) for n in self.nets]
        p = torch.stack([torch.sigmoid(logit) for logit, _ in outs]).mean(0).clamp(1e-12, 1 - 1e-12)
        weights = torch.stack([torch.softmax(a, dim=0) for _, a in outs]).mean(0)
        return torch.logit(p.double()).float(), weights.clamp_min(1e-30).log()


def from_checkpoint(ckpt: dict) -> Ensemble:
    c = ckpt["config"]
    states = ckpt["model"] if isinstance(ckpt["model"], list) else [ckpt["model"]]  # version 1: one model
    nets = []
    for state in states:
        net = GatedAttentionMIL(c["in_dim"], c["hidden"], c["attention"], c["dropout"])
        net.load_state_dict(state)
        nets.append(net)
    return Ensemble(nets).eval()


def predict(net: nn.Module, bag: torch.Tensor, extra: torch.Tensor | None = None):
    """(probability of infection, the bag's raw attention scores, raw attention scores of `extra` patches: rows the
    model does not read, e.g. Annotated windows, scored by the same attention network). NaN for an empty bag."""
    with torch.no_grad():
        if bag.shape[0] == 0:
            p, a = math.nan, torch.zeros(0)
        else:
            logit, a = net(bag.float())
            p = float(torch.sigmoid(logit))
        b = None
        if extra is not None and extra.shape[0]:
            b = net.attend(extra.float())[1].numpy()
    return p, a.numpy(), b
