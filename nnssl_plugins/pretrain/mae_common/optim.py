"""AdamW + linear warm-up / cosine schedule for MAE pretraining (Hi-End-MAE: lr 1e-4,
betas (0.9, 0.95), wd 0.05). The scheduler has nnU-Net's PolyLRScheduler API: `step(current_step)`
once per epoch (or without argument: internal counter)."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch.optim.lr_scheduler import _LRScheduler

NO_DECAY_NAMES = ("pos_embed", "mask_token", "register_tokens")


class WarmupCosineLRScheduler(_LRScheduler):
    """lr(s) = initial_lr * (s + 1) / warmup_steps for s < warmup_steps, then
    min_lr + (initial_lr - min_lr) * 0.5 * (1 + cos(pi * (s - warmup) / (max_steps - warmup)))."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int = 0,
                 min_lr: float = 0.0, current_step: int = None):
        self.optimizer = optimizer
        self.initial_lr = float(initial_lr)
        self.max_steps = int(max_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.initial_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        new_lr = self.lr_at(int(current_step))
        for g in self.optimizer.param_groups:
            g["lr"] = new_lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay for biases, norm weights (ndim <= 1), positional embeddings and tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def configure_optimizer(model: torch.nn.Module, num_epochs: int, warmup_epochs: int, lr: float = 1e-4,
                        weight_decay: float = 0.05, betas=(0.9, 0.95), min_lr: float = 0.0
                        ) -> Tuple[torch.optim.Optimizer, WarmupCosineLRScheduler]:
    """(AdamW, WarmupCosineLRScheduler). Call `scheduler.step(epoch)` at the start of every epoch."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas))
    sched = WarmupCosineLRScheduler(opt, lr, num_epochs, warmup_epochs, min_lr=min_lr)
    return opt, sched
