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

Presets: the official MASS mask generation (``generate_masks.py: DATASET_CONFIGS``) names one
enhancement per dataset profile; ``CT_WINDOW_PRESETS`` / ``QUANTILE_PRESETS`` carry the same names and
values (``abdomen_ct`` / ``abdomen_mr`` are the paper's defaults). The official ``autopet_suv`` profile
windows raw SUV values, which nnU-Net's per-image z-score cannot be inverted to, so it is not offered.
``resolve_windows`` accepts a preset name or three explicit pairs.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnssl_plugins.errors import UserInputError

CT_WINDOWS: Tuple[Tuple[float, float], ...] = ((60.0, 350.0), (15.0, 250.0), (150.0, 1200.0))  # (center, width) HU
MR_QUANTILES: Tuple[Tuple[float, float], ...] = ((5.0, 95.0), (15.0, 85.0), (1.0, 99.0))

# (center, width) HU per official dataset profile
CT_WINDOW_PRESETS: Dict[str, Tuple[Tuple[float, float], ...]] = {
    "abdomen_ct": CT_WINDOWS,
    "totalseg_ct": CT_WINDOWS,
    "lits": CT_WINDOWS,
    "chest_ct": ((-600.0, 1500.0), (50.0, 350.0), (500.0, 2000.0)),       # lung, mediastinum, bone
    "autopet_ct": ((-600.0, 1500.0), (50.0, 350.0), (700.0, 2500.0)),
    "structseg_head_oar": ((90.0, 300.0), (55.0, 120.0), (600.0, 3000.0)),  # vascular, narrow head, temporal bone
}
# (lower, upper) percentiles per official dataset profile (MR; also used for PET here)
QUANTILE_PRESETS: Dict[str, Tuple[Tuple[float, float], ...]] = {
    "abdomen_mr": MR_QUANTILES,
    "cardiac_mr": MR_QUANTILES,
    "totalseg_mr": MR_QUANTILES,
    "brain_mr": ((1.0, 99.0), (5.0, 95.0), (10.0, 90.0)),
}

WindowSpec = Union[str, Sequence[Sequence[float]]]


def resolve_windows(spec: WindowSpec, kind: str, option: str) -> Tuple[Tuple[float, float], ...]:
    """A preset name or three (a, b) pairs -> three float pairs. `kind` is "ct" ((center, width) HU) or
    "quantile" ((lower, upper) percentiles); `option` names the user option in error messages."""
    presets = CT_WINDOW_PRESETS if kind == "ct" else QUANTILE_PRESETS
    if isinstance(spec, str):
        if spec not in presets:
            raise UserInputError(f"{option} {spec!r}: unknown preset. Choose one of: {', '.join(presets)}, "
                                 "or give three explicit pairs.")
        return presets[spec]
    what = "[center, width] HU" if kind == "ct" else "[lower, upper] percentiles"
    try:
        pairs = tuple((float(a), float(b)) for a, b in spec)
    except (TypeError, ValueError):
        pairs = ()
    if len(pairs) != 3:
        raise UserInputError(f"{option} {spec!r}: expected a preset name or three {what} pairs "
                             "(SAM2 takes three channels).")
    for a, b in pairs:
        if kind == "ct" and b <= 0:
            raise UserInputError(f"{option} {spec!r}: window width must be > 0.")
        if kind != "ct" and not 0 <= a < b <= 100:
            raise UserInputError(f"{option} {spec!r}: percentiles need 0 <= lower < upper <= 100.")
    return pairs


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
