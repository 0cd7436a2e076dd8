"""MDAE dual corruption: diffusion noise on the whole volume, then 16³ block masking (zeroed).

Per sample: t ~ U(0, 1). Per sample *and channel*: p_mask ~ U(p_min, p_max) (or a fixed ratio) and an
independent block mask — the paper corrupts multi-channel inputs per channel.
  VE   (paper default): x_t = x0 + σ_t z,  σ_t = t · σ_max   (σ_max = 5, authors' side code)
  flow (authors' main model): x_t = (1 − t) x0 + t z
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass
class Corrupted:
    x_in: torch.Tensor        # network input  (B, C, X, Y, Z)
    t: torch.Tensor           # (B,) diffusion time in [0, 1]
    visible: torch.Tensor     # (B, C, X, Y, Z) bool, True where the block is kept
    sigma: torch.Tensor       # (B,) effective noise std relative to the signal (for loss weighting)


def block_mask(shape: Sequence[int], block: int, ratio: torch.Tensor, generator: Optional[torch.Generator] = None,
               device=None) -> torch.Tensor:
    """Boolean *visible* mask (B, C, *spatial): each block×block×block block is dropped with prob `ratio[b, c]`."""
    b, c, *spatial = shape
    grid = [-(-s // block) for s in spatial]  # ceil: partial border blocks are blocks too
    u = torch.rand((b, c, *grid), generator=generator, device=device)
    keep = (u >= ratio.view(b, c, *([1] * len(grid)))).float()
    keep = F.interpolate(keep, scale_factor=block, mode="nearest") if len(grid) == 3 else keep
    return keep[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)].bool()


def corrupt(x0: torch.Tensor, corruption: str = "ve", sigma_max: float = 5.0, block: int = 16,
            mask_ratio: Optional[float] = None, p_min: float = 0.01, p_max: float = 0.99,
            generator: Optional[torch.Generator] = None) -> Corrupted:
    b, c = x0.shape[:2]
    dev = x0.device
    t = torch.rand((b,), generator=generator, device=dev)
    z = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    tb = t.view(b, *([1] * (x0.ndim - 1)))
    if corruption == "ve":
        xt = x0 + (tb * sigma_max) * z
        sigma = t * sigma_max
    elif corruption == "flow":
        xt = (1 - tb) * x0 + tb * z
        sigma = t / (1 - t).clamp_min(1e-4)  # noise-to-signal ratio of the flow path
    else:
        raise ValueError(f"unknown corruption {corruption!r} (use 've' or 'flow')")
    if mask_ratio is None:
        ratio = p_min + (p_max - p_min) * torch.rand((b, c), generator=generator, device=dev)
    else:
        ratio = torch.full((b, c), float(mask_ratio), device=dev)
    visible = block_mask(x0.shape, block, ratio, generator=generator, device=dev)
    return Corrupted(x_in=xt * visible, t=t, visible=visible, sigma=sigma)
