"""Patchify / unpatchify and the masked reconstruction loss."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """[B, C, X, Y, Z] -> [B, N, C*px*py*pz]; N in Primus token order (C-order over the grid)."""
    B, C, X, Y, Z = x.shape
    px, py, pz = patch_size
    x = x.reshape(B, C, X // px, px, Y // py, py, Z // pz, pz)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, (X // px) * (Y // py) * (Z // pz), C * px * py * pz)


def unpatchify(p: torch.Tensor, patch_size: Sequence[int], channels: int, grid_size: Sequence[int]) -> torch.Tensor:
    """Inverse of `patchify`."""
    B = p.shape[0]
    px, py, pz = patch_size
    gx, gy, gz = grid_size
    x = p.reshape(B, gx, gy, gz, channels, px, py, pz).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(B, channels, gx * px, gy * py, gz * pz)


def patch_stats(target: torch.Tensor, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std (biased, as LayerNorm without affine; the official `patch_norm`)."""
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()
    return mean, std


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """MSE over the voxels of masked tokens only. pred/target [B, N, P]; mask bool [B, N].
    norm_pix: target is normalised per patch (mean 0, var 1) first."""
    if norm_pix:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    err = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [B, N]
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1.0)


@torch.no_grad()
def reconstruction_volumes(
    images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size, grid_size, norm_pix: bool
):
    """(masked_image, reconstruction) volumes [B, C, X, Y, Z] for pictures/metrics.
    masked_image: input with masked patches zeroed. reconstruction: prediction (de-normalised with the
    true patch statistics if norm_pix, as in the official code) in masked patches, input in visible ones."""
    target = patchify(images, patch_size)
    pred = pred.detach().to(target.dtype)
    if norm_pix:
        mean, std = patch_stats(target)
        pred = pred * std + mean
    m = mask[:, :, None]
    C = images.shape[1]
    masked = unpatchify(torch.where(m, torch.zeros_like(target), target), patch_size, C, grid_size)
    recon = unpatchify(torch.where(m, pred, target), patch_size, C, grid_size)
    return masked, recon
