"""`sam2` backend: the MASS paper's mask generator (Supp. 6.1), on the official `sam2` package.

Defaults are the official MASS settings (``preprocessing/mass_preprocessing/generate_masks.py``,
profile ``abdomen_ct`` + its command-line defaults); ``tests/test_masks_sam2.py`` reads them from that
file and compares. Pipeline per case, in nnU-Net's preprocessed grid (see docs/mass.md, "SAM2 masks"):

1. three channels: CT windows (preset ``abdomen_ct``: soft tissue c60/w350, contrast c15/w250, bone
   c150/w1200; HU recovered by inverting nnU-Net's CT normalization, ``windows.py``); MR/PET: quantiles
   (preset ``abdomen_mr``: 5-95/15-85/1-99). Other official presets: ``ct_windows`` / ``quantiles``;
2. body mask (official: TotalSegmentator ``body``; here: CT HU > -500, MR/PET Otsu, thin contacts such as
   the table cut by a 3 mm opening, largest component, holes filled per slice): MR/PET quantiles are taken
   over it, seeds span it, the 2D filter uses it. ``body_fraction`` 0 switches all of that off;
3. slice axis: the finest in-plane resolution (ties -> axis 0). Seed slices every ``interval_mm``
   (30 mm) from the first body slice, at least ``min_seed_slices`` (10) spread evenly over the body;
4. ``SAM2AutomaticMaskGenerator`` on each seed slice (32 points per side, crop_n_layers 2, box and crop
   NMS 0.5, pred_iou 0.4, stability 0.7, min_mask_region_area 500); masks less than
   ``body_fraction`` (90 %) inside the body dropped, masks under ``min_area_mm2`` (500 mm^2) dropped,
   the first ``max_masks_per_slice`` (70) kept in the generator's order (as official);
5. tracking on the slice stack as a "video": the seed's masks are added as objects (``add_new_mask``),
   then propagated forward and backward from the seed; ``reset_state`` between seeds;
6. post-processing: largest connected component touching the seed slice, min volume ``min_volume_mm3``
   (1000 mm^3), one of every pair with IoU > 0.9 dropped (seeded random).

Tracking (``batched_tracking=True``, default): sam2 1.1's ``propagate_in_video`` runs every object on
its own (batch 1). Here all objects of a seed (up to ``objects_per_batch``) run as ONE batch through
the predictor's own per-frame step (``_run_single_frame_inference``, the function ``propagate_in_video``
calls), with a batched memory bank built from the objects' own conditioning outputs. Objects are
independent in SAM2 (no non-overlap constraint), so the masks equal the one-at-a-time ones (test).
Per object, a direction stops at the first frame where its mask is empty (``stop_when_empty``); going
forward only once it is ``max(num_maskmem, max_obj_ptrs_in_encoder)`` (16) frames past the seed, since
the backward pass reads those forward frames as memory. Nothing beyond an empty slice can be
6-connected to the seed slice, so post-processing keeps exactly the same masks. Only the
memory window (last 16 frames + the seed) is kept, so the state does not grow with the stack.
``max_track_mm`` (default None: whole stack, as official) bounds how far a seed propagates.
``batched_tracking=False`` runs sam2's own ``propagate_in_video`` (reference).

Precision: CUDA with compute capability >= 8.0 runs in bf16 autocast with TF32 (SAM2's own
examples); older GPUs and the CPU run in fp32 (``nnssl_plugins.utils.precision``). Video frames live
in host memory on CUDA (``offload_video_to_cpu``; one 12.6 MB copy per visited frame).

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

Cost counters (``self.counts``): automatic-generator calls, image-encoder passes (generator crops and
tracked frames) and tracking steps (one object on one frame); ``bench/bench_sam2_cost.py`` reads them.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.masks.backends import CaseInput
from nnssl_plugins.pretrain.masks.postprocess import clean_mask, deduplicate
from nnssl_plugins.pretrain.masks.store import CroppedMask
from nnssl_plugins.pretrain.masks.windows import resolve_windows, three_windows, to_hu
from nnssl_plugins.utils import precision

IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)
BODY_HU = -500.0          # CT body threshold (HU)
BODY_OPENING_MM = 3.0     # radius of the opening that cuts thin contacts (table, blanket)


def choose_axis(spacing: Sequence[float]) -> int:
    """Slice axis with the finest in-plane resolution (mean of the other two spacings); ties -> the
    lowest axis, so an isotropic grid uses axis 0 (official ``determine_best_axes``)."""
    sp = np.asarray(spacing, dtype=float)
    inplane = [np.mean([sp[j] for j in range(3) if j != a]) for a in range(3)]
    return int(np.argmin(inplane))


def seed_slices(n: int, spacing_axis: float, interval_mm: float = 30.0, min_slices: int = 10,
                body_range: Optional[Tuple[int, int]] = None) -> List[int]:
    """Official ``sample_slices_with_interval_gt_aware`` (without its label-guided dense sampling): every
    ``interval_mm`` from the first body slice to the last; fewer than `min_slices` -> `min_slices` spread
    evenly over the body range (all of its slices if it is shorter)."""
    lo, hi = body_range if body_range is not None else (0, n - 1)
    step = max(1, int(round(interval_mm / float(spacing_axis))))
    idx = list(range(lo, hi + 1, step))
    if len(idx) < min_slices:
        if hi - lo + 1 < min_slices:
            idx = list(range(lo, hi + 1))
        else:
            idx = sorted(set(np.linspace(lo, hi, min_slices).astype(int).tolist()))
    return idx


def _ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    r = [max(1, int(round(radius_mm / float(s)))) for s in spacing]
    g = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((gi / float(k)) ** 2 for gi, k in zip(g, r)) <= 1.0


def body_mask(x: np.ndarray, hu_inverse: Optional[Dict[str, float]], seg: Optional[np.ndarray],
              spacing: Sequence[float], axis: int) -> np.ndarray:
    """Bool body mask of a (X, Y, Z) preprocessed image (stand-in for the official TotalSegmentator body).

    CT: HU > -500 (or above nnU-Net's lower clip bound if that is higher); MR/PET: Otsu threshold inside
    nnU-Net's nonzero region. Then an opening with a 3 mm ball (cuts the table and other thin contacts;
    parts thinner than ~6 mm go with them), the largest component, holes filled slice by slice along
    `axis` (lungs, bowel gas). Falls back to the whole image where no body is found.
    """
    if hu_inverse is not None:
        hu = to_hu(x, hu_inverse)
        lo = float(hu_inverse.get("lo", -np.inf))
        thr = max(BODY_HU, lo) if np.isfinite(lo) else BODY_HU
        m = hu > thr
    else:
        from skimage.filters import threshold_otsu

        inside = (seg[0] >= 0) if seg is not None else None
        vals = x[inside] if inside is not None and inside.any() else x
        if float(vals.max()) - float(vals.min()) < 1e-6:
            return np.ones(x.shape, dtype=bool)
        m = x > threshold_otsu(vals)
        if inside is not None:
            m &= inside
    if not m.any():
        return np.ones(x.shape, dtype=bool)
    ball = _ball(BODY_OPENING_MM, spacing)
    # opening; outside the volume counts as body for the erosion, so a body cut by the scan's ends keeps them
    core = ndimage.binary_dilation(ndimage.binary_erosion(m, ball, border_value=1), ball)
    if not core.any():
        core = m
    lab, n = ndimage.label(core)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        core = lab == int(np.argmax(sizes))
    body = np.moveaxis(core, axis, 0)
    for i in range(body.shape[0]):
        body[i] = ndimage.binary_fill_holes(body[i])
    return np.moveaxis(body, 0, axis)


def inside_fraction(mask: np.ndarray, body: np.ndarray) -> float:
    """Official body filter statistic: |mask & body| / (|mask| + 1e-6)."""
    return float(np.count_nonzero(mask & body)) / (float(np.count_nonzero(mask)) + 1e-6)


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


def _select(out: Dict, idx) -> Dict:
    """Rows `idx` (bool or index tensor) of every per-object tensor of one frame's tracking output."""
    def pick(t):
        return None if t is None else t[idx.to(t.device)]

    res = {k: pick(v) for k, v in out.items() if k != "maskmem_pos_enc"}
    pos = out.get("maskmem_pos_enc")
    res["maskmem_pos_enc"] = None if pos is None else [pick(p) for p in pos]
    return res


def _concat(outs: List[Dict]) -> Dict:
    import torch

    res = {}
    for k in outs[0]:
        if k == "maskmem_pos_enc":
            res[k] = None if outs[0][k] is None else [torch.cat([o[k][i] for o in outs]) for i in range(len(outs[0][k]))]
        else:
            res[k] = None if outs[0][k] is None else torch.cat([o[k] for o in outs])
    return res


def _check(name: str, value, cast, lo=None, hi=None, what: str = ""):
    """`value` as `cast` within [lo, hi], or one clear UserInputError naming the option."""
    try:
        if cast is bool:
            if value not in (True, False, 0, 1):
                raise ValueError
        elif isinstance(value, bool) or value is None:
            raise ValueError
        v = cast(value)
    except (TypeError, ValueError):
        what = what or {bool: "true or false", int: "an integer", float: "a number"}.get(cast, cast.__name__)
        raise UserInputError(f"--options {name}={value!r}: expected {what}.") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
        raise UserInputError(f"--options {name}={value!r}: must be {rng}.")
    return v


class Sam2Backend:
    name = "sam2"

    def __init__(self, checkpoint: Optional[str] = None, config: str = "configs/sam2.1/sam2.1_hiera_l.yaml",
                 device: Optional[str] = None,
                 # automatic mask generator: official DATASET_CONFIGS["abdomen_ct"]["sam_params"]
                 points_per_side: int = 32, points_per_batch: int = 128, pred_iou_thresh: float = 0.4,
                 stability_score_thresh: float = 0.7, stability_score_offset: float = 1.0,
                 mask_threshold: float = 0.0, box_nms_thresh: float = 0.5, crop_n_layers: int = 2,
                 crop_nms_thresh: float = 0.5, crop_overlap_ratio: float = 0.5,
                 crop_n_points_downscale_factor: int = 1, multimask_output: bool = True, use_m2m: bool = False,
                 min_mask_region_area: int = 500,
                 # channels, slices, 2D filters (official profile + command-line defaults)
                 ct_windows="abdomen_ct", quantiles="abdomen_mr", interval_mm: float = 30.0,
                 min_seed_slices: int = 10, max_masks_per_slice: int = 70, min_area_mm2: float = 500.0,
                 body_fraction: float = 0.9,
                 # 3D post-processing
                 min_volume_mm3: float = 1000.0, iou_dedup: float = 0.9, seed: int = 0,
                 # tracking
                 batched_tracking: bool = True, objects_per_batch: int = 70, stop_when_empty: bool = True,
                 max_track_mm: Optional[float] = None,
                 image_size: Optional[int] = None, allow_random_weights: bool = False):
        self.checkpoint = checkpoint
        self.config = config
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = str(device)
        self.points_per_side = _check("points_per_side", points_per_side, int, 1)
        self.points_per_batch = _check("points_per_batch", points_per_batch, int, 1)
        self.pred_iou_thresh = _check("pred_iou_thresh", pred_iou_thresh, float, 0.0, 1.0, "a number")
        self.stability_score_thresh = _check("stability_score_thresh", stability_score_thresh, float, 0.0, 1.0,
                                             "a number")
        self.stability_score_offset = _check("stability_score_offset", stability_score_offset, float, 0.0)
        self.mask_threshold = _check("mask_threshold", mask_threshold, float)
        self.box_nms_thresh = _check("box_nms_thresh", box_nms_thresh, float, 0.0, 1.0, "a number")
        self.crop_n_layers = _check("crop_n_layers", crop_n_layers, int, 0, 4, "an integer")
        self.crop_nms_thresh = _check("crop_nms_thresh", crop_nms_thresh, float, 0.0, 1.0, "a number")
        self.crop_overlap_ratio = _check("crop_overlap_ratio", crop_overlap_ratio, float, 0.0, 1.0, "a number")
        self.crop_n_points_downscale_factor = _check("crop_n_points_downscale_factor",
                                                     crop_n_points_downscale_factor, int, 1)
        self.multimask_output = _check("multimask_output", multimask_output, bool)
        self.use_m2m = _check("use_m2m", use_m2m, bool)
        self.min_mask_region_area = _check("min_mask_region_area", min_mask_region_area, int, 0)
        self.ct_windows = resolve_windows(ct_windows, "ct", "--options ct_windows")
        self.quantiles = resolve_windows(quantiles, "quantile", "--options quantiles")
        self.interval_mm = _check("interval_mm", interval_mm, float, 1e-6, what="a length in mm")
        self.min_seed_slices = _check("min_seed_slices", min_seed_slices, int, 1)
        self.max_masks_per_slice = _check("max_masks_per_slice", max_masks_per_slice, int, 1)
        self.min_area_mm2 = _check("min_area_mm2", min_area_mm2, float, 0.0, what="an area in mm^2")
        self.body_fraction = _check("body_fraction", body_fraction, float, 0.0, 1.0, "a fraction")
        self.min_volume_mm3 = _check("min_volume_mm3", min_volume_mm3, float, 0.0, what="a volume in mm^3")
        self.iou_dedup = _check("iou_dedup", iou_dedup, float, 0.0, 1.0, "a number")
        self.seed = _check("seed", seed, int)
        self.batched_tracking = _check("batched_tracking", batched_tracking, bool)
        self.objects_per_batch = _check("objects_per_batch", objects_per_batch, int, 1)
        self.stop_when_empty = _check("stop_when_empty", stop_when_empty, bool)
        self.max_track_mm = None if max_track_mm is None else _check("max_track_mm", max_track_mm, float, 1e-6,
                                                                      what="a length in mm or null")
        self.image_size = None if image_size is None else _check("image_size", image_size, int, 64)
        self.allow_random_weights = bool(allow_random_weights)
        self.params = {k: getattr(self, k) for k in (
            "config", "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
            "stability_score_offset", "mask_threshold", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
            "crop_overlap_ratio", "crop_n_points_downscale_factor", "multimask_output", "use_m2m",
            "min_mask_region_area", "interval_mm", "min_seed_slices", "max_masks_per_slice", "min_area_mm2",
            "body_fraction", "min_volume_mm3", "iou_dedup", "seed", "batched_tracking", "objects_per_batch",
            "stop_when_empty", "max_track_mm", "image_size")}
        self.params["ct_windows"] = [list(p) for p in self.ct_windows]
        self.params["quantiles"] = [list(p) for p in self.quantiles]
        self.params["checkpoint"] = os.path.basename(checkpoint) if checkpoint else None
        self._validate()
        self._predictor = None
        self._generator = None
        self.counts = {"amg_calls": 0, "encoder_passes_amg": 0, "encoder_passes_track": 0, "track_steps": 0}

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
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UserInputError(f"-device {self.device}: no CUDA device available. Use -device cpu.")
        elif self.device != "cpu":
            raise UserInputError(f"-device {self.device}: the sam2 backend runs on cuda or cpu.")

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
            stability_score_offset=self.stability_score_offset, mask_threshold=self.mask_threshold,
            box_nms_thresh=self.box_nms_thresh, crop_n_layers=self.crop_n_layers,
            crop_nms_thresh=self.crop_nms_thresh, crop_overlap_ratio=self.crop_overlap_ratio,
            crop_n_points_downscale_factor=self.crop_n_points_downscale_factor,
            min_mask_region_area=self.min_mask_region_area, output_mode="binary_mask",
            use_m2m=self.use_m2m, multimask_output=self.multimask_output)
        size = int(pred.image_size)
        if size != 1024:  # image predictor hard-codes the feature sizes of a 1024 input
            gen.predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
        self._instrument(pred)
        self._predictor, self._generator = pred, gen
        self._torch = torch

    def memory_reach(self) -> int:
        """How many frames back the tracker reads (memory frames, object pointers): the backward pass reads
        this many first forward frames, and the window kept in memory is this long."""
        pred = self._predictor
        return max(int(pred.num_maskmem) * int(pred.memory_temporal_stride_for_eval),
                   int(pred.max_obj_ptrs_in_encoder))

    def _instrument(self, pred) -> None:
        """Count image-encoder passes and tracking steps (objects x frames) on this model instance."""
        fwd, step = pred.forward_image, pred._run_single_frame_inference
        counts, phase = self.counts, {"amg": False}
        self._phase = phase

        def forward_image(img_batch):
            counts["encoder_passes_amg" if phase["amg"] else "encoder_passes_track"] += int(img_batch.shape[0])
            return fwd(img_batch)

        def run_single_frame_inference(*args, **kwargs):
            counts["track_steps"] += int(kwargs["batch_size"])
            return step(*args, **kwargs)

        pred.forward_image = forward_image
        pred._run_single_frame_inference = run_single_frame_inference

    def _precision(self):
        """bf16 autocast + TF32 on CUDA cards with native bf16, fp32 elsewhere (also on older GPUs)."""
        stack = contextlib.ExitStack()
        stack.enter_context(precision.tf32(self.device))
        stack.enter_context(precision.autocast(self.device, allow_fp16=False))
        return stack

    # ------------------------------------------------------------------ 2D
    def slice_masks(self, frame: np.ndarray, body: Optional[np.ndarray] = None, min_area_px: int = 0) -> List[Dict]:
        """Automatic masks of one (H, W, 3) float frame: body filter, min area, the first
        `max_masks_per_slice` in the generator's order (official)."""
        self.counts["amg_calls"] += 1
        self._phase["amg"] = True
        try:
            with self._torch.inference_mode(), self._precision():
                anns = self._generator.generate(frame)
        finally:
            self._phase["amg"] = False
        if body is not None and self.body_fraction > 0:
            anns = [a for a in anns if inside_fraction(a["segmentation"], body) >= self.body_fraction]
        anns = [a for a in anns if int(a["area"]) >= min_area_px]
        return anns[: self.max_masks_per_slice]

    # ------------------------------------------------------------------ tracking
    def _seed_outputs(self, state, seed: int, masks: Sequence[np.ndarray]):
        """Add the masks as objects 0..n-1 on the seed frame (sam2's own conditioning step, one object at a
        time) and return the objects' conditioning outputs batched, plus their video-resolution masks."""
        pred = self._predictor
        pred.reset_state(state)
        for k, m in enumerate(masks):
            pred.add_new_mask(state, frame_idx=seed, obj_id=k, mask=np.asarray(m, dtype=bool))
        pred.propagate_in_video_preflight(state)  # memory encoder on the seed masks
        cond = _concat([state["output_dict_per_obj"][k]["cond_frame_outputs"][seed] for k in range(len(masks))])
        _, vr = pred._get_orig_video_res_output(state, cond["pred_masks"])
        return cond, vr[:, 0] > 0

    def _frames(self, seed: int, n: int, reverse: bool, max_frames: Optional[int]) -> range:
        m = n if max_frames is None else max_frames
        return range(seed - 1, max(seed - m, 0) - 1, -1) if reverse else range(seed + 1, min(seed + m, n - 1) + 1)

    def track_batched(self, state, seed: int, masks: Sequence[np.ndarray], n: int,
                      max_frames: Optional[int] = None) -> List[Dict[int, np.ndarray]]:
        """Per object {frame: non-empty (H, W) bool mask}: all objects in one batch, forward then backward
        from `seed`. An object stops at its first empty frame: backward at once, forward once it is
        `memory_reach()` frames past the seed (the backward pass reads those forward frames as memory)."""
        torch = self._torch
        pred = self._predictor
        reach = self.memory_reach()
        cond, seed_masks = self._seed_outputs(state, seed, masks)
        tracks: List[Dict[int, np.ndarray]] = [{} for _ in masks]
        self._store(tracks, np.arange(len(masks)), seed, seed_masks)
        head: Dict[int, Dict] = {}  # first forward frames, full batch: memory of the backward pass
        for reverse in (False, True):
            mem = {"cond_frame_outputs": {seed: cond}, "non_cond_frame_outputs": dict(head) if reverse else {}}
            alive = np.arange(len(masks))
            for f in self._frames(seed, n, reverse, max_frames):
                out, low = pred._run_single_frame_inference(
                    inference_state=state, output_dict=mem, frame_idx=f, batch_size=len(alive),
                    is_init_cond_frame=False, point_inputs=None, mask_inputs=None, reverse=reverse,
                    run_mem_encoder=True)
                mem["non_cond_frame_outputs"][f] = out
                if not reverse and f - seed <= reach:
                    head[f] = out
                mem["non_cond_frame_outputs"].pop(f + reach if reverse else f - reach, None)
                _, vr = pred._get_orig_video_res_output(state, low)
                m = vr[:, 0] > 0
                nonempty = self._store(tracks, alive, f, m)
                # forward: keep every object for `reach` frames, the backward pass reads them as memory
                if self.stop_when_empty and (reverse or f - seed >= reach) and not nonempty.all():
                    if not nonempty.any():
                        break
                    keep = torch.from_numpy(nonempty)
                    alive = alive[nonempty]
                    mem = {key: {t: _select(o, keep) for t, o in d.items()} for key, d in mem.items()}
        pred.reset_state(state)
        return tracks

    def track_reference(self, state, seed: int, masks: Sequence[np.ndarray], n: int,
                        max_frames: Optional[int] = None) -> List[Dict[int, np.ndarray]]:
        """Same contract as `track_batched`, with sam2's own ``propagate_in_video`` (one object at a time,
        every frame of the range)."""
        pred = self._predictor
        pred.reset_state(state)
        for k, m in enumerate(masks):
            pred.add_new_mask(state, frame_idx=seed, obj_id=k, mask=np.asarray(m, dtype=bool))
        tracks: List[Dict[int, np.ndarray]] = [{} for _ in masks]
        for reverse in (False, True):
            for fidx, obj_ids, logits in pred.propagate_in_video(state, start_frame_idx=seed, reverse=reverse,
                                                                max_frame_num_to_track=max_frames):
                self._store(tracks, np.asarray([int(o) for o in obj_ids]), fidx, logits[:, 0] > 0)
        pred.reset_state(state)
        return tracks

    @staticmethod
    def _store(tracks, obj_idx: np.ndarray, f: int, m) -> np.ndarray:
        nonempty = m.flatten(1).any(1).cpu().numpy()
        if nonempty.any():
            arr = m.cpu().numpy()
            for j in np.flatnonzero(nonempty):
                tracks[int(obj_idx[j])][int(f)] = arr[j]
        return nonempty

    @staticmethod
    def _to_volume(track: Dict[int, np.ndarray]):
        """{frame: (H, W) mask} -> (crop (F, h, w) bool, offset (f0, r0, c0)) or None."""
        if not track:
            return None
        fs = sorted(track)
        rows = np.flatnonzero(np.any([track[f].any(1) for f in fs], axis=0))
        cols = np.flatnonzero(np.any([track[f].any(0) for f in fs], axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crop = np.zeros((fs[-1] - fs[0] + 1, r1 - r0, c1 - c0), dtype=bool)
        for f in fs:
            crop[f - fs[0]] = track[f][r0:r1, c0:c1]
        return crop, (fs[0], int(r0), int(c0))

    # ------------------------------------------------------------------ case
    def generate(self, case: CaseInput) -> List[CroppedMask]:
        x = case.image[0]
        if float(x.max()) - float(x.min()) < 1e-6:
            return []
        self._load()
        torch = self._torch
        spacing = [float(s) for s in case.spacing]
        axis = choose_axis(spacing)
        body = body_mask(x, case.hu_inverse, case.seg, spacing, axis) if self.body_fraction > 0 else None
        # MR/PET quantiles over the body (official), else over nnU-Net's nonzero region
        fg = body if body is not None else ((case.seg[0] >= 0) if case.seg is not None else None)
        chans = np.stack(three_windows(x, case.hu_inverse, fg, ct_windows=self.ct_windows,
                                       quantiles=self.quantiles), axis=-1)  # (X, Y, Z, 3)
        frames = np.ascontiguousarray(np.moveaxis(chans, axis, 0), dtype=np.float32)  # (N, H, W, 3)
        del chans
        n = frames.shape[0]
        body_range = None
        if body is not None:
            body = np.moveaxis(body, axis, 0)
            prof = np.flatnonzero(body.reshape(n, -1).any(1))
            body_range = (int(prof[0]), int(prof[-1]))
        seeds = seed_slices(n, spacing[axis], self.interval_mm, self.min_seed_slices, body_range)
        inplane = [spacing[j] for j in range(3) if j != axis]
        min_area_px = int(math.ceil(self.min_area_mm2 / (inplane[0] * inplane[1]) - 1e-9))
        min_voxels = int(math.ceil(self.min_volume_mm3 / float(np.prod(spacing)) - 1e-9))
        max_frames = None if self.max_track_mm is None else max(1, int(round(self.max_track_mm / spacing[axis])))
        track = self.track_batched if self.batched_tracking else self.track_reference
        masks: List[CroppedMask] = []
        with torch.inference_mode(), self._precision(), _in_memory_frames(frames):
            state = self._predictor.init_state(video_path="<in-memory>", offload_video_to_cpu=True,
                                               offload_state_to_cpu=not self.batched_tracking)
            for s in seeds:
                anns = self.slice_masks(frames[s], None if body is None else body[s], min_area_px)
                for b0 in range(0, len(anns), self.objects_per_batch):
                    chunk = anns[b0:b0 + self.objects_per_batch]
                    tracks = track(state, s, [a["segmentation"] for a in chunk], n, max_frames)
                    for k, (a, tr) in enumerate(zip(chunk, tracks)):
                        vol = self._to_volume(tr)
                        if vol is None:
                            continue
                        m = clean_mask(vol[0], min_voxels, seed_axis=0, seed_slice=s, offset=vol[1],
                                       meta={"score": float(a["predicted_iou"]), "seed_axis": axis,
                                             "seed_slice": s, "source": f"sam2:slice{s}:obj{b0 + k}"})
                        if m is None:
                            continue
                        # frames order (axis first) -> grid order
                        crop = np.moveaxis(m.crop, 0, axis)
                        bb = np.asarray(m.bbox).reshape(3, 2)
                        order = list(range(1, 3))
                        order.insert(axis, 0)
                        bb = bb[order].ravel().tolist()
                        masks.append(CroppedMask(bb, crop, m.meta))
            del state
        return deduplicate(masks, self.iou_dedup, self.seed)
