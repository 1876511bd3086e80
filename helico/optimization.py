"""One optimization step and what it steps: AdamW, its warmup-cosine schedule and the GradScaler.

train.py's loop and tools/bench.py's model_step, loop and loop_loader stages call the same train_step on what the same
build returns, so the benchmark times exactly the step training runs. The precision rule is model.precision's, the
input model.model_input's.

    opt, sched, scaler = optimization.build(net, 3e-4, 0.01, total_steps=1000, precision=p)
    loss, loss_sum, kept = optimization.train_step(net, x, labels, p, opt, sched, scaler, pos_weight)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import common


WARMUP_SHARE = 20  # linear warmup over the first 1/20 (5%) of the steps, then cosine decay to 0


def build(net, lr: float, weight_decay: float, total_steps: int, precision):
    """(AdamW over net's parameters, its warmup-cosine LambdaLR, the GradScaler `precision` needs: on with fp16)."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, total_steps // WARMUP_SHARE)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps)))))
    return opt, sched, torch.amp.GradScaler(precision.device_type, enabled=precision.grad_scaling)


def train_step(net, x, labels, precision, opt, sched, scaler, pos_weight=None):
    """One step on a prepared batch: (mean loss, summed loss, kept samples), all on the device (no host sync).
    Labels common.BAD (undecodable patches, --skip-bad-images) weigh nothing."""
    # forward under the precision rule
    with precision.autocast():
        logits = net(x).squeeze(1)
    # loss in float32, the positive class weighted against the imbalance
    keep = (labels != common.BAD).float()
    losses = keep * F.binary_cross_entropy_with_logits(logits.float(), labels.clamp(min=0).float(),
                                                       pos_weight=pos_weight, reduction="none")
    loss = losses.sum() / keep.sum().clamp(min=1)
    # backward through the scaler (a no-op without fp16), then the optimizer and the schedule
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return loss.detach(), losses.sum().detach(), keep.sum()
