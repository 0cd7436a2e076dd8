"""Reconstruction metrics: PSNR and 3D SSIM (Gaussian window, sigma 1.5, 11^3 window, K1 0.01, K2 0.03;
'valid' filtering = skimage.metrics.structural_similarity(gaussian_weights=True,
use_sample_covariance=False, data_range=...) in 3D). LPIPS is not available offline."""
from __future__ import annotations


import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """10 log10(R^2 / MSE) over all elements (inf when identical)."""
    mse = F.mse_loss(pred.float(), target.float())
    return 10.0 * torch.log10(torch.tensor(float(data_range) ** 2) / mse)


def _gauss(sigma: float, win: int, device) -> torch.Tensor:
    x = torch.arange(win, dtype=torch.float64, device=device) - (win - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filt(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    w = g.numel()
    x = F.conv3d(x, g.view(1, 1, w, 1, 1))
    x = F.conv3d(x, g.view(1, 1, 1, w, 1))
    return F.conv3d(x, g.view(1, 1, 1, 1, w))


def ssim3d(pred: torch.Tensor, target: torch.Tensor, data_range: float, sigma: float = 1.5,
           win_size: int = None, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM of 3D volumes [X, Y, Z], [C, X, Y, Z] or [B, C, X, Y, Z] (channels averaged)."""
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch {tuple(pred.shape)} vs {tuple(target.shape)}")
    x, y = pred.double(), target.double()
    while x.ndim < 5:
        x, y = x[None], y[None]
    B, C = x.shape[:2]
    x, y = x.reshape(B * C, 1, *x.shape[2:]), y.reshape(B * C, 1, *y.shape[2:])
    if win_size is None:
        win_size = 2 * int(3.5 * sigma + 0.5) + 1  # skimage's truncate=3.5 -> 11 for sigma 1.5
    if min(x.shape[2:]) < win_size:
        raise ValueError(f"volume {tuple(x.shape[2:])} smaller than the SSIM window {win_size}")
    g = _gauss(sigma, win_size, x.device)
    mx, my = _filt(x, g), _filt(y, g)
    vx = _filt(x * x, g) - mx * mx
    vy = _filt(y * y, g) - my * my
    cxy = _filt(x * y, g) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean().float()
