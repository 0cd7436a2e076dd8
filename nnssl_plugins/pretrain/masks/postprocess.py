"""3D mask post-processing shared by all backends (MASS paper, Supp. 6.1 "Post-Processing").

1. connected components: keep the largest component that intersects the seed slice (SAM2) /
   the largest component (other backends, seed slice unknown);
2. minimum volume (official: 1000 voxels);
3. redundancy reduction: for every pair with IoU > 0.9 one is dropped at random (seeded):
   masks are visited in a seeded random order and a mask is kept only if its IoU with every
   already-kept mask is <= the threshold.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from scipy import ndimage

from nnssl_plugins.pretrain.masks.store import CroppedMask, bbox_of, bbox_slices

_STRUCT = ndimage.generate_binary_structure(3, 1)  # 6-connectivity


def largest_component(mask: np.ndarray, seed_axis: int = -1, seed_slice: int = -1) -> np.ndarray:
    """Largest 6-connected component; if a seed slice is given, only components touching it count."""
    lab, n = ndimage.label(mask, structure=_STRUCT)
    if n <= 1:
        if n == 1 and seed_axis >= 0:
            if not np.take(lab, seed_slice, axis=seed_axis).any():
                return np.zeros_like(mask, dtype=bool)
        return lab > 0
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    counts[0] = 0
    if seed_axis >= 0:
        touching = np.unique(np.take(lab, seed_slice, axis=seed_axis))
        allowed = np.zeros(n + 1, dtype=bool)
        allowed[touching] = True
        allowed[0] = False
        counts = np.where(allowed, counts, 0)
    if counts.max() == 0:
        return np.zeros_like(mask, dtype=bool)
    return lab == int(np.argmax(counts))


def clean_mask(mask: np.ndarray, min_volume: int, seed_axis: int = -1, seed_slice: int = -1,
               keep_largest: bool = True, meta=None, offset=(0, 0, 0)) -> Optional[CroppedMask]:
    """Bool mask (full grid, or a crop whose corner sits at `offset`) -> CroppedMask after CC
    filtering + min volume, or None if rejected. `seed_slice` is in full-grid coordinates.
    """
    bb = bbox_of(mask)
    if bb is None:
        return None
    bb = [bb[2 * i + j] + int(offset[i]) for i in range(3) for j in range(2)]
    sl = tuple(slice(bb[2 * i] - int(offset[i]), bb[2 * i + 1] - int(offset[i])) for i in range(3))
    crop = mask[sl]
    if keep_largest:
        if seed_axis >= 0:
            lo = bb[2 * seed_axis]
            if not (lo <= seed_slice < bb[2 * seed_axis + 1]):
                return None
            crop = largest_component(crop, seed_axis, seed_slice - lo)
        else:
            crop = largest_component(crop)
    v = int(np.count_nonzero(crop))
    if v == 0 or v < min_volume:
        return None
    inner = bbox_of(crop)
    crop = crop[bbox_slices(inner)]
    new_bb = [bb[2 * i] + inner[2 * i + j] for i in range(3) for j in range(2)]
    m = dict(meta or {})
    m["voxels"] = v
    return CroppedMask(new_bb, crop, m)


def iou_cropped(a: CroppedMask, b: CroppedMask) -> float:
    lo = [max(a.bbox[2 * i], b.bbox[2 * i]) for i in range(3)]
    hi = [min(a.bbox[2 * i + 1], b.bbox[2 * i + 1]) for i in range(3)]
    if any(h <= l for l, h in zip(lo, hi)):
        return 0.0
    sa = tuple(slice(lo[i] - a.bbox[2 * i], hi[i] - a.bbox[2 * i]) for i in range(3))
    sb = tuple(slice(lo[i] - b.bbox[2 * i], hi[i] - b.bbox[2 * i]) for i in range(3))
    inter = int(np.count_nonzero(a.crop[sa] & b.crop[sb]))
    va, vb = a.meta.get("voxels") or a.voxels, b.meta.get("voxels") or b.voxels
    union = va + vb - inter
    return inter / union if union > 0 else 0.0


def deduplicate(masks: Sequence[CroppedMask], iou_threshold: float = 0.9, seed: int = 0) -> List[CroppedMask]:
    """Drop one mask of every pair with IoU > threshold (random choice, deterministic for a seed).

    Returned masks keep their original relative order.
    """
    n = len(masks)
    if n <= 1:
        return list(masks)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    vox = np.array([m.meta.get("voxels") or m.voxels for m in masks], dtype=np.int64)
    bbs = np.array([m.bbox for m in masks], dtype=np.int64)
    kept: List[int] = []
    for idx in order:
        ok = True
        if kept:
            k = np.asarray(kept)
            # IoU > t requires min(va,vb)/max(va,vb) > t and overlapping bboxes
            ratio = np.minimum(vox[k], vox[idx]) / np.maximum(vox[k], vox[idx])
            overlap = np.all((np.maximum(bbs[k, 0::2], bbs[idx, 0::2]) < np.minimum(bbs[k, 1::2], bbs[idx, 1::2])), axis=1)
            for j in k[(ratio > iou_threshold) & overlap]:
                if iou_cropped(masks[idx], masks[j]) > iou_threshold:
                    ok = False
                    break
        if ok:
            kept.append(int(idx))
    return [masks[i] for i in sorted(kept)]
