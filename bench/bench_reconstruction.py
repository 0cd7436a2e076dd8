"""PSNR/SSIM of Hi-End-MAE and MAESIL reconstructions after a smoke run on the real MRI and CT (numbers, no goal).

Real volumes from ../shared/data: the MNI152 T1 MRI and the TotalSegmentator CT (112 slices). For each
method: tiny preset → `<Method>PretrainTrainer_smoke` (2 × 10 iterations) on that one volume → 
nnssl_eval_reconstruction under the method's own masking. A smoke run is far from converged: the numbers
show the pipeline end to end, not the papers' values (MAESIL paper: PSNR 30.28 after full training).
Usage: python bench/bench_reconstruction.py
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("NNSSL_SHARED_DATA", os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data"))
VOLUMES = {"MRI (MNI152 T1)": (os.path.join(DATA, "mr", "mni152_t1.nii.gz"), "T1"),
           "CT (TotalSegmentator, 112 slices)": (os.path.join(DATA, "ct", "totalseg_ct.nii.gz"), "CT")}


def main():
    import torch

    from nnssl_plugins.cli.trainer_path import ensure_trainer_discovery

    work = tempfile.mkdtemp(prefix="bench_recon_")
    for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[n] = os.path.join(work, n)
        os.makedirs(os.environ[n])
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    os.environ.setdefault("nnUNet_compile", "false")
    ensure_trainer_discovery()
    from nnunetv2.run.run_training import run_training

    from nnssl_plugins.cli.eval_reconstruction import main as eval_main
    from nnssl_plugins.planners.api import plan_and_preprocess

    rows = []
    try:
        for ds_id, (label, (path, channel)) in enumerate(VOLUMES.items(), start=980):
            name = f"Dataset{ds_id}_Recon{channel}"
            raw = os.path.join(os.environ["nnUNet_raw"], name)
            os.makedirs(os.path.join(raw, "imagesTr"))
            shutil.copy(path, os.path.join(raw, "imagesTr", "vol_0000.nii.gz"))
            with open(os.path.join(raw, "dataset.json"), "w") as f:
                json.dump({"channel_names": {"0": channel}, "file_ending": ".nii.gz", "numTraining": 1}, f)
            for method in ("HiEndMAE", "MAESIL"):
                t0 = time.time()
                with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # nnU-Net's chatter
                    plans = plan_and_preprocess(ds_id, method, "tiny")
                    tr = f"{method}PretrainTrainer_smoke"
                    run_training(name, "3d_fullres", "all", tr, plans, device=torch.device("cpu"))
                ck = os.path.join(os.environ["nnUNet_results"], name, f"{tr}__{plans}__3d_fullres", "fold_all",
                                  "checkpoint_final.pth")
                out = os.path.join(work, f"eval_{method}_{ds_id}")
                with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                    eval_main(["-ckpt", ck, "-d", str(ds_id), "-n", "1", "-o", out, "-device", "cpu"])
                res = json.load(open(os.path.join(out, "reconstruction_metrics.json")))
                mean = res.get("mean", res)
                rows.append((label, method, mean.get("psnr"), mean.get("ssim"), time.time() - t0))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    for label, method, psnr, ssim, dt in rows:
        print(f"{method} on {label}: PSNR {psnr:.2f} dB, SSIM {ssim:.3f} after a smoke run ({dt:.0f} s incl. "
              f"planning)")
    print("LPIPS is not computed (it needs pretrained 2D network weights, not available offline). Hi-End-MAE "
          "predicts per-patch-normalised targets and is de-normalised with the true patch mean/std (official "
          "visualisation), which flatters its PSNR; MAESIL predicts raw intensities.")


if __name__ == "__main__":
    sys.exit(main())
