"""MASS mask benchmarks (CPU). Prints:
  * SLIC seconds per real CT at 1.5 mm (totalseg_ct.nii.gz, 122x101x112 @3 mm -> ~11 Mvoxels),
  * SAM2 seconds per slice (tiny config, random weights, image_size 256, CPU): generator + propagation,
  * store bytes / dense bit-packed bytes and ms per random mask read (on the SLIC store).
Usage: OMP_NUM_THREADS=1 python bench/bench_masks.py [--skip-sam2] [--small]   (<= 5 min on 2 cores)
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-sam2", action="store_true")
    ap.add_argument("--small", action="store_true", help="use the 30-slice CT instead of the 112-slice one")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from conftest_masks import SHARED, make_raw_dataset, preprocess_stock, set_env
    from nnssl_plugins.pretrain.masks import MaskStore
    from nnssl_plugins.pretrain.masks.backends import CaseInput, make_backend
    from nnssl_plugins.pretrain.masks.dataset import PreprocessedDataset
    from nnssl_plugins.pretrain.masks.generate import process_case

    base = tempfile.mkdtemp(prefix="bench_masks_")
    set_env(None, base)
    ct = os.path.join(SHARED, "ct", "totalseg_ct_sm.nii.gz" if a.small else "totalseg_ct.nii.gz")
    # stock planning needs a label file: use a dummy body-threshold label (not used by slic)
    import SimpleITK as sitk

    img = sitk.ReadImage(ct)
    lab = sitk.Cast(sitk.BinaryThreshold(img, -500, 5000, 1, 0), sitk.sitkUInt8)
    lab_p = os.path.join(base, "lab.nii.gz")
    sitk.WriteImage(lab, lab_p)
    make_raw_dataset(os.environ["nnUNet_raw"], 990, "Bench", {"ct": ct}, {"ct": lab_p})
    t = time.time()
    preprocess_stock(990)
    print(f"stock nnU-Net preprocessing at 1.5 mm: {time.time() - t:.1f} s")
    ds = PreprocessedDataset(990)
    shape = ds.image_shape("ct")
    print(f"real CT {os.path.basename(ct)} preprocessed grid {shape[1:]} = {np.prod(shape[1:]) / 1e6:.1f} Mvoxels")
    be = make_backend("slic")
    t = time.time()
    r = process_case(ds, be, "ct", overwrite=True)
    print(f"SLIC (scales {be.scales_mm} mm): {time.time() - t:.1f} s per real CT, {r['masks']} masks")
    st = MaskStore.open(ds.store_path("slic", "ct"))
    print(f"store: {st.file_bytes() / 1e6:.2f} MB; dense bit-packed {st.dense_bitpacked_bytes() / 1e6:.1f} MB; "
          f"ratio {st.file_bytes() / st.dense_bitpacked_bytes():.4f}")
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(st), 300)
    t = time.time()
    for i in idx:
        st.crop(i)
    crop_ms = (time.time() - t) / len(idx) * 1e3
    st2 = MaskStore.open(st.path)  # cold handle: open + one read
    t = time.time()
    for i in idx[:100]:
        MaskStore.open(st.path).crop(i)
    open_ms = (time.time() - t) / 100 * 1e3
    t = time.time()
    for i in idx[:100]:
        st2.mask(i)
    mask_ms = (time.time() - t) / 100 * 1e3
    print(f"random read: crop {crop_ms:.2f} ms, full-grid mask {mask_ms:.2f} ms, open+crop {open_ms:.2f} ms")

    if not a.skip_sam2:
        torch.manual_seed(0)
        x = ds.load_image("ct")[0][:, ::2, ::2][:24]  # 24 slices of ~100x120 (ds 2x in-plane)
        sb = make_backend("sam2", checkpoint=None, allow_random_weights=True,
                          config="configs/sam2.1/sam2.1_hiera_t.yaml", image_size=256, points_per_side=8,
                          pred_iou_thresh=0.0, stability_score_thresh=0.0, max_masks_per_slice=4,
                          crop_n_layers=0, min_area_mm2=45.0, min_volume_mm3=675.0, interval_mm=1000.0,
                          min_seed_slices=1, body_fraction=0.0, device="cpu")  # random masks cover air
        sb._load()
        frame = np.stack([np.clip(x[12], 0, 1)] * 3, -1).astype(np.float32)
        t = time.time()
        anns = sb.slice_masks(frame)
        g = time.time() - t
        t = time.time()
        ms = sb.generate(CaseInput("ct", x[None], (1.5, 3.0, 3.0), ds.hu_inverse()))
        tot = time.time() - t
        print(f"SAM2 tiny@256 CPU: generator {g:.2f} s per seed slice (8 pts/side, {len(anns)} masks); "
              f"full case {x.shape} 1 seed + 2-way propagation: {tot:.1f} s = {tot / x.shape[0]:.2f} s per slice, "
              f"{len(ms)} masks")


if __name__ == "__main__":
    import shutil

    try:
        main()
    finally:
        for d in __import__("glob").glob(os.path.join(tempfile.gettempdir(), "bench_masks_*")):
            shutil.rmtree(d, ignore_errors=True)
