"""MASS pretraining sampler: one scan, two overlapping crops, K binary mask tasks per sample.

Per batch entry (`MASSDataLoader.generate_train_batch`):
  1. draw a case; open its mask store (`MaskStore`, header only; masks are read one by one);
  2. query crop centre uniformly in the image, reference centre = query centre + a per-axis shift of
     ±(1 − overlap^(1/3))·patch (±25 % jitter), so the two patch-sized crops share ≈ `overlap` (0.67) of
     their volume (clamped to the image);
  3. pick K−1 stored masks whose bounding box intersects BOTH crops (fallback: either crop, then
     repetition), read each with `store.crop(i)` (its bbox only) and paste it into the two extraction
     windows; channel 0 is the all-ones context mask (ones inside the image, zeros in padding);
  4. augmentation with batchgeneratorsv2's SpatialTransform semantics: reference = weak affine (p 0.5 rotation
     ±30°, p 0.5 isotropic scaling 0.7–1/0.7), query = strong affine (p 0.8 each; batchgeneratorsv2's
     SpatialTransform has no shear, so shear 0.1 is NOT applied). The transform's own `get_parameters` draws the
     sampling grid over nnU-Net's enlarged initial patch (room for rotation/scaling, as `nnUNetTrainer` does);
     only the part of that window the grid actually touches is read. The image is resampled bilinearly
     (`grid_sample`, zero padding); the K masks are packed as bits of one volume (24 channels per float32 word,
     exact) and resampled with ONE nearest `grid_sample` using the transform's own grid — bit-identical to
     SpatialTransform(mode_seg="nearest", zero padding) per channel, without K float copies of the window.
     An identity draw (no rotation, no scaling) is a plain crop.
     Then intensity augmentation (noise, blur, brightness, contrast, gamma — nnU-Net's settings), image only;
  5. MR/PET channels (plans["nnssl"]["percentile_clip_channels"]): per-case 2–98 % percentile clip and
     re-standardisation of the z-scored image (`percentile_clip_zscore`), statistics computed once per case.

Batch: data = query [B, C, *P] float32, target = query masks [B, K, *P] uint8, ref [B, C, *P],
ref_masks [B, K, *P] uint8, keys. It runs inside nnU-Net's (NonDet)MultiThreadedAugmenter like
nnUNetDataLoader (transforms applied in the workers).
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from batchgenerators.dataloading.data_loader import DataLoader

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.common.data import intensity_transforms

ROT = math.pi / 6  # ±30°
SCALE = (0.7, 1 / 0.7)
P_AFFINE_REF, P_AFFINE_QUERY = 0.5, 0.8  # per rotation / per scaling (MASS: weak reference, strong query view)
_BITS = 24  # mask channels per packed word (exact integers in float32 for the nearest grid_sample)


# ----------------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------------
def spatial_transform(patch_size, p: float):
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    return SpatialTransform(list(patch_size), patch_center_dist_from_border=0, random_crop=False,
                            p_elastic_deform=0, p_rotation=p, rotation=(-ROT, ROT), p_scaling=p, scaling=SCALE,
                            p_synchronize_scaling_across_axes=1, mode_seg="nearest", border_mode_seg="constant",
                            padding_value_seg=0)


def intensity_compose():
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    return ComposeTransforms(intensity_transforms())


def _n_words(k: int) -> int:
    return (k + _BITS - 1) // _BITS


def _word_bits(channels, w: int) -> int:
    return sum(1 << (c - w * _BITS) for c in channels if w * _BITS <= c < (w + 1) * _BITS)


def _unpack(words: torch.Tensor, k: int) -> torch.Tensor:
    """[W, N] int32 bit-packed masks -> [k, N] uint8."""
    w8 = words.contiguous().numpy().view(np.uint8).reshape(words.shape[0], -1, 4)  # little-endian bytes
    out = np.empty((k, words.shape[1]), dtype=np.uint8)
    for c in range(k):
        w, b = divmod(c, _BITS)
        np.bitwise_and(w8[w, :, b >> 3] >> (b & 7), 1, out=out[c])
    return torch.from_numpy(out)


def extraction_size(patch_size) -> Tuple[int, ...]:
    """nnU-Net's enlarged initial patch size for ±30° rotation and 0.7–1.43 scaling."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    return tuple(int(i) for i in get_patch_size(list(patch_size), (-ROT, ROT), (-ROT, ROT), (-ROT, ROT), SCALE))


# ----------------------------------------------------------------------------------------------------------
# intensity helper (MR/PET)
# ----------------------------------------------------------------------------------------------------------
def percentile_stats(image: np.ndarray, channels: Sequence[int], pct=(2.0, 98.0), max_samples: int = 500_000):
    """{c: (lo, hi, mean, std)} of each channel's [lo, hi] = percentiles and the clipped values' mean/std."""
    out = {}
    for c in channels:
        x = np.asarray(image[c]).ravel()
        if x.size > max_samples:
            x = x[:: int(math.ceil(x.size / max_samples))]
        lo, hi = np.percentile(x, pct)
        xc = np.clip(x, lo, hi)
        out[int(c)] = (float(lo), float(hi), float(xc.mean()), float(max(xc.std(), 1e-8)))
    return out


def percentile_clip_zscore(crop: np.ndarray, stats: Dict[int, tuple]) -> np.ndarray:
    """Apply per-case percentile clip + re-standardisation (official MASS MR/PET normalisation) in place."""
    for c, (lo, hi, m, s) in stats.items():
        crop[c] = (np.clip(crop[c], lo, hi) - m) / s
    return crop


# ----------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------
def _window(center: Sequence[int], size: Sequence[int]) -> List[Tuple[int, int]]:
    return [(int(c) - s // 2, int(c) - s // 2 + s) for c, s in zip(center, size)]


def extract_window(arr, win: List[Tuple[int, int]], n_lead: int = 1, dtype=np.float32) -> np.ndarray:
    """arr[..., x0:x1, y0:y1, z0:z1] with zero padding outside the array (reads only the valid part)."""
    shape = arr.shape[n_lead:]
    out = np.zeros((*arr.shape[:n_lead], *[b - a for a, b in win]), dtype=dtype)
    src = tuple(slice(max(a, 0), min(b, s)) for (a, b), s in zip(win, shape))
    if any(s.stop <= s.start for s in src):
        return out
    dst = tuple(slice(s.start - a, s.stop - a) for s, (a, _) in zip(src, win))
    out[(Ellipsis, *dst)] = np.asarray(arr[(Ellipsis, *src)])
    return out


def _overlaps(bboxes: np.ndarray, box: List[Tuple[int, int]]) -> np.ndarray:
    ok = np.ones(len(bboxes), dtype=bool)
    for ax, (a, b) in enumerate(box):
        ok &= (bboxes[:, 2 * ax] < b) & (bboxes[:, 2 * ax + 1] > a)
    return ok


def sample_centers(shape, patch_size, overlap: float, rng: np.random.RandomState):
    """Query and reference crop centres whose patch-sized crops overlap by ≈ `overlap` of the volume."""
    shape, ps = np.array(shape), np.array(patch_size)
    lo = np.minimum(ps // 2, shape // 2)
    hi = np.maximum(shape - (ps - ps // 2), lo)
    cq = np.array([rng.randint(a, b + 1) for a, b in zip(lo, hi)])
    frac = 1 - overlap ** (1 / 3)
    shift = np.round(ps * frac * rng.uniform(0.75, 1.25, 3) * rng.choice([-1, 1], 3)).astype(int)
    cr = np.clip(cq + shift, lo, hi)
    return cq, cr


# ----------------------------------------------------------------------------------------------------------
# the loader
# ----------------------------------------------------------------------------------------------------------
class MASSDataLoader(DataLoader):
    def __init__(self, data, batch_size: int, patch_size: Sequence[int], mask_dir: str, num_masks: int = 13,
                 overlap: float = 0.67, augment: bool = True, percentile_clip_channels: Sequence[int] = (),
                 percentile=(2.0, 98.0)):
        super().__init__(data, batch_size, 1, None, True, False, True, None)
        self.indices = list(data.identifiers)
        self.patch_size = tuple(int(i) for i in patch_size)
        self.num_masks = int(num_masks)
        if self.num_masks < 1:
            raise UserInputError(f"num_masks={num_masks}: need at least 1 (the all-ones context mask).")
        self.overlap = float(overlap)
        self.mask_dir = mask_dir
        self.augment = augment
        self.ext_size = extraction_size(self.patch_size) if augment else self.patch_size
        # spatial part: only get_parameters of batchgeneratorsv2's SpatialTransform is used (the grid; see _crop)
        self.sp_ref = spatial_transform(self.patch_size, P_AFFINE_REF) if augment else None
        self.sp_query = spatial_transform(self.patch_size, P_AFFINE_QUERY) if augment else None
        self.int_ref = intensity_compose() if augment else None
        self.int_query = intensity_compose() if augment else None
        # get_parameters reads only .ndim and .shape[1:] of the image: a zero-stride stand-in for the window
        self._param_probe = torch.zeros(()).expand(1, *self.ext_size)
        self.pclip_channels = [int(c) for c in percentile_clip_channels]
        self.percentile = tuple(percentile)
        from nnssl_plugins.pretrain.masks import STORE_EXT

        self._ext = STORE_EXT
        missing = [k for k in self.indices if not os.path.isfile(os.path.join(mask_dir, k + STORE_EXT))]
        if missing:
            raise UserInputError(
                f"{mask_dir}: no MASS mask store for {len(missing)} case(s) (e.g. {missing[:3]}). Generate them with "
                f"nnssl_generate_masks (or nnssl_pretrain -m MASS, which does it before training).")
        self._stores: Dict[str, object] = {}
        self._pstats: Dict[str, dict] = {}

    def _store(self, key):
        st = self._stores.get(key)
        if st is None:
            from nnssl_plugins.pretrain.masks import MaskStore

            st = self._stores[key] = MaskStore.open(os.path.join(self.mask_dir, key + self._ext))
        return st

    def _choose_masks(self, store, boxq, boxr, rng) -> List[int]:
        k = self.num_masks - 1
        if k == 0 or len(store) == 0:
            return []
        bb = np.asarray(store.bboxes).reshape(-1, 6)
        oq, orr = _overlaps(bb, boxq), _overlaps(bb, boxr)
        both = np.flatnonzero(oq & orr)
        either = np.flatnonzero((oq | orr) & ~(oq & orr))
        pick = list(rng.permutation(both)[:k])
        if len(pick) < k:
            pick += list(rng.permutation(either)[: k - len(pick)])
        if not pick:
            return []
        while len(pick) < k:
            pick.append(pick[rng.randint(len(pick))])
        return [int(i) for i in pick]

    def _packed_masks(self, chosen, crops, win, img_shape) -> np.ndarray:
        """[W, *win] int32: bit k % 24 of word k // 24 is mask channel k (0 = all-ones context mask, zero in
        padding; 1..K-1 = the chosen store masks, pasted from their bbox crops)."""
        K = self.num_masks
        packed = np.zeros((_n_words(K), *[b - a for a, b in win]), dtype=np.int32)
        inside = tuple(slice(max(0, -a), max(0, min(b, s) - a)) for (a, b), s in zip(win, img_shape))
        if not chosen:  # no store mask: every channel is the context mask
            for w in range(packed.shape[0]):
                packed[(w, *inside)] = _word_bits(range(K), w)
            return packed
        packed[(0, *inside)] = 1
        for i in sorted(set(chosen)):
            chans = [j + 1 for j, c in enumerate(chosen) if c == i]
            sl, arr = crops[i]
            src, dst = [], []
            for (a, b), s in zip(win, sl):
                lo, hi = max(a, s.start), min(b, s.stop)
                if hi <= lo:
                    break
                src.append(slice(lo - s.start, hi - s.start))
                dst.append(slice(lo - a, hi - a))
            else:
                part = arr[tuple(src)]
                for w in range(packed.shape[0]):
                    bits = _word_bits(chans, w)
                    if bits:
                        packed[(w, *dst)] |= part * np.int32(bits)
        return packed

    def _masks_for_window(self, store, chosen, crops, win, img_shape) -> np.ndarray:
        """[K, *win] uint8 mask channels of an extraction window (unaugmented)."""
        packed = torch.from_numpy(self._packed_masks(chosen, crops, win, img_shape))
        return _unpack(packed.reshape(packed.shape[0], -1), self.num_masks).reshape(
            self.num_masks, *packed.shape[1:]).numpy()

    def _crop(self, data, chosen, crops, center, spatial, shape, pstats):
        """One augmented (or plain) crop: image [C, *P] float32, masks [K, *P] uint8."""
        K, P = self.num_masks, self.patch_size
        grid = None
        if spatial is not None:
            grid = spatial.get_parameters(image=self._param_probe)["grid"]
        if grid is None:  # identity draw: SpatialTransform crops the window centre, i.e. the patch at `center`
            win = _window(center, P)
            img = extract_window(data, win)
            if pstats:
                percentile_clip_zscore(img, pstats)
            packed = torch.from_numpy(self._packed_masks(chosen, crops, win, shape))
            return torch.from_numpy(img), _unpack(packed.reshape(packed.shape[0], -1), K).reshape(K, *P)
        ewin = _window(center, self.ext_size)
        # the grid is affine in the patch voxel position (no elastic deformation): its extremes are at the corners.
        # grid_sample's unnormalisation (align_corners=False): pixel = (g + 1) * size / 2 - 0.5, last axis first
        ext_r = torch.tensor(self.ext_size[::-1], dtype=torch.float32)
        corners = grid[[0, -1]][:, [0, -1]][:, :, [0, -1]].reshape(-1, 3)
        mn, mx = ((corners + 1) * (ext_r / 2) - 0.5).aminmax(dim=0)
        # bilinear reads floor(p) and floor(p) + 1; one voxel of slack on each side for rounding
        lo = [max(0, int(math.floor(v)) - 1) for v in mn.flip(0).tolist()]
        hi = [min(e, int(math.floor(v)) + 3) for v, e in zip(mx.flip(0).tolist(), self.ext_size)]
        C = data.shape[0]
        if any(h <= l for l, h in zip(lo, hi)):  # grid entirely outside the window
            return torch.zeros((C, *P)), torch.zeros((K, *P), dtype=torch.uint8)
        swin = [(w0 + l, w0 + h) for (w0, _), l, h in zip(ewin, lo, hi)]
        sub_r = torch.tensor([h - l for l, h in zip(lo, hi)][::-1], dtype=torch.float32)
        lo_r = torch.tensor(lo[::-1], dtype=torch.float32)
        # the same sampling positions, normalised to the sub-window: g' = g * ext / sub + (ext - 2 lo) / sub - 1
        g = torch.addcmul(((ext_r - 2 * lo_r) / sub_r - 1).expand_as(grid), grid, ext_r / sub_r)[None]
        img = extract_window(data, swin)
        if pstats:
            percentile_clip_zscore(img, pstats)
        img_t = torch.nn.functional.grid_sample(torch.from_numpy(img)[None], g, mode="bilinear", padding_mode="zeros",
                                                align_corners=False)[0]
        # masks: one nearest-neighbour grid_sample of the bit-packed channels (exact in float32: 24 bits a word),
        # with the ORIGINAL grid over a window-sized buffer that is zero outside the sub-window, so every voxel
        # picks the same source voxel as SpatialTransform(mode_seg="nearest", constant 0) — ties at exactly half a
        # voxel included (a renormalised grid could round those the other way)
        buf = self._window_buffer(_n_words(K))
        region = (slice(None), *[slice(l, h) for l, h in zip(lo, hi)])
        try:
            buf[region] = torch.from_numpy(self._packed_masks(chosen, crops, swin, shape))
            words = torch.nn.functional.grid_sample(buf[None], grid[None], mode="nearest", padding_mode="zeros",
                                                    align_corners=False)[0].to(torch.int32)
        finally:
            buf[region] = 0  # the buffer stays all-zero between crops: only the written region is cleared
        return img_t, _unpack(words.reshape(words.shape[0], -1), K).reshape(K, *P)

    def _window_buffer(self, words: int) -> torch.Tensor:
        """Reusable zero float32 buffer [words, *ext_size] (one per loader, i.e. per augmentation worker)."""
        buf = getattr(self, "_buf", None)
        if buf is None or buf.shape[0] != words:
            buf = self._buf = torch.zeros((words, *self.ext_size), dtype=torch.float32)
        return buf

    def sample(self, key: str, rng: Optional[np.random.RandomState] = None) -> dict:
        rng = rng or np.random
        data, _, _, _ = self._data.load_case(key)
        shape = tuple(data.shape[1:])
        store = self._store(key)
        if tuple(store.shape) != shape:
            raise UserInputError(f"{store.path}: mask grid {tuple(store.shape)} != preprocessed image {shape}. "
                                 f"Regenerate the masks (nnssl_generate_masks --overwrite).")
        cq, cr = sample_centers(shape, self.patch_size, self.overlap, rng)
        boxq, boxr = _window(cq, self.patch_size), _window(cr, self.patch_size)
        chosen = self._choose_masks(store, boxq, boxr, rng)
        crops = {i: store.crop(i) for i in set(chosen)}
        if self.pclip_channels and key not in self._pstats:
            self._pstats[key] = percentile_stats(data, self.pclip_channels, self.percentile)
        pstats = self._pstats.get(key) if self.pclip_channels else None
        out = {}
        for name, c, sp, it in (("query", cq, self.sp_query, self.int_query), ("ref", cr, self.sp_ref, self.int_ref)):
            img_t, msk_t = self._crop(data, chosen, crops, c, sp, shape, pstats)
            if it is not None:
                img_t = it(image=img_t)["image"]
            out[name] = (img_t.float(), msk_t)
        return out

    def generate_train_batch(self):
        keys = self.get_indices()
        samples = [self.sample(k) for k in keys]
        return {
            "data": torch.stack([s["query"][0] for s in samples]),
            "target": torch.stack([s["query"][1] for s in samples]),
            "ref": torch.stack([s["ref"][0] for s in samples]),
            "ref_masks": torch.stack([s["ref"][1] for s in samples]),
            "keys": keys,
        }
