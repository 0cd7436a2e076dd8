"""`sam2` backend: the MASS paper's mask generator (Supp. 6.1), on the official `sam2` package.

Pipeline per case (all in nnU-Net's preprocessed grid):
1. three channels: CT windows soft tissue c60/w350, contrast c15/w250, bone c150/w1200 (HU recovered
   by inverting nnU-Net's CT normalization, see ``windows.py``); MR/PET: quantiles 5-95/15-85/1-99;
2. slice axis: the axis whose in-plane spacing (mean of the other two) is finest; near-isotropic
   (max/min spacing < 1.3) -> axis 0. Seed slices every ``interval_mm`` (15 mm), centred;
3. ``SAM2AutomaticMaskGenerator`` on each seed slice (points_per_side 32, pred_iou 0.35,
   stability 0.6, paper ranges 0.3-0.4 / 0.5-0.7); masks with area < ``min_area`` (500 px) dropped;
   at most ``max_masks_per_slice`` (70) kept, highest predicted IoU first;
4. ``SAM2VideoPredictor``: the slice stack is the "video". All seed masks are added as objects
   (``add_new_mask``) before propagating, then ``propagate_in_video`` forward and with
   ``reverse=True`` from the seed; ``reset_state`` between seeds;
5. post-processing: largest connected component touching the seed slice, min volume 1000 voxels,
   one of every pair with IoU > 0.9 dropped (seeded random).

One model serves both steps: the video predictor (a ``SAM2Base`` subclass built by
``build_sam2_video_predictor``) is handed to ``SAM2AutomaticMaskGenerator`` as its model, so the
checkpoint is loaded once.

Checkpoint: a user-supplied file holding ``{"model": state_dict}`` (the official release format),
loaded by sam2 with ``torch.load(weights_only=True)`` and strict key matching. Nothing is ever
downloaded (the ``*_hf`` / ``from_pretrained`` builders are never used). ``checkpoint=None`` is
refused unless ``allow_random_weights=True`` (tests only: random model from the package config).

Frame shim: ``SAM2VideoPredictor.init_state`` only reads a JPEG folder / mp4 through the module-level
function ``sam2.sam2_video_predictor.load_video_frames``. ``_in_memory_frames`` temporarily replaces
that name with a loader that returns our float32 slice stack, resized to the model's image size
(bilinear, antialiased) and normalized with SAM2's ImageNet mean/std -- the same tensor layout
``load_video_frames_from_jpg_images`` returns, but without 8-bit JPEG quantization. The automatic
generator gets float HWC images in [0, 1] (torchvision ``ToTensor`` keeps float input unscaled).
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.masks.backends import CaseInput
from nnssl_plugins.pretrain.masks.postprocess import clean_mask, deduplicate
from nnssl_plugins.pretrain.masks.store import CroppedMask
from nnssl_plugins.pretrain.masks.windows import three_windows

IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)


def choose_axis(spacing: Sequence[float], iso_ratio: float = 1.3) -> int:
    sp = np.asarray(spacing, dtype=float)
    if sp.max() / sp.min() < iso_ratio:
        return 0
    inplane = [np.mean([sp[j] for j in range(3) if j != a]) for a in range(3)]
    return int(np.argmin(inplane))


def seed_slices(n: int, spacing_axis: float, interval_mm: float = 15.0) -> List[int]:
    step = max(1, int(round(interval_mm / float(spacing_axis))))
    start = min(step // 2, (n - 1) // 2)  # short stacks: the centre slice
    return list(range(start, n, step))


def available_configs() -> List[str]:
    import sam2

    root = os.path.dirname(sam2.__file__)
    out = []
    for dp, _, fs in os.walk(root):
        for f in fs:
            if f.endswith(".yaml"):
                out.append(os.path.relpath(os.path.join(dp, f), root))
    return sorted(out)


@contextlib.contextmanager
def _in_memory_frames(frames: np.ndarray):
    """Let ``SAM2VideoPredictor.init_state`` read `frames` (N, H, W, 3) float32 in [0, 1]."""
    import torch
    import torch.nn.functional as F
    import sam2.sam2_video_predictor as svp

    def loader(video_path, image_size, offload_video_to_cpu, img_mean=IMG_MEAN, img_std=IMG_STD,
               async_loading_frames=False, compute_device=torch.device("cpu")):
        n, h, w, _ = frames.shape
        imgs = []
        for i in range(0, n, 16):
            t = torch.from_numpy(np.ascontiguousarray(frames[i:i + 16].transpose(0, 3, 1, 2))).float()
            imgs.append(F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                      antialias=True))
        images = torch.cat(imgs, 0)
        mean = torch.tensor(img_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(img_std, dtype=torch.float32)[:, None, None]
        images = (images - mean) / std
        if not offload_video_to_cpu:
            images = images.to(compute_device)
        return images, h, w

    orig = svp.load_video_frames
    svp.load_video_frames = loader
    try:
        yield
    finally:
        svp.load_video_frames = orig


class Sam2Backend:
    name = "sam2"

    def __init__(self, checkpoint: Optional[str] = None, config: str = "configs/sam2.1/sam2.1_hiera_l.yaml",
                 device: str = "cpu", points_per_side: int = 32, pred_iou_thresh: float = 0.35,
                 stability_score_thresh: float = 0.6, max_masks_per_slice: int = 70, min_area: int = 500,
                 interval_mm: float = 15.0, min_volume: int = 1000, iou_dedup: float = 0.9, seed: int = 0,
                 image_size: Optional[int] = None, points_per_batch: int = 64,
                 allow_random_weights: bool = False, **_):
        self.checkpoint = checkpoint
        self.config = config
        self.device = device
        self.points_per_side = int(points_per_side)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.max_masks_per_slice = int(max_masks_per_slice)
        self.min_area = int(min_area)
        self.interval_mm = float(interval_mm)
        self.min_volume = int(min_volume)
        self.iou_dedup = float(iou_dedup)
        self.seed = int(seed)
        self.image_size = image_size
        self.points_per_batch = int(points_per_batch)
        self.allow_random_weights = allow_random_weights
        self.params = {k: getattr(self, k) for k in (
            "config", "points_per_side", "pred_iou_thresh", "stability_score_thresh", "max_masks_per_slice",
            "min_area", "interval_mm", "min_volume", "iou_dedup", "seed", "image_size")}
        self.params["checkpoint"] = os.path.basename(checkpoint) if checkpoint else None
        self._validate()
        self._predictor = None
        self._generator = None

    # ------------------------------------------------------------------ model
    def _validate(self) -> None:
        if self.checkpoint is None:
            if not self.allow_random_weights:
                raise UserInputError(
                    "--sam2-checkpoint: required for the sam2 backend (nothing is downloaded). Pass the path to an "
                    "official SAM2 checkpoint, e.g. sam2.1_hiera_large.pt, matching --sam2-config, or use --backend slic.")
        elif not os.path.isfile(self.checkpoint):
            raise UserInputError(
                f"--sam2-checkpoint {self.checkpoint}: file not found. Download an official SAM2 checkpoint yourself "
                "and pass its path (nothing is downloaded automatically), or use --backend slic.")
        elif not os.access(self.checkpoint, os.R_OK):
            raise UserInputError(f"--sam2-checkpoint {self.checkpoint}: not readable. Fix its permissions.")
        if self.config not in available_configs():
            raise UserInputError(
                f"--sam2-config {self.config}: no such config in the sam2 package. Choose one of: "
                + ", ".join(c for c in available_configs() if c.startswith("configs/")))
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UserInputError("-device cuda: no CUDA device available. Use -device cpu.")

    def _load(self) -> None:
        if self._predictor is not None:
            return
        import torch
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        from sam2.build_sam import build_sam2_video_predictor

        overrides = []
        if self.image_size is not None:
            overrides.append(f"++model.image_size={int(self.image_size)}")
        try:
            pred = build_sam2_video_predictor(self.config, ckpt_path=self.checkpoint, device=self.device,
                                              hydra_overrides_extra=overrides)
        except (RuntimeError, KeyError, EOFError, ValueError, OSError) as e:
            import pickle

            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserInputError(
                f"--sam2-checkpoint {self.checkpoint}: cannot be loaded into config {self.config} ({msg}). "
                "Use the checkpoint that matches the config (e.g. sam2.1_hiera_large.pt with "
                "configs/sam2.1/sam2.1_hiera_l.yaml), in the official {'model': state_dict} format.") from None
        except Exception as e:  # unpickling errors etc.
            raise UserInputError(
                f"--sam2-checkpoint {self.checkpoint}: unreadable ({type(e).__name__}). "
                "Pass an official SAM2 checkpoint file.") from None
        gen = SAM2AutomaticMaskGenerator(
            pred, points_per_side=self.points_per_side, points_per_batch=self.points_per_batch,
            pred_iou_thresh=self.pred_iou_thresh, stability_score_thresh=self.stability_score_thresh,
            output_mode="binary_mask", multimask_output=True)
        size = int(pred.image_size)
        if size != 1024:  # image predictor hard-codes the feature sizes of a 1024 input
            gen.predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
        self._predictor, self._generator = pred, gen
        self._torch = torch

    # ------------------------------------------------------------------ generation
    def slice_masks(self, frame: np.ndarray) -> List[Dict]:
        """Automatic masks of one (H, W, 3) float frame, filtered by min area, best `max` kept."""
        with self._torch.inference_mode():
            anns = self._generator.generate(frame)
        anns = [a for a in anns if int(a["area"]) >= self.min_area]
        anns.sort(key=lambda a: (-float(a["predicted_iou"]), -int(a["area"])))
        return anns[: self.max_masks_per_slice]

    def propagate(self, state, seed: int, anns: List[Dict], n_frames: int, hw) -> np.ndarray:
        """(n_obj, N, H, W) bool volumes from bidirectional propagation of the seed masks."""
        pred = self._predictor
        vol = np.zeros((len(anns), n_frames) + tuple(hw), dtype=bool)
        pred.reset_state(state)
        for k, a in enumerate(anns):
            pred.add_new_mask(state, frame_idx=seed, obj_id=k, mask=np.asarray(a["segmentation"], dtype=bool))
        for reverse in (False, True):
            for fidx, obj_ids, logits in pred.propagate_in_video(state, start_frame_idx=seed, reverse=reverse):
                m = (logits[:, 0] > 0.0).cpu().numpy()
                for j, oid in enumerate(obj_ids):
                    vol[int(oid), fidx] = m[j]
        pred.reset_state(state)
        return vol

    def generate(self, case: CaseInput) -> List[CroppedMask]:
        x = case.image[0]
        if float(x.max()) - float(x.min()) < 1e-6:
            return []
        self._load()
        fg = (case.seg[0] >= 0) if case.seg is not None else None
        chans = np.stack(three_windows(x, case.hu_inverse, fg), axis=-1)  # (X, Y, Z, 3)
        axis = choose_axis(case.spacing)
        frames = np.ascontiguousarray(np.moveaxis(chans, axis, 0), dtype=np.float32)  # (N, H, W, 3)
        n, h, w = frames.shape[:3]
        seeds = seed_slices(n, case.spacing[axis], self.interval_mm)
        torch = self._torch
        masks: List[CroppedMask] = []
        with torch.inference_mode(), _in_memory_frames(frames):
            state = self._predictor.init_state(video_path="<in-memory>", offload_video_to_cpu=self.device == "cpu",
                                               offload_state_to_cpu=self.device == "cpu")
            for s in seeds:
                anns = self.slice_masks(frames[s])
                if not anns:
                    continue
                vol = self.propagate(state, s, anns, n, (h, w))
                for k, a in enumerate(anns):
                    m = clean_mask(vol[k], self.min_volume, seed_axis=0, seed_slice=s,
                                   meta={"score": float(a["predicted_iou"]), "seed_axis": axis, "seed_slice": s,
                                         "source": f"sam2:slice{s}:obj{k}"})
                    if m is None:
                        continue
                    # frames order (axis first) -> grid order
                    crop = np.moveaxis(m.crop, 0, axis)
                    bb = np.asarray(m.bbox).reshape(3, 2)
                    order = list(range(1, 3))
                    order.insert(axis, 0)
                    bb = bb[order].ravel().tolist()
                    masks.append(CroppedMask(bb, crop, m.meta))
                del vol
        return deduplicate(masks, self.iou_dedup, self.seed)
