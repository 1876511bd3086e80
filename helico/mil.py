"""The patient model: gated-attention multiple-instance learning (Ilse, Tomczak & Welling, 2018) over a patient's bag
of patch features (bags.py), its training, and its checkpoint schema (runs/<id>/patient/best.pt).

    net = mil.GatedAttentionMIL(in_dim=512)
    logit, attention = net(bag)                      # bag: float32 (n, d); attention: one raw score per patch
    state = mil.fit(train_bags, train_labels, val_bags, val_labels, seed=0, epochs=40)
    probability, attention = mil.predict(ckpt, bag)

Model: each patch feature x_i is standardized (mean and sd of the training bags' patches), embedded
h_i = ReLU(W x_i) (dropout in training), scored a_i = w^T (tanh(V h_i) * sigmoid(U h_i)), and the bag is
z = sum_i softmax(a)_i h_i, logit = c^T z + b. Label: NEGATIVA 0, BAIXA/ALTA 1; one bag per patient, whole (no
windows or sampling of patches).

Training: AdamW, one bag per step in a seeded order, binary cross-entropy with the positive class weighted by
n_negative / n_positive of the training patients. Selection: the epoch with the lowest validation cross-entropy
(unweighted mean over the validation patients; the earlier epoch on a tie). Cross-entropy, a proper scoring rule,
rather than validation accuracy or ROC-AUC: on a handful of validation patients those tie across most epochs and
would pick by chance. It trains on the CPU, where a seed gives the same weights run after run on one machine (another
CPU may round differently): the bags are small, a fold of the real dataset's size takes well under a minute.
Only training and validation labels are ever read here; test and HoldOut patients are scored, never fitted.
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

VERSION = 1
DEFAULTS = {"hidden": 128, "attention": 64, "dropout": 0.25, "lr": 5e-4, "weight_decay": 1e-4, "epochs": 40}


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


def _losses(net, bags, labels) -> np.ndarray:
    """Per-bag cross-entropy and probability, in eval mode."""
    net.eval()
    out = []
    with torch.no_grad():
        for b, y in zip(bags, labels):
            logit, _ = net(b)
            out.append((F.binary_cross_entropy_with_logits(logit, torch.tensor(float(y))).item(),
                        torch.sigmoid(logit).item()))
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def fit(train_bags: list[torch.Tensor], train_labels, val_bags: list[torch.Tensor], val_labels, *, seed: int = 0,
        epochs: int = DEFAULTS["epochs"], lr: float = DEFAULTS["lr"], weight_decay: float = DEFAULTS["weight_decay"],
        hidden: int = DEFAULTS["hidden"], attention: int = DEFAULTS["attention"],
        dropout: float = DEFAULTS["dropout"], on_epoch=None) -> dict:
    """Train on the training bags, keep the epoch of lowest validation cross-entropy. Returns {"state", "epoch",
    "records", "config"}; on_epoch(record) is called after each epoch (a progress line, the log)."""
    y_train = np.asarray(train_labels, dtype=np.int64)
    y_val = np.asarray(val_labels, dtype=np.int64)
    if not train_bags or y_train.min() == y_train.max():
        raise DataError(f"patient model: the training patients with a bag are all one class ({len(train_bags)} "
                        f"patients, {int(y_train.sum())} infected): nothing to learn")
    if not val_bags:
        raise DataError("patient model: no validation patient has a bag to select the epoch on")
    torch.manual_seed(seed)  # initial weights and dropout
    order_gen = torch.Generator().manual_seed(seed)
    net = GatedAttentionMIL(train_bags[0].shape[1], hidden, attention, dropout)
    net.mean, net.std = standardization(train_bags)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    pos_weight = torch.tensor((y_train == 0).sum() / (y_train == 1).sum(), dtype=torch.float32)
    best, records = None, []
    for epoch in range(1, epochs + 1):
        net.train()
        total = 0.0
        for i in torch.randperm(len(train_bags), generator=order_gen).tolist():
            logit, _ = net(train_bags[i])  # one bag a step
            loss = F.binary_cross_entropy_with_logits(logit, torch.tensor(float(y_train[i])), pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        val = _losses(net, val_bags, y_val)
        record = {"epoch": epoch, "train_loss": total / len(train_bags), "val_loss": float(val[:, 0].mean()),
                  "roc_auc": metrics.roc_auc(y_val, val[:, 1]) if 0 < y_val.sum() < y_val.size
                  else float("nan"),
                  "accuracy": float(np.mean((val[:, 1] >= 0.5) == y_val))}
        records.append(record)
        if best is None or record["val_loss"] < best["val_loss"]:
            best = {"val_loss": record["val_loss"], "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in net.state_dict().items()}}
        if on_epoch:
            on_epoch(record)
    config = {"in_dim": int(train_bags[0].shape[1]), "hidden": hidden, "attention": attention, "dropout": dropout,
              "lr": lr, "weight_decay": weight_decay, "epochs": epochs, "seed": seed,
              "pos_weight": float(pos_weight), "selection": "lowest validation cross-entropy"}
    return {"state": best["state"], "epoch": best["epoch"], "records": records, "config": config}


# ----------------------------------------------------------------------------------------------- checkpoint
REQUIRED = ("model", "config", "patch_checkpoint", "split", "features", "bag_key", "epoch", "version")


def checkpoint(*, state: dict, config: dict, patch_checkpoint: dict, split: dict, features: dict, bag_key: str,
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


def from_checkpoint(ckpt: dict) -> GatedAttentionMIL:
    c = ckpt["config"]
    net = GatedAttentionMIL(c["in_dim"], c["hidden"], c["attention"], c["dropout"])
    net.load_state_dict(ckpt["model"])
    return net.eval()


def predict(net: GatedAttentionMIL, bag: torch.Tensor, extra: torch.Tensor | None = None):
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
