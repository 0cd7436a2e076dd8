"""MASS loss: soft Dice + BCE per binary mask channel (each channel is an independent binary task).

Dice is nnU-Net's `MemoryEfficientSoftDiceLoss` with a sigmoid non-linearity, `batch_dice=False`,
`do_bg=True` and a one-hot-shaped target, i.e. a soft Dice per (sample, channel), averaged over both;
BCE is `binary_cross_entropy_with_logits` averaged over all voxels and channels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nnssl_plugins.errors import UserInputError


def mass_loss(logits: torch.Tensor, target_masks: torch.Tensor, dice_weight: float = 1.0, bce_weight: float = 1.0,
              smooth: float = 1e-5) -> tuple[torch.Tensor, dict]:
    """logits, target_masks [B, K, X, Y, Z] -> (loss, {'loss','dice_loss','bce','soft_dice'} floats).

    dice_loss = 1 - mean soft Dice (nnU-Net's loss is -Dice; the +1 only shifts the value).
    """
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    if logits.shape != target_masks.shape:
        raise UserInputError(f"mass_loss: logits {tuple(logits.shape)} and target masks "
                             f"{tuple(target_masks.shape)} must have the same shape [B, K, X, Y, Z].")
    tgt = target_masks.to(torch.float32)
    dice_fn = MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid, batch_dice=False, do_bg=True,
                                          smooth=smooth, ddp=False)
    neg_dice = dice_fn(logits.float(), tgt)
    bce = F.binary_cross_entropy_with_logits(logits.float(), tgt)
    dice_loss = 1.0 + neg_dice
    loss = dice_weight * dice_loss + bce_weight * bce
    return loss, {"loss": float(loss.detach()), "dice_loss": float(dice_loss.detach()),
                  "bce": float(bce.detach()), "soft_dice": float(-neg_dice.detach())}


@torch.no_grad()
def hard_dice(logits: torch.Tensor, target_masks: torch.Tensor, threshold: float = 0.5,
              empty_value: Optional[float] = 1.0) -> torch.Tensor:
    """Per-channel hard Dice [B, K] of sigmoid(logits) > threshold (both empty -> empty_value)."""
    pred = torch.sigmoid(logits.float()) > threshold
    gt = target_masks > 0.5
    axes = tuple(range(2, logits.ndim))
    inter = (pred & gt).sum(axes).float()
    denom = pred.sum(axes).float() + gt.sum(axes).float()
    d = 2 * inter / denom.clamp_min(1)
    return torch.where(denom == 0, torch.full_like(d, empty_value), d)
