"""MDAE loss: λm · MSE over masked voxels + λv · w(σ) · MSE over visible voxels, both against the clean input."""
from __future__ import annotations

import torch

from nnssl_plugins.pretrain.mdae.corruption import Corrupted


def visible_weight(sigma: torch.Tensor, sigma_data: float = 1.0, w_max: float = 100.0) -> torch.Tensor:
    """w(σ) = (σ² + σ_d²) / (σ² σ_d²): the inverse MMSE of denoising a unit-variance (z-scored) signal at
    noise σ (EDM's λ(σ)). An ideal denoiser then scores ≈1 at every noise level, so each level contributes
    equally — what the paper asks of w(σ). Capped at w_max (σ ≲ 0.1) so t → 0 cannot blow up the loss."""
    s2 = sigma.float().pow(2)
    return ((s2 + sigma_data ** 2) / (s2 * sigma_data ** 2).clamp_min(1e-12)).clamp(max=w_max)


def mdae_loss(pred: torch.Tensor, x0: torch.Tensor, c: Corrupted, lambda_masked: float = 1.0,
              lambda_visible: float = 1.0, w_max: float = 100.0):
    """λm · MSE over masked voxels + λv · w(σ) · MSE over visible voxels, both against the clean x0.
    Means are per sample over that sample's masked/visible voxels, then averaged over the batch."""
    err = (pred.float() - x0.float()).pow(2)
    dims = tuple(range(1, x0.ndim))
    vis = c.visible.float()
    msk = 1.0 - vis
    n_m = msk.sum(dims)
    n_v = vis.sum(dims)
    l_m = (err * msk).sum(dims) / n_m.clamp_min(1)
    l_v = (err * vis).sum(dims) / n_v.clamp_min(1)
    w = visible_weight(c.sigma, w_max=w_max)
    has_m, has_v = (n_m > 0).float(), (n_v > 0).float()
    loss = lambda_masked * (l_m * has_m).mean() + lambda_visible * (w * l_v * has_v).mean()
    return loss, {"loss_masked": float((l_m * has_m).mean().detach()),
                  "loss_visible": float((l_v * has_v).mean().detach())}
