"""SAM2 backend: real SAM2 model (package config, random weights), real automatic generator + video
tracking (in-memory frame shim) on small volumes; defaults and slice/axis rules checked against the
official MASS mask generation (../shared/peers/MASS, imported in a subprocess)."""
import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import REAL_CT, REAL_CT_SEG, SHARED_DATA
from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.masks import MaskStore, write_store
from nnssl_plugins.pretrain.masks.backends import CaseInput, make_backend
from nnssl_plugins.pretrain.masks.backends.sam2 import (Sam2Backend, _in_memory_frames, body_mask, choose_axis,
                                                        seed_slices)
from nnssl_plugins.pretrain.masks.postprocess import clean_mask
from nnssl_plugins.pretrain.masks.windows import CT_WINDOW_PRESETS, QUANTILE_PRESETS

OFFICIAL_DIR = os.path.join(os.path.dirname(SHARED_DATA), "peers", "MASS", "preprocessing", "mass_preprocessing")
OFFICIAL = os.path.join(OFFICIAL_DIR, "generate_masks.py")
TINY = dict(checkpoint=None, allow_random_weights=True, config="configs/sam2.1/sam2.1_hiera_t.yaml", device="cpu")

# runs the official module (its imports: numpy, torch, SimpleITK, nibabel, scipy, matplotlib; cv2 is only used
# for JPEG/CLAHE/contours, none of which is called here, so a stub stands in for it)
_OFFICIAL_SCRIPT = textwrap.dedent("""
    import json, sys, types
    import numpy as np
    sys.modules["cv2"] = types.ModuleType("cv2")
    sys.path.insert(0, sys.argv[1])
    import logging
    import generate_masks as g
    logging.disable(logging.CRITICAL)
    cases = json.loads(sys.argv[2])
    seeds = []
    for n, lo, hi, sp, interval, min_n in cases["seeds"]:
        body = np.zeros((n, 4, 4), dtype=np.uint8)
        body[lo:hi + 1] = 1
        # official arrays are (z, y, x), spacing (x, y, z); axis 0 is z
        idx = g.sample_slices_with_interval_gt_aware(body, body, interval, 0, (1.0, 1.0, sp), image_path=None,
                                                     min_slices_per_sample=min_n)
        seeds.append([int(i) for i in idx])
    axes = [g.determine_best_axes(tuple(sp[::-1]))[0] for sp in cases["axes"]]
    cfg = {k: {kk: (vv if kk != "enhancement" else {a: b for a, b in vv.items() if "range" in a})
               for kk, vv in v.items()} for k, v in g.DATASET_CONFIGS.items()}
    print(json.dumps({"configs": cfg, "seeds": seeds, "axes": axes}))
""")


def _argparse_defaults(tree) -> dict:
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args:
            flag = getattr(node.args[0], "value", None)
            for kw in node.keywords:
                if kw.arg == "default" and isinstance(kw.value, ast.Constant):
                    out[flag] = kw.value.value
    return out


def _body_threshold(tree) -> float:
    """The constant of the official body filter `overlap_ratio >= 0.9`."""
    found = [n.comparators[0].value for n in ast.walk(tree) if isinstance(n, ast.Compare)
             and isinstance(n.left, ast.Name) and n.left.id == "overlap_ratio" and isinstance(n.ops[0], ast.GtE)]
    assert len(found) == 1, found
    return float(found[0])


def test_default_settings_match_official():
    assert os.path.isfile(OFFICIAL), f"official MASS code missing at {OFFICIAL}"
    seed_cases = [[100, 0, 99, 1.5, 30.0, 10], [300, 20, 279, 1.5, 30.0, 10], [112, 5, 100, 3.0, 30.0, 10],
                  [300, 0, 299, 1.5, 15.0, 10], [40, 12, 17, 1.5, 30.0, 10], [60, 3, 58, 0.8, 30.0, 1]]
    axis_cases = [[1.5, 1.5, 1.5], [5.0, 0.8, 0.8], [0.8, 0.8, 5.0], [0.8, 5.0, 0.8], [1.2, 1.0, 1.1],
                  [1.0, 1.0, 1.25]]
    r = subprocess.run([sys.executable, "-c", _OFFICIAL_SCRIPT, OFFICIAL_DIR,
                        json.dumps({"seeds": seed_cases, "axes": axis_cases})], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    off = json.loads(r.stdout.strip().splitlines()[-1])
    tree = ast.parse(open(OFFICIAL).read())
    cli = _argparse_defaults(tree)

    ours = {k: v.default for k, v in inspect.signature(Sam2Backend.__init__).parameters.items() if k != "self"}
    prof = off["configs"]["abdomen_ct"]  # the paper's default profile (and the official --dataset_name default)
    assert cli["--dataset_name"] == "abdomen_ct"
    for k, v in prof["sam_params"].items():
        if k == "output_mode":
            continue  # ours always asks for binary masks (the official value too)
        assert ours[k] == v, (k, ours[k], v)
    # official passes min_pixel_count to the generator as min_mask_region_area, and reads it as mm^2 at 1 mm
    # per pixel for its own area minimum; min_voxel_count likewise (see docs/mass.md)
    assert ours["min_mask_region_area"] == prof["min_pixel_count"]
    assert ours["min_area_mm2"] == prof["min_pixel_count"]
    assert ours["min_volume_mm3"] == prof["min_voxel_count"]
    assert ours["max_masks_per_slice"] == cli["--max_masks_per_slice"]
    assert ours["interval_mm"] == cli["--physical_interval_mm"]
    assert ours["min_seed_slices"] == cli["--min_slices_per_sample"]
    assert ours["body_fraction"] == _body_threshold(tree)
    assert ours["config"] == cli["--model_cfg"]
    # window presets: every official CT / MR profile (autopet_suv windows raw SUV: not invertible here)
    for name, c in off["configs"].items():
        enh = c["enhancement"]
        if "window_ranges" in enh and c["modality"] == "CT":
            assert CT_WINDOW_PRESETS[name] == tuple((w["center"], w["width"]) for w in enh["window_ranges"]), name
        elif "quantile_ranges" in enh:
            assert QUANTILE_PRESETS[name] == tuple((q["lower"], q["upper"]) for q in enh["quantile_ranges"]), name
        else:
            assert name == "autopet_suv"
    assert ours["ct_windows"] == "abdomen_ct" and ours["quantiles"] == "abdomen_mr"
    # seed slices and slice axis: the official functions on the same inputs
    for (n, lo, hi, sp, interval, min_n), want in zip(seed_cases, off["seeds"]):
        assert seed_slices(n, sp, interval, min_n, (lo, hi)) == want, (n, lo, hi, sp, interval)
    assert [choose_axis(sp) for sp in axis_cases] == off["axes"]


def test_unknown_and_bad_options_rejected():
    with pytest.raises(UserInputError, match=r"unknown option 'crop_layers' for --backend sam2\. Valid options: .*"
                                             r"crop_n_layers"):
        make_backend("sam2", crop_layers=1, **TINY)
    with pytest.raises(UserInputError, match=r"unknown option 'min_area' .*min_area_mm2"):
        make_backend("sam2", min_area=20, **TINY)
    with pytest.raises(UserInputError, match=r"unknown option 'scales' for --backend slic\. Valid options: .*scales_mm"):
        make_backend("slic", scales=[30])
    with pytest.raises(UserInputError, match=r"--options crop_n_layers='two': expected an integer"):
        make_backend("sam2", crop_n_layers="two", **TINY)
    with pytest.raises(UserInputError, match=r"--options pred_iou_thresh=1.5: must be in \[0.0, 1.0\]"):
        make_backend("sam2", pred_iou_thresh=1.5, **TINY)
    with pytest.raises(UserInputError, match=r"ct_windows 'lung': unknown preset\. Choose one of: abdomen_ct.*chest_ct"):
        make_backend("sam2", ct_windows="lung", **TINY)
    with pytest.raises(UserInputError, match=r"three \[center, width\] HU pairs"):
        make_backend("sam2", ct_windows=[[40, 400]], **TINY)
    from nnssl_plugins.cli import generate_masks  # the CLI path: before any dataset is looked up

    with pytest.raises(UserInputError, match=r"unknown option 'crop_layers' for --backend sam2"):
        generate_masks.main(["-d", "1", "--backend", "sam2", "-device", "cpu", "--options", '{"crop_layers": 1}'])
    be = make_backend("sam2", ct_windows="chest_ct", quantiles=[[2, 98], [10, 90], [0, 100]], **TINY)
    assert be.params["ct_windows"] == [[-600.0, 1500.0], [50.0, 350.0], [500.0, 2000.0]]
    assert be.params["quantiles"][0] == [2.0, 98.0]


def _phantom_ct():
    """HU phantom (X, Y, Z) at 1.5 mm: air, a body cylinder (40 HU) with two lungs (-850 HU), a 6 mm
    table slab (300 HU) under it touching it along a 1.5 mm wide line."""
    z, y, x = np.mgrid[0:24, 0:64, 0:64]
    hu = np.full((24, 64, 64), -1000.0, np.float32)
    body = ((y - 28) / 20.0) ** 2 + ((x - 32) / 26.0) ** 2 <= 1.0
    hu[body] = 40.0
    for cx in (20, 44):
        hu[body & (((y - 26) / 8.0) ** 2 + ((x - cx) / 6.0) ** 2 <= 1.0)] = -850.0
    hu[:, 49:53, 4:60] = 300.0       # table (rows 49-52), body bottom is row 48
    hu[:, 48, 31:33] = 300.0          # thin contact
    return hu, body


def test_body_mask_and_filter_drop_outside_masks():
    hu, body_true = _phantom_ct()
    inv = {"mean": 0.0, "std": 1.0, "lo": -1024.0, "hi": 3000.0}
    body = body_mask(hu, inv, None, (1.5, 1.5, 1.5), 0)
    assert body[body_true].all()                       # lungs filled, whole body kept
    # table cut off at the thin contact (the opening keeps a few voxels right next to it)
    assert body[:, 49:53].sum() < 0.1 * (hu[:, 49:53] > 0).sum()
    assert body.sum() <= body_true.sum() * 1.01 + 2 * 24
    mr = body_mask((hu - hu.mean()) / hu.std(), None, None, (1.5, 1.5, 1.5), 0)  # no HU: Otsu threshold
    assert mr[body_true].all() and mr[:, 49:53].sum() < 0.1 * (hu[:, 49:53] > 0).sum()

    be = make_backend("sam2", image_size=128, points_per_side=2, crop_n_layers=0, **TINY)
    be._load()
    frame = np.zeros((64, 64, 3), np.float32)
    inside = body_true[0] & (np.arange(64)[None, :] < 32)
    on_table = np.zeros((64, 64), bool)
    on_table[49:53, 10:50] = True
    in_air = np.zeros((64, 64), bool)
    in_air[0:6, 0:20] = True
    air = np.flatnonzero(~body[0].ravel())

    def with_outside(frac):  # the body slice plus enough outside pixels for an inside fraction `frac`
        m = body_true[0].copy().ravel()
        m[air[:int(round(m.sum() * (1 / frac - 1)))]] = True
        return m.reshape(64, 64)

    below, above = with_outside(0.88), with_outside(0.92)
    assert 0.87 < (below & body[0]).sum() / below.sum() < 0.9 < (above & body[0]).sum() / above.sum() < 0.93
    fake = [{"segmentation": m, "area": int(m.sum()), "predicted_iou": 0.9}
            for m in (on_table, inside, in_air, below, above)]
    be._generator.generate = lambda img: list(fake)
    kept = be.slice_masks(frame, body[0])
    assert len(kept) == 2 and kept[0]["segmentation"] is inside and kept[1]["segmentation"] is above
    assert len(be.slice_masks(frame, None)) == 5       # no body: nothing dropped
    be.max_masks_per_slice = 1
    assert be.slice_masks(frame, body[0])[0]["segmentation"] is inside  # generator order, then the cap


def test_body_mask_on_real_ct_covers_organs():
    import SimpleITK as sitk

    img = sitk.GetArrayFromImage(sitk.ReadImage(REAL_CT)).astype(np.float32)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(REAL_CT_SEG))
    body = body_mask(img, {"mean": 0.0, "std": 1.0, "lo": -1024.0, "hi": 3071.0}, None, (3.0, 3.0, 3.0), 0)
    organs = seg > 0
    assert (body & organs).sum() / organs.sum() > 0.995     # TotalSegmentator structures lie inside
    assert not body[:, :2].any() and not body[:, -2:].any()  # image border rows (air) outside
    assert 0.2 < body.mean() < 0.9


class _Vanish:
    """Wraps the predictor's per-frame step: object k's mask is forced empty from distance `after[k]` from the
    seed on (per direction). Objects are recognised by their conditioning object pointer, so this works for
    sam2's one-at-a-time loop and for the batched one alike. Also records precision of every step."""

    def __init__(self, pred, seed, after_fwd, after_bwd):
        self.pred, self.seed, self.after = pred, seed, {False: after_fwd, True: after_bwd}
        self.orig = pred._run_single_frame_inference
        self.ptrs = None
        self.autocast, self.dtypes, self.steps = set(), set(), []
        pred._run_single_frame_inference = self

    def __call__(self, **kw):
        out, low = self.orig(**kw)
        self.autocast.add(torch.is_autocast_enabled("cpu"))
        self.dtypes.add(low.dtype)
        if kw["is_init_cond_frame"]:
            return out, low
        ptr = kw["output_dict"]["cond_frame_outputs"][self.seed]["obj_ptr"]
        ids = [int(torch.cdist(p[None], self.ptrs).argmin()) for p in ptr]
        d = abs(kw["frame_idx"] - self.seed)
        for row, k in enumerate(ids):
            self.steps.append((kw["reverse"], kw["frame_idx"], k))
            if d >= self.after[kw["reverse"]][k]:
                low[row] = -1024.0
                out["pred_masks"][row] = -1024.0
        return out, low


def _tracking_case():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.05, (20, 48, 48)).astype(np.float32)
    x[2:18, 8:30, 8:30] += 0.8
    x[1:19, 28:44, 20:44] += 0.4
    frames = np.repeat(np.clip(x, 0, 1)[..., None], 3, -1).astype(np.float32)
    s = 8
    masks = [x[s] > 0.6, (x[s] > 0.2) & (x[s] < 0.6), x[s] < 0.2]
    return frames, s, masks


def test_batched_tracking_equals_one_at_a_time_and_stops_when_empty():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    frames, s, masks = _tracking_case()
    n = frames.shape[0]
    be = make_backend("sam2", image_size=128, **TINY)
    be._load()
    pred = be._predictor
    pred.max_obj_ptrs_in_encoder = 4           # memory reach 7 frames (num_maskmem 7) instead of 16: short test
    reach = be.memory_reach()
    assert reach == 7
    fwd, bwd = [99, 9, 2], [99, 3, 5]          # object 0 never vanishes; 1 at +9 / -3; 2 at +2 (< reach) / -5
    runs = {}
    with torch.inference_mode(), _in_memory_frames(frames):
        state = pred.init_state(video_path="<in-memory>", offload_video_to_cpu=True)
        for k, m in enumerate(masks):  # each object's conditioning pointer (sam2's own single-object step)
            pred.add_new_mask(state, frame_idx=s, obj_id=k, mask=m)
        pred.propagate_in_video_preflight(state)
        ptrs = torch.cat([state["output_dict_per_obj"][k]["cond_frame_outputs"][s]["obj_ptr"] for k in range(3)])
        for mode in ("reference", "batched", "batched_stop"):
            van = _Vanish(pred, s, fwd, bwd)
            van.ptrs = ptrs
            be.stop_when_empty = mode == "batched_stop"
            c0 = be.counts["track_steps"]
            fn = be.track_reference if mode == "reference" else be.track_batched
            runs[mode] = (fn(state, s, masks, n), be.counts["track_steps"] - c0, van)
            pred._run_single_frame_inference = van.orig
    ref, ref_steps, _ = runs["reference"]
    bat, bat_steps, van_b = runs["batched"]
    stop, stop_steps, van_s = runs["batched_stop"]
    # batched == one object at a time, frame by frame, pixel for pixel
    for k in range(3):
        assert sorted(bat[k]) == sorted(ref[k])
        for f in ref[k]:
            assert np.array_equal(bat[k][f], ref[k][f]), (k, f)
    assert ref_steps == bat_steps == 3 + 3 * (n - 1)
    assert sorted(ref[0]) == list(range(n))                       # object 0 tracked over the whole stack
    # stopping: each object stops at its first empty frame (forward not before the memory reach)
    n_fwd, n_bwd = n - 1 - s, s
    want = {k: (min(max(fwd[k], reach), n_fwd), min(bwd[k], n_bwd)) for k in range(3)}
    for k in range(3):
        got_f = [f for r, f, kk in van_s.steps if kk == k and not r]
        got_b = [f for r, f, kk in van_s.steps if kk == k and r]
        assert got_f == list(range(s + 1, s + 1 + want[k][0])), (k, got_f)
        assert got_b == list(range(s - 1, s - 1 - want[k][1], -1)), (k, got_b)
    assert stop_steps == 3 + sum(a + b for a, b in want.values()) < bat_steps
    # ... which changes nothing after post-processing (largest component touching the seed slice)
    for k in range(3):
        assert set(stop[k]) <= set(bat[k])
        a, b = Sam2Backend._to_volume(bat[k]), Sam2Backend._to_volume(stop[k])
        ma = clean_mask(a[0], 1, seed_axis=0, seed_slice=s, offset=a[1])
        mb = clean_mask(b[0], 1, seed_axis=0, seed_slice=s, offset=b[1])
        assert ma.bbox == mb.bbox and np.array_equal(ma.crop, mb.crop)
        assert ma.bbox[1] - ma.bbox[0] == min(fwd[k], n_fwd + 1) + min(bwd[k], n_bwd + 1) - 1
    # CPU path: fp32, no autocast
    assert van_b.autocast == van_s.autocast == {False} and van_b.dtypes == van_s.dtypes == {torch.float32}

    # max_track_mm bounds how far a seed propagates: 3 frames at 1.5 mm each way
    with torch.inference_mode(), _in_memory_frames(frames):
        state = pred.init_state(video_path="<in-memory>", offload_video_to_cpu=True)
        for fn in (be.track_batched, be.track_reference):
            tr = fn(state, s, masks, n, max_frames=3)
            assert sorted(tr[0]) == list(range(s - 3, s + 4))


def test_sam2_random_model_generate_and_propagate(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.1, (10, 64, 64)).astype(np.float32)
    x[2:8, 10:40, 10:40] += 2.0
    x[1:9, 40:60, 30:60] -= 1.0
    be = make_backend("sam2", image_size=128, points_per_side=4, crop_n_layers=1, pred_iou_thresh=0.0,
                      stability_score_thresh=0.0, box_nms_thresh=0.9, crop_nms_thresh=0.9, max_masks_per_slice=3,
                      min_area_mm2=40, min_volume_mm3=400, interval_mm=15.0, min_seed_slices=2, body_fraction=0.0,
                      seed=0, **TINY)
    calls = {"gen": 0, "track": 0}
    orig_slice, orig_track = be.slice_masks, be.track_batched

    def slice_masks(frame, body=None, min_area_px=0):
        calls["gen"] += 1
        assert frame.dtype == np.float32 and frame.shape == (64, 64, 3)
        assert min_area_px == 18  # 40 mm^2 / (1.5 mm)^2, rounded up
        anns = orig_slice(frame, body, min_area_px)
        assert 1 <= len(anns) <= 3
        return anns

    def track(state, seed, masks, n, max_frames=None):
        calls["track"] += 1
        assert state["num_frames"] == 10 and state["images"].shape[-1] == 128  # shim fed the whole stack
        orig_add = be._predictor.add_new_mask
        added = []

        def add(st, frame_idx, obj_id, mask):
            added.append(obj_id)
            return orig_add(st, frame_idx=frame_idx, obj_id=obj_id, mask=mask)

        be._predictor.add_new_mask = add
        try:
            tracks = orig_track(state, seed, masks, n, max_frames)
        finally:
            be._predictor.add_new_mask = orig_add
        assert added == list(range(len(masks)))  # all objects of the seed added, then tracked as one batch
        assert all(seed in t for t in tracks)
        return tracks

    be.slice_masks, be.track_batched = slice_masks, track
    c0 = dict(be.counts)
    masks = be.generate(CaseInput("c", x[None], (3.0, 1.5, 1.5), None))
    # 10 slices * 3 mm, a seed every 15 mm = 5 slices from the first (body_fraction 0: whole stack is body)
    assert calls["gen"] == 2 and calls["track"] == 2
    assert be.counts["amg_calls"] - c0["amg_calls"] == 2
    assert be.counts["encoder_passes_amg"] - c0["encoder_passes_amg"] == 2 * 5  # crop_n_layers 1: 1 + 4 crops
    assert len(masks) >= 1
    for m in masks:
        assert m.meta["seed_axis"] == 0 and m.meta["seed_slice"] in (0, 5)
        assert m.voxels >= 30  # 400 mm^3 / 13.5 mm^3 per voxel
        assert m.bbox[0] <= m.meta["seed_slice"] < m.bbox[1]
    p = str(tmp_path / "c.nnsslmask")
    write_store(p, x.shape, masks, be.name, be.params, case_id="c")
    st = MaskStore.open(p)
    assert len(st) == len(masks) and st.meta["params"]["points_per_side"] == 4
    assert st.meta["params"]["crop_n_layers"] == 1 and st.meta["params"]["ct_windows"][0] == [60.0, 350.0]
    assert np.array_equal(st.mask(0), masks[0].dense(x.shape))


def test_missing_checkpoint_message():
    with pytest.raises(UserInputError, match="required"):
        Sam2Backend(checkpoint=None)
    with pytest.raises(UserInputError, match="no such config"):
        Sam2Backend(checkpoint=None, allow_random_weights=True, config="sam2.1_hiera_t.yaml")
