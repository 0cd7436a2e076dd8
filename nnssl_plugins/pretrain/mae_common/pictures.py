"""Reconstruction pictures: rows = input / masked input / reconstruction, columns = the three
orthogonal centre slices of the 3D volume. Written as a PNG with matplotlib (Agg, no display)."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch


def _np(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu().numpy()
    return np.asarray(v, dtype=np.float32)


def save_reconstruction_png(
    path: str, image, masked_image, reconstruction, channel: int = 0, title: Optional[str] = None
) -> str:
    """image / masked_image / reconstruction: [C, X, Y, Z] (or [X, Y, Z]) of ONE sample. Returns path.
    All three use the input's intensity range. Written atomically (temp file + rename)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    vols = [_np(v) for v in (image, masked_image, reconstruction)]
    vols = [v[channel] if v.ndim == 4 else v for v in vols]
    lo, hi = float(np.percentile(vols[0], 0.5)), float(np.percentile(vols[0], 99.5))
    if hi <= lo:
        hi = lo + 1e-6
    c = [s // 2 for s in vols[0].shape]
    fig, axes = plt.subplots(3, 3, figsize=(9, 9))
    for r, (name, v) in enumerate(zip(("input", "masked input", "reconstruction"), vols)):
        slices = (v[c[0], :, :], v[:, c[1], :], v[:, :, c[2]])
        for col, (ax, s) in enumerate(zip(axes[r], slices)):
            ax.imshow(s.T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            ax.set_xticks([]); ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(f"axis {col} centre slice")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, "." + os.path.basename(path) + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def save_pictures_from_logs(path: str, images: torch.Tensor, logs: dict, sample: int = 0,
                            title: Optional[str] = None) -> str:
    """Convenience for trainers: `images` [B, C, X, Y, Z] and the logs dict returned by a method's
    `compute_loss` (needs 'masked_image' and 'reconstruction')."""
    return save_reconstruction_png(path, images[sample], logs["masked_image"][sample],
                                   logs["reconstruction"][sample], title=title)
