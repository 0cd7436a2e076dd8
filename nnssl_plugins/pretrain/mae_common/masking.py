"""Token masks. Convention everywhere: `mask` is bool [B, N], True = masked (hidden from the encoder).
Token order is Primus's: `rearrange(x, "b c w h d -> b (w h d) c")`, i.e. C-order over the token grid.
All masks are drawn on the CPU with an optional torch.Generator (reproducible), then moved to `device`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def random_token_mask(
    batch_size: int, num_tokens: int, mask_ratio: float, generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """Uniform random masking with exactly `num_tokens - int(num_tokens * (1 - mask_ratio))` masked tokens
    per sample (the official MAE / Hi-End-MAE count). Returns bool [B, N]."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_keep = max(1, int(num_tokens * (1 - mask_ratio)))
    noise = torch.rand(batch_size, num_tokens, generator=generator)
    order = noise.argsort(dim=1)
    mask = torch.ones(batch_size, num_tokens, dtype=torch.bool)
    mask.scatter_(1, order[:, :num_keep], False)
    return mask.to(device) if device is not None else mask


def mask_to_indices(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(keep_idx [B, K], masked_idx [B, M]) in increasing token order. All rows must mask the same count."""
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("all samples of a batch must have the same number of masked tokens")
    num_masked = int(counts[0])
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible (0) first, each in index order
    keep_idx = order[:, : mask.shape[1] - num_masked]
    masked_idx = order[:, mask.shape[1] - num_masked:]
    return keep_idx, masked_idx
