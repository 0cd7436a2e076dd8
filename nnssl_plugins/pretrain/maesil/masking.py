"""MAESIL dual masking and the S-I axis helper.

Dual mask on the token grid (True = masked), for one sample with S-I grid axis `a`:
  * axis-wise: a contiguous block of round(axis_ratio * G_a) token slices along `a` (start uniform over
    all valid positions) is masked entirely;
  * plane-wise: inside EVERY 2D plane perpendicular to `a` (one token slice), exactly
    round(plane_ratio * plane_size) tokens, chosen uniformly at random, are masked.
  The union is the mask. With the defaults (0.75, 0.5) the overall mask ratio is 1 - 0.5 * 0.25 = 87.5 %
  and every sample has the same number of visible tokens (required for a batched visible-only encoder).
  The paper also quotes "a total masking ratio of 75 %", which is inconsistent with 50 % slices + 75 % per
  plane; both ratios are parameters (method['plane_mask_ratio'], method['axis_mask_ratio']).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from nnssl_plugins.errors import UserInputError


def dual_mask(batch_size: int, grid_size: Sequence[int], si_axis, plane_ratio: float = 0.75,
              axis_ratio: float = 0.5, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """bool [B, N] (True = masked), N in Primus token order. si_axis: int (0..2, the S-I axis of the token
    grid = of the preprocessed array's spatial axes) or one int per sample."""
    grid = [int(g) for g in grid_size]
    axes = [int(si_axis)] * batch_size if np.isscalar(si_axis) else [int(a) for a in si_axis]
    if len(axes) != batch_size or any(a not in (0, 1, 2) for a in axes):
        raise UserInputError(f"si_axis={si_axis}: must be 0, 1 or 2 (spatial axis) or one such value per sample.")
    masks = []
    for a in axes:
        ga = grid[a]
        other = [g for i, g in enumerate(grid) if i != a]
        plane = other[0] * other[1]
        n_plane_mask = int(round(plane_ratio * plane))
        n_axis_mask = int(round(axis_ratio * ga))
        # plane-wise: per slice, exact count
        noise = torch.rand(ga, plane, generator=generator)
        ranks = noise.argsort(dim=1).argsort(dim=1)
        m = ranks < n_plane_mask  # [ga, plane]
        # axis-wise: contiguous block
        start = int(torch.randint(0, ga - n_axis_mask + 1, (1,), generator=generator))
        m[start:start + n_axis_mask] = True
        m = m.reshape(ga, *other)
        m = torch.movedim(m, 0, a)  # back to grid layout
        masks.append(m.reshape(-1))
    counts = {int(x.sum()) for x in masks}
    if len(counts) != 1:
        raise UserInputError(
            f"si_axis per sample {axes} gives different visible-token counts on the non-cubic token grid {grid}; "
            "use one S-I axis per batch or a cubic patch size.")
    out = torch.stack(masks)
    return out.to(device) if device is not None else out


def find_si_axis(direction_matrix, transpose_forward: Sequence[int] = (0, 1, 2)) -> int:
    """Spatial axis (0..2) of the *preprocessed* nnU-Net array that runs along the world
    superior-inferior axis.

    Convention: `direction_matrix` is SimpleITK's `image.GetDirection()` (9 values, row-major 3x3; column j =
    world (LPS) direction of ITK index axis j = x, y, z), as nnU-Net stores it in
    properties['sitk_stuff']['direction']. nnU-Net's SimpleITKIO returns arrays in (z, y, x) order (and
    spacing reversed), so array axis k is ITK index axis 2 - k. The preprocessor then transposes the
    spatial axes with plans['transpose_forward'] (new axis i = old axis transpose_forward[i]).
    World S-I is LPS axis 2; we take the index axis whose direction has the largest |S component|.
    """
    d = np.asarray(direction_matrix, dtype=float)
    if d.size != 9:
        raise UserInputError(
            f"direction matrix {list(d.ravel())}: need the 9 values of a 3D SimpleITK direction (2D data is not "
            "supported by MAESIL).")
    d = d.reshape(3, 3)
    itk_axis = int(np.argmax(np.abs(d[2, :])))
    array_axis = 2 - itk_axis
    tf = [int(i) for i in transpose_forward]
    if sorted(tf) != [0, 1, 2]:
        raise UserInputError(f"transpose_forward={tf}: must be a permutation of [0, 1, 2].")
    return tf.index(array_axis)
