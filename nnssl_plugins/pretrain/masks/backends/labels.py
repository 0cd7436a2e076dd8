"""`labels` backend: masks from existing label maps (e.g. model outputs or reference labels).

Reads nnU-Net's preprocessed segmentation ``<case>_seg.b2nd`` (same grid as the image), so each
mask equals nnU-Net's own preprocessed segmentation of its label voxel-exactly. One mask per label
value > 0; with ``components=True`` additionally one mask per connected component (6-connectivity)
of each label with at least ``min_volume`` voxels. Label masks are never filtered (min_volume only
applies to components) and not deduplicated.
"""
from __future__ import annotations

from typing import List

import numpy as np
from scipy import ndimage

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.masks.backends import CaseInput
from nnssl_plugins.pretrain.masks.postprocess import _STRUCT
from nnssl_plugins.pretrain.masks.store import CroppedMask, bbox_slices


class LabelsBackend:
    name = "labels"

    def __init__(self, components: bool = False, min_volume: int = 1000, seed: int = 0):
        self.components = bool(components)
        self.min_volume = int(min_volume)
        self.params = {"components": self.components, "min_volume": self.min_volume,
                       "source": "nnU-Net preprocessed <case>_seg.b2nd"}

    def generate(self, case: CaseInput) -> List[CroppedMask]:
        if case.seg is None:
            raise UserInputError(
                f"{case.case_id}: no preprocessed segmentation (<case>_seg.b2nd) found; the labels backend needs a "
                "labeled dataset (labelsTr). Use --backend slic or sam2 for unlabeled data.")
        seg = np.asarray(case.seg[0])
        out: List[CroppedMask] = []
        objs = ndimage.find_objects(np.where(seg > 0, seg, 0).astype(np.int32))
        for lab_minus1, sl in enumerate(objs):
            if sl is None:
                continue
            lab = lab_minus1 + 1
            crop = seg[sl] == lab
            bb = [v for s in sl for v in (s.start, s.stop)]
            out.append(CroppedMask(bb, crop, {"source": f"label:{lab}", "voxels": int(crop.sum()), "score": 1.0}))
            if self.components:
                cc, n = ndimage.label(crop, structure=_STRUCT)
                if n > 1:
                    for k, csl in enumerate(ndimage.find_objects(cc)):
                        c = cc[csl] == k + 1
                        v = int(c.sum())
                        if v < self.min_volume:
                            continue
                        cbb = [bb[2 * i] + csl[i].start if j == 0 else bb[2 * i] + csl[i].stop
                               for i in range(3) for j in range(2)]
                        out.append(CroppedMask(cbb, c, {"source": f"label:{lab}:cc{k + 1}", "voxels": v, "score": 1.0}))
        return out
