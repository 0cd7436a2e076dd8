"""Intensity windows for mask generation, computed on the *preprocessed* (normalized) image.

The mask grid is nnU-Net's preprocessed grid, whose intensities are already normalized. For CT the
paper's windows are defined in HU, so we invert the normalization recorded in the plans:

* ``CTNormalization`` (stock, and any scheme whose name contains "CT"): nnU-Net clipped HU to
  ``[percentile_00_5, percentile_99_5]`` of the dataset foreground and then computed
  ``(HU - mean) / std`` with ``mean``/``std`` from ``foreground_intensity_properties_per_channel``.
  So ``HU = x * std + mean`` holds exactly inside the clip range; values outside it were clipped,
  i.e. anything below/above the clip bounds reads as the bound (e.g. air reads as ~-1000 or the
  lower percentile) -- this only affects the saturated ends of the windows.
  If the configuration stores explicit ``nnssl_ct_clip``/``nnssl_ct_mean``/``nnssl_ct_std``
  (``configurations[c]['nnssl_intensity'][channel]``), these are used instead.
* anything else (MR/PET, z-score per image): quantile windows are invariant to the affine
  normalization, so they are computed directly on the preprocessed values.

Windows return float32 arrays in [0, 1].
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

CT_WINDOWS: Tuple[Tuple[float, float], ...] = ((60.0, 350.0), (15.0, 250.0), (150.0, 1200.0))  # (center, width) HU
MR_QUANTILES: Tuple[Tuple[float, float], ...] = ((5.0, 95.0), (15.0, 85.0), (1.0, 99.0))


def hu_inverse_params(plans: dict, configuration: str, channel: int = 0) -> Optional[Dict[str, float]]:
    """{'mean','std','lo','hi'} to map normalized values back to HU, or None if the channel is not CT."""
    cfg = plans["configurations"][configuration]
    # resolve inherited configurations
    while "normalization_schemes" not in cfg and "inherits_from" in cfg:
        cfg = {**plans["configurations"][cfg["inherits_from"]], **{k: v for k, v in cfg.items() if k != "inherits_from"}}
    schemes = cfg.get("normalization_schemes", [])
    scheme = schemes[channel] if channel < len(schemes) else ""
    custom = (cfg.get("nnssl_intensity") or {}).get(str(channel))
    if custom and all(k in custom for k in ("mean", "std")):
        lo, hi = custom.get("clip", [-np.inf, np.inf])
        return {"mean": float(custom["mean"]), "std": float(custom["std"]), "lo": float(lo), "hi": float(hi)}
    if "CT" not in scheme:
        return None
    props = plans["foreground_intensity_properties_per_channel"][str(channel)]
    return {"mean": float(props["mean"]), "std": max(float(props["std"]), 1e-8),
            "lo": float(props.get("percentile_00_5", -np.inf)), "hi": float(props.get("percentile_99_5", np.inf))}


def to_hu(x: np.ndarray, inv: Dict[str, float]) -> np.ndarray:
    return x.astype(np.float32) * np.float32(inv["std"]) + np.float32(inv["mean"])


def ct_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    lo, hi = center - width / 2.0, center + width / 2.0
    return np.clip((hu - lo) / (hi - lo), 0, 1).astype(np.float32)


def quantile_window(x: np.ndarray, q_lo: float, q_hi: float, fg: Optional[np.ndarray] = None) -> np.ndarray:
    vals = x[fg] if fg is not None and fg.any() else x
    lo, hi = np.percentile(vals, [q_lo, q_hi])
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0, 1).astype(np.float32)


def three_windows(x: np.ndarray, inv: Optional[Dict[str, float]], fg: Optional[np.ndarray] = None,
                  ct_windows: Sequence[Tuple[float, float]] = CT_WINDOWS,
                  quantiles: Sequence[Tuple[float, float]] = MR_QUANTILES) -> List[np.ndarray]:
    """The paper's three channels: CT windows (inv given) or MR/PET quantile windows."""
    if inv is not None:
        hu = to_hu(x, inv)
        return [ct_window(hu, c, w) for c, w in ct_windows]
    return [quantile_window(x, a, b, fg) for a, b in quantiles]
