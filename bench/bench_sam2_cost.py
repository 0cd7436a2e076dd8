"""SAM2 mask generation cost per CT: counts, FLOPs, extrapolation to a 512x512x300 CT (CPU only).

1. Runs the sam2 backend on the real CT (../shared/data/ct, random-init tiny model, image size 128, 4 points
   per side, thresholds 0 and no body filter so a random model yields masks, <= 2 objects per seed) twice: with the settings of
   the code before issue 17/18 ("before": crop_n_layers 0, a seed every 15 mm, no body filter, sam2's own
   one-object-at-a-time propagation over the whole stack) and with today's defaults ("after"). Prints the
   counted automatic-generator (AMG) calls, image-encoder passes and tracking steps (one object on one
   frame) next to the closed form the extrapolation uses.
2. Counts FLOPs of one image-encoder pass, one AMG decoder batch (128 points) and one tracking step (one
   object, full memory: 7 memory frames + 16 object pointers) for the default model (Hiera-L, 1024) on the
   meta device (FlopCounterMode; nothing is computed, nothing is downloaded).
3. Extrapolates to a 512x512x300 CT (0.75x0.75x1.5 mm -> 300 frames on the 1.5 mm grid, body over the whole
   stack) at default settings, and converts to H100 minutes under stated throughput assumptions.
No GPU timing here: none was available when this was written.

Usage: OMP_NUM_THREADS=1 python bench/bench_sam2_cost.py [--ct small|full] [--no-measure] [--no-flops]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

BEFORE = dict(crop_n_layers=0, box_nms_thresh=0.7, crop_nms_thresh=0.7, interval_mm=15.0, min_seed_slices=1,
              body_fraction=0.0, batched_tracking=False, stop_when_empty=False)
AFTER: dict = {}  # today's defaults
MEASURE = dict(checkpoint=None, allow_random_weights=True, config="configs/sam2.1/sam2.1_hiera_t.yaml",
               device="cpu", image_size=128, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
               max_masks_per_slice=2, min_area_mm2=0.0, min_volume_mm3=0.0, body_fraction=0.0)
# body_fraction 0 in both runs: a random model's masks cover the air too, the body filter would leave nothing
# to track (the filter itself is tested in tests/test_masks_sam2.py; on this CT the body spans every slice)

# throughput assumptions (effective, H100 SXM): bf16 autocast ~30 % of the 989 TFLOP/s dense peak; this is also
# what the paper's own propagation time implies for the official settings (see docs/benchmarks.md); fp32 without
# TF32 ~60 % of the 67 TFLOP/s peak
TFLOPS = {"fp32 (as coded before)": 40.0, "bf16 autocast + TF32": 300.0}


def crops(n_layers: int) -> int:
    return sum(4 ** i for i in range(n_layers + 1))


def measure(ct: str) -> None:
    import SimpleITK as sitk
    import torch

    from conftest import SHARED_DATA
    from nnssl_plugins.pretrain.masks.backends import CaseInput, make_backend

    torch.set_num_threads(1)
    path = os.path.join(SHARED_DATA, "ct", "totalseg_ct_sm.nii.gz" if ct == "small" else "totalseg_ct.nii.gz")
    img = sitk.ReadImage(path)
    x = sitk.GetArrayFromImage(img).astype(np.float32)  # HU, (z, y, x)
    spacing = tuple(float(s) for s in img.GetSpacing()[::-1])
    case = CaseInput("ct", x[None], spacing, {"mean": 0.0, "std": 1.0, "lo": -1024.0, "hi": 3071.0})
    print(f"real CT {os.path.basename(path)}: grid {x.shape} at {spacing} mm (HU); measured with sam2.1 tiny, "
          f"random weights, image size {MEASURE['image_size']}, {MEASURE['points_per_side']} points/side, "
          f"<= {MEASURE['max_masks_per_slice']} objects/seed")
    summary = []
    for name, opts in (("before", BEFORE), ("after", AFTER)):
        torch.manual_seed(0)
        be = make_backend("sam2", **{**MEASURE, **opts})
        be._load()
        seeds, objs, per_obj = [], [], []
        orig_slice = be.slice_masks
        track = be.track_batched if be.batched_tracking else be.track_reference

        def slice_masks(frame, body=None, min_area_px=0):
            anns = orig_slice(frame, body, min_area_px)
            objs.append(len(anns))
            return anns

        def tracked(state, seed, masks, n, max_frames=None):
            seeds.append(seed)
            t = track(state, seed, masks, n, max_frames)
            per_obj.extend(len(o) for o in t)
            return t

        be.slice_masks = slice_masks
        if be.batched_tracking:
            be.track_batched = tracked
        else:
            be.track_reference = tracked
        t0 = time.time()
        masks = be.generate(case)
        sec = time.time() - t0
        c = be.counts
        n = x.shape[0]
        k = sum(objs)
        print(f"[{name}] {len(objs)} seeds (every {be.interval_mm:g} mm, >= {be.min_seed_slices}), "
              f"crop_n_layers {be.crop_n_layers}, {k} objects, {len(masks)} masks, {sec:.0f} s on CPU")
        print(f"[{name}] counted: AMG calls {c['amg_calls']}, encoder passes {c['encoder_passes_amg']} (AMG) + "
              f"{c['encoder_passes_track']} (tracking), tracking steps {c['track_steps']}")
        print(f"[{name}] closed form (objects never vanish): AMG encoder passes = seeds x crops = "
              f"{len(objs)} x {crops(be.crop_n_layers)} = {len(objs) * crops(be.crop_n_layers)}; tracking encoder "
              f"passes <= 1 + seeds x frames = {1 + len(seeds) * n}; tracking steps = objects x frames = {k * n}")
        summary.append(f"{name} {c['amg_calls']} AMG calls, {c['encoder_passes_amg'] + c['encoder_passes_track']} "
                       f"encoder passes, {c['track_steps']} tracking steps")
        stopped = sum(1 for p in per_obj if p < n)
        print(f"[{name}] objects tracked over fewer than all {n} frames (stopped when empty): {stopped} of {k}")
    print(f"SAM2 counted on the real CT {x.shape} (random tiny model): " + " vs ".join(summary))


def flops() -> dict:
    """TFLOP per image-encoder pass, per AMG decoder batch of 128 points, per tracking step (Hiera-L, 1024)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sam2.build_sam import build_sam2_video_predictor
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    pred = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_l.yaml", ckpt_path=None, device="cpu").to("meta")
    x = torch.zeros(1, 3, 1024, 1024, device="meta")
    out = {}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with FlopCounterMode(display=False) as fc:
            bo = pred.forward_image(x)
        out["encoder"] = fc.get_total_flops() / 1e12
        _, vis, pos, sizes = pred._prepare_backbone_features(bo)
        mem = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        cond = pred.track_step(frame_idx=0, is_init_cond_frame=True, current_vision_feats=vis,
                               current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None,
                               mask_inputs=torch.zeros(1, 1, 1024, 1024, device="meta"), output_dict=mem,
                               num_frames=300, run_mem_encoder=True)
        mem["cond_frame_outputs"][0] = cond
        for f in range(1, 17):
            mem["non_cond_frame_outputs"][f] = cond
        with FlopCounterMode(display=False) as fc:
            pred.track_step(frame_idx=17, is_init_cond_frame=False, current_vision_feats=vis,
                            current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None, mask_inputs=None,
                            output_dict=mem, num_frames=300, run_mem_encoder=True)
        out["track_step"] = fc.get_total_flops() / 1e12
        ip = SAM2ImagePredictor(pred)
        feats = [v.clone() for v in vis]
        feats[-1] = feats[-1] + pred.no_mem_embed
        fs = [(256, 256), (128, 128), (64, 64)]
        fl = [f.permute(1, 2, 0).view(1, -1, *s) for f, s in zip(feats[::-1], fs[::-1])][::-1]
        ip._features = {"image_embed": fl[-1], "high_res_feats": fl[:-1]}
        ip._is_image_set, ip._orig_hw = True, [(512, 512)]
        with FlopCounterMode(display=False) as fc:
            ip._predict(torch.zeros(128, 1, 2, device="meta"), torch.ones(128, 1, dtype=torch.int, device="meta"),
                        multimask_output=True, return_logits=True)
        out["amg_batch128"] = fc.get_total_flops() / 1e12
    print(f"FLOPs (sam2.1 Hiera-L, 1024, meta device): image encoder {out['encoder']:.3f} TFLOP/pass; "
          f"AMG decoder {out['amg_batch128']:.3f} TFLOP per 128 points; tracking step (1 object, 7 memories + "
          f"16 pointers) {out['track_step']:.3f} TFLOP")
    return out


def extrapolate(fl: dict) -> None:
    n, sp = 300, 1.5  # frames and mm along the slice axis on the 1.5 mm grid
    pts = 32 * 32
    print(f"extrapolation: 512x512x300 CT at 0.75x0.75x1.5 mm -> {n} frames on the 1.5 mm grid, body over the "
          f"whole stack, 70 objects per seed (the cap binds for a real model), 32x32 points per crop")

    res = {}

    def report(name, seeds, n_crops, steps, enc_track, prec):
        amg_enc = seeds * n_crops
        tf = (amg_enc * fl["encoder"] + seeds * n_crops * pts / 128 * fl["amg_batch128"]
              + enc_track * fl["encoder"] + steps * fl["track_step"])
        minutes = tf / TFLOPS[prec] / 60
        # AMG wall time is bound by its mask post-processing, not FLOPs: the paper's 2-3 min for 10-15 slices
        # at crop_n_layers 2 (21 crops) -> 8-18 s per call, scaled by the number of crops
        amg_lo, amg_hi = (seeds * sec * n_crops / 21 / 60 for sec in (8.0, 18.0))
        res[name] = (seeds, amg_enc + enc_track, steps, minutes + amg_lo, minutes + amg_hi)
        print(f"  {name}: AMG calls {seeds}, encoder passes {amg_enc} (AMG) + {enc_track} (tracking), "
              f"tracking steps {steps:,} -> {tf / 1e3:.0f} PFLOP -> ~{minutes:.1f} H100 min ({prec}, "
              f"{TFLOPS[prec]:.0f} TFLOP/s) + AMG post-processing {amg_lo:.1f}-{amg_hi:.1f} min "
              f"-> ~{minutes + amg_lo:.0f}-{minutes + amg_hi:.0f} min per CT")

    # before: a seed every 15 mm from step//2 (old rule), crop_n_layers 0, whole stack each way, fp32
    step = int(round(15.0 / sp))
    s_before = len(range(step // 2, n, step))
    report("before", s_before, crops(0), s_before * 70 * n, s_before * n, "fp32 (as coded before)")
    report("before, bf16 only", s_before, crops(0), s_before * 70 * n, s_before * n, "bf16 autocast + TF32")
    # after: a seed every 30 mm from the first body slice (>= 10), crop_n_layers 2, objects stop at their first
    # empty frame (forward not before 16 frames); each object's extent L (frames) around its seed uniformly placed
    step = int(round(30.0 / sp))
    seeds = list(range(0, n, step))
    if len(seeds) < 10:
        seeds = sorted(set(np.linspace(0, n - 1, 10).astype(int).tolist()))
    reach = 16
    for ext_mm in (None, 120.0, 80.0, 40.0):
        steps = 0
        for s in seeds:
            if ext_mm is None:
                steps += 70 * n
                continue
            L = int(round(ext_mm / sp))
            per = []
            for a in range(L):  # a frames of the object above the seed, L-1-a below
                b = L - 1 - a
                fwd = min(n - 1 - s, max(a + 1, reach))
                bwd = min(s, b + 1)
                per.append(1 + fwd + bwd)
            steps += int(round(70 * float(np.mean(per))))
        # tracking encoder passes: a seed's pass ends when its last object stops; assume one object (spine,
        # body wall) spans the whole stack -> every frame once per seed
        name = "after, objects never vanish" if ext_mm is None else f"after, objects {ext_mm:.0f} mm long"
        report(name, len(seeds), crops(2), steps, len(seeds) * n, "bf16 autocast + TF32")
    b, a, a0 = res["before"], res["after, objects 80 mm long"], res["after, objects never vanish"]
    print(f"SAM2 per 512x512x300 CT (extrapolated): before {b[0]} AMG calls, {b[1]:,} encoder passes, {b[2]:,} "
          f"tracking steps, ~{b[3]:.0f} H100 min (fp32) vs after {a[0]} AMG calls, {a[1]:,} encoder passes, "
          f"{a[2]:,} tracking steps if objects are 80 mm long ({a0[2]:,} if none vanishes), ~{a[3]:.0f}-{a[4]:.0f} "
          f"H100 min (bf16; {a0[3]:.0f}-{a0[4]:.0f} if none vanishes)")
    print("GPU timing: not measured -- no GPU was lent to this task; the minutes above are FLOP estimates.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ct", default="small", choices=["small", "full"],
                    help="small: the 30-slice CT (default, ~1 min); full: the 112-slice one (~5 min)")
    ap.add_argument("--no-measure", action="store_true")
    ap.add_argument("--no-flops", action="store_true")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    if not a.no_measure:
        measure(a.ct)
    if not a.no_flops:
        extrapolate(flops())


if __name__ == "__main__":
    main()
