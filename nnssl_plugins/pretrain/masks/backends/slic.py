"""`slic` backend (weight-free default): multi-scale 3D superpixels (MASS paper ablation, Tab. 4b).

The image is mapped to the paper's three windows (CT: soft tissue / contrast / bone HU windows after
inverting nnU-Net's normalization; MR/PET: 5-95 / 15-85 / 1-99 % quantiles) which form the three
channels of ``skimage.segmentation.slic``. SLIC runs at several scales given as mean supervoxel edge
length in mm (default 40, 25, 18 mm -> masks from organ size down to small structures), so the
number of segments follows the physical volume, not the voxel count. Each supervoxel becomes one
mask after the shared post-processing (largest connected component, min volume, IoU>0.9 dedup).
Supervoxels that are mostly outside the body are dropped (CT: mean < -900 HU; any modality:
mostly outside nnU-Net's nonzero crop, seg == -1).

Deterministic for a seed (SLIC itself is deterministic; the seed drives the dedup choice).
Cost: ~3 s per scale for 3 Mvoxels on one core (max_num_iter 5).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
from scipy import ndimage

from nnssl_plugins.pretrain.masks.backends import CaseInput
from nnssl_plugins.pretrain.masks.postprocess import clean_mask, deduplicate
from nnssl_plugins.pretrain.masks.store import CroppedMask
from nnssl_plugins.pretrain.masks.windows import three_windows


class SlicBackend:
    name = "slic"

    def __init__(self, scales_mm: Sequence[float] = (40.0, 25.0, 18.0), compactness: float = 1.0,
                 max_num_iter: int = 5, min_volume: int = 1000, iou_dedup: float = 0.9, seed: int = 0,
                 background_hu: float = -900.0):
        self.scales_mm = [float(s) for s in scales_mm]
        self.compactness = float(compactness)
        self.max_num_iter = int(max_num_iter)
        self.min_volume = int(min_volume)
        self.iou_dedup = float(iou_dedup)
        self.seed = int(seed)
        self.background_hu = float(background_hu)
        self.params = {"scales_mm": self.scales_mm, "compactness": self.compactness,
                       "max_num_iter": self.max_num_iter, "min_volume": self.min_volume,
                       "iou_dedup": self.iou_dedup, "seed": self.seed, "background_hu": self.background_hu,
                       "channels": "3 windows (CT HU windows / MR quantiles)"}

    def generate(self, case: CaseInput) -> List[CroppedMask]:
        from skimage.segmentation import slic

        x = case.image[0]
        outside = (case.seg[0] < 0) if case.seg is not None else None
        fg = None if outside is None else ~outside
        if float(x.max()) - float(x.min()) < 1e-6:
            return []  # constant image: no structure -> zero masks (valid outcome)
        chans = np.stack(three_windows(x, case.hu_inverse, fg), axis=-1)
        volume_mm3 = float(np.prod(x.shape)) * float(np.prod(case.spacing))
        hu = None
        if case.hu_inverse is not None:
            hu = x * case.hu_inverse["std"] + case.hu_inverse["mean"]
        masks: List[CroppedMask] = []
        for s_mm in self.scales_mm:
            n_seg = max(2, int(round(volume_mm3 / s_mm ** 3)))
            lab = slic(chans, n_segments=n_seg, compactness=self.compactness, channel_axis=-1,
                       spacing=np.asarray(case.spacing, dtype=float), start_label=1,
                       max_num_iter=self.max_num_iter, enforce_connectivity=True)
            # per-supervoxel statistics in one pass (vectorized) to drop background supervoxels
            flat = lab.ravel()
            cnt = np.bincount(flat)
            bad = np.zeros(cnt.shape, dtype=bool)
            if hu is not None:
                mean_hu = np.bincount(flat, weights=hu.ravel()) / np.maximum(cnt, 1)
                bad |= mean_hu < self.background_hu
            if outside is not None:
                bad |= np.bincount(flat, weights=outside.ravel()) / np.maximum(cnt, 1) > 0.5
            bad |= cnt < self.min_volume
            for k, sl in enumerate(ndimage.find_objects(lab)):
                if sl is None or bad[k + 1]:
                    continue
                crop = lab[sl] == k + 1
                off = [s.start for s in sl]
                # SLIC's enforce_connectivity makes supervoxels connected: no CC pass needed
                m = clean_mask(crop, self.min_volume, offset=off, keep_largest=False,
                               meta={"source": f"slic:{s_mm:g}mm", "score": 1.0})
                if m is not None:
                    masks.append(m)
        return deduplicate(masks, self.iou_dedup, self.seed)
