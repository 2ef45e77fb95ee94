"""Learning-rate schedules transformers' Trainer does not have, built when it asks for its scheduler.

`cosine_per_epoch` (Brinkmann et al.'s): torch's CosineAnnealingLR(T_max=epochs, eta_min=min_lr) stepped once per
epoch, so the rate is constant within an epoch: every step of epoch e (0-based) trains at
min_lr + (lr - min_lr) * (1 + cos(pi * e / epochs)) / 2. Written as a per-step LambdaLR (Trainer steps its scheduler
after every optimizer step; a resumed run restores the step count and gets the same rates)."""

from __future__ import annotations

import math

import torch


def epoch_lr(epoch: int, epochs: int, lr: float, min_lr: float) -> float:
    """The learning rate of epoch `epoch` (0-based) of `epochs`, CosineAnnealingLR's closed form."""
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def cosine_per_epoch(optimizer, num_training_steps: int, epochs: int, lr: float, min_lr: float):
    """The scheduler for a run of `num_training_steps` optimizer steps over `epochs` epochs (Trainer's count: the
    batches per epoch, after drop_last and across processes, times the epochs)."""
    per_epoch = num_training_steps // epochs
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: epoch_lr(step // per_epoch, epochs, lr, min_lr) / lr)


def scheduler_for(train: dict):
    """(optimizer, num_training_steps) -> scheduler for a config's train section whose schedule Trainer lacks, or
    None (Trainer builds its own)."""
    if train["schedule"] != "cosine_per_epoch":
        return None
    return lambda optimizer, steps: cosine_per_epoch(optimizer, steps, int(train["epochs"]), float(train["lr"]),
                                                     float(train["min_lr"]))
