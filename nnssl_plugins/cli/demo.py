"""nnssl_demo: the whole chain on the embedded real CT, in a temporary nnU-Net workspace.

  1. tiny MDAE pretraining on the (unlabeled) CT        nnssl_pretrain -m MDAE --preset tiny -tr _smoke
  2. transfer the checkpoint's plans to a labeled copy  nnssl_transfer_plans
  3. stock preprocessing of the labeled copy            nnUNetv2_preprocess -plans_name ...
  4. a few iterations of stock nnU-Net finetuning       nnUNetv2_train ... -pretrained_weights ckpt
  5. a classification run on crops of the CT (liver in view or not), frozen pretrained encoder
                                                        nnssl_finetune --task cls -tr _smoke
Every step is the real command a user runs; each prints where its outputs are.

`nnssl_demo --method MASS` runs the MASS chain instead (CPU, a few minutes):
  1. tiny MASS pretraining with slic masks               nnssl_pretrain -m MASS --preset tiny -tr _smoke
  2. in-context segmentation of the liver, CT + its labels as the reference (no finetuning)
                                                         nnssl_incontext_predict -r CT SEG --labels 5
  3. PCA picture of the checkpoint's decoder features    nnssl_visualize features
  4. QC overlay of the generated masks                   nnssl_visualize masks
The tiny smoke-trained model is not expected to segment well: the demo shows the commands and outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from nnssl_plugins.errors import UserInputError, run_cli

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo")
DEMO_LABELS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3}


def _bin(name: str) -> str:
    cand = os.path.join(os.path.dirname(sys.executable), name)
    return cand if os.path.isfile(cand) else name


def _cli(name: str, module: str) -> list:
    """The console script when installed, else `python -m module` (same entry point)."""
    cand = os.path.join(os.path.dirname(sys.executable), name)
    return [cand] if os.path.isfile(cand) else [sys.executable, "-m", module]


def _run(step: str, cmd: list, env: dict) -> None:
    print(f"\n=== {step}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise UserInputError(f"demo step '{step}' failed (exit {r.returncode}); its output is above.")
    print(f"--- {step}: done in {time.time() - t0:.0f} s", flush=True)


def make_demo_datasets(raw: str) -> None:
    import numpy as np
    import SimpleITK as sitk

    ct = os.path.join(DEMO_DIR, "totalseg_ct_sm.nii.gz")
    pre = os.path.join(raw, "Dataset901_DemoCTUnlabeled")
    os.makedirs(os.path.join(pre, "imagesTr"), exist_ok=True)
    shutil.copy(ct, os.path.join(pre, "imagesTr", "ct_0000.nii.gz"))
    with open(os.path.join(pre, "dataset.json"), "w") as f:  # no labels: pretraining data
        json.dump({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 1}, f)

    tgt = os.path.join(raw, "Dataset902_DemoCTOrgans")
    os.makedirs(os.path.join(tgt, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(tgt, "labelsTr"), exist_ok=True)
    shutil.copy(ct, os.path.join(tgt, "imagesTr", "ct_0000.nii.gz"))
    seg_img = sitk.ReadImage(os.path.join(DEMO_DIR, "totalseg_ct_sm_seg.nii.gz"))
    seg = sitk.GetArrayFromImage(seg_img)
    out = np.zeros_like(seg, dtype=np.uint8)
    for new, (name, old) in enumerate(DEMO_LABELS.items(), start=1):
        out[seg == old] = new
    o = sitk.GetImageFromArray(out)
    o.CopyInformation(seg_img)
    sitk.WriteImage(o, os.path.join(tgt, "labelsTr", "ct.nii.gz"))
    labels = {"background": 0, **{n: i for i, n in enumerate(DEMO_LABELS, start=1)}}
    with open(os.path.join(tgt, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz", "numTraining": 1}, f)


def run_mass(work: str, env: dict, device: str) -> None:
    """MASS chain: pretraining (slic masks) -> in-context liver segmentation -> feature PCA -> mask overlay."""
    spacing = ["3", "3", "3"]  # the CT's own resolution keeps the CPU demo to a few minutes
    plans = "nnsslPlans_MASS_tiny"
    out_dir = os.path.join(work, "mass_outputs")
    os.makedirs(out_dir, exist_ok=True)
    ct = os.path.join(DEMO_DIR, "totalseg_ct_sm.nii.gz")
    seg = os.path.join(DEMO_DIR, "totalseg_ct_sm_seg.nii.gz")
    _run("1/4 tiny MASS pretraining (plan + preprocess + slic masks + 2x10 iterations)",
         [_bin("nnssl_pretrain"), "-d", "901", "-m", "MASS", "--preset", "tiny", "-tr", "_smoke", "-device", device,
          "--spacing", *spacing, "--mask-backend", "slic"], env)
    run_dir = os.path.join(env["nnUNet_results"], "Dataset901_DemoCTUnlabeled",
                           f"MASSPretrainTrainer_smoke__{plans}__3d_fullres", "fold_all")
    ckpt = os.path.join(run_dir, "checkpoint_final.pth")
    masks = os.path.join(env["nnUNet_preprocessed"], "Dataset901_DemoCTUnlabeled", "nnssl_masks", plans, "slic")
    print(f"Pretraining checkpoint: {ckpt}\nProgress plot: {os.path.join(run_dir, 'progress.png')}\n"
          f"Mask stores: {masks}")
    liver = os.path.join(out_dir, "liver_incontext.nii.gz")
    emb = os.path.join(out_dir, "liver_task_embedding.safetensors")
    _run("2/4 in-context segmentation of the liver (reference: the CT and its labels)",
         _cli("nnssl_incontext_predict", "nnssl_plugins.cli.incontext_predict")
         + ["-ckpt", ckpt, "-r", ct, seg, "--labels", str(DEMO_LABELS["liver"]), "-i", ct, "-o", liver,
            "-device", device, "--save-embedding", emb], env)
    pca = os.path.join(out_dir, "features_pca.png")
    _run("3/4 decoder features (PCA as RGB)",
         _cli("nnssl_visualize", "nnssl_plugins.cli.visualize")
         + ["features", "-ckpt", ckpt, "-i", ct, "-o", pca, "-device", device], env)
    overlay = os.path.join(out_dir, "masks_overlay.png")
    _run("4/4 mask QC overlay", _cli("nnssl_visualize", "nnssl_plugins.cli.visualize")
         + ["masks", "-d", "901", "-c", "ct", "--backend", "slic", "-p", plans, "-o", overlay], env)
    print(f"\nDemo (MASS) finished.\n  checkpoint: {ckpt}\n  in-context liver segmentation: {liver}\n"
          f"  task embedding: {emb}\n  feature PCA: {pca}\n  mask overlay: {overlay}\n  mask stores: {masks}\n"
          f"Workspace kept at {work}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nnssl_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="workspace (default: a new temporary folder, kept)")
    p.add_argument("-device", default="cpu")
    p.add_argument("--method", default="MDAE", type=str.upper, choices=["MDAE", "MASS"],
                   help="MDAE (default): pretrain -> transfer -> stock finetuning; MASS: pretrain -> in-context "
                        "segmentation -> feature/mask pictures")
    args = p.parse_args(argv)
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="nnssl_demo_"))
    env = dict(os.environ)
    for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[n] = os.path.join(work, n)
        os.makedirs(env[n], exist_ok=True)
    env.setdefault("nnUNet_n_proc_DA", "0")
    env.setdefault("nnUNet_compile", "false")
    print(f"nnssl_demo workspace: {work}\n(embedded real CT: {DEMO_DIR}, license TotalSegmentator-Apache-2.0.txt)")
    make_demo_datasets(env["nnUNet_raw"])
    if args.method == "MASS":
        run_mass(work, env, args.device)
        return 0
    spacing = ["3", "3", "3"]  # the CT's own resolution keeps the CPU demo to a few minutes
    _run("1/5 tiny MDAE pretraining (plan + preprocess + 2x10 iterations)",
         [_bin("nnssl_pretrain"), "-d", "901", "-m", "MDAE", "--preset", "tiny", "-tr", "_smoke", "-device",
          args.device, "--spacing", *spacing], env)
    ckpt = os.path.join(env["nnUNet_results"], "Dataset901_DemoCTUnlabeled",
                        "MDAEPretrainTrainer_smoke__nnsslPlans_MDAE_tiny__3d_fullres", "fold_all",
                        "checkpoint_final.pth")
    print(f"Pretraining checkpoint: {ckpt}\nProgress plot: {os.path.join(os.path.dirname(ckpt), 'progress.png')}")
    _run("2/5 transfer plans to the labeled target", [_bin("nnssl_transfer_plans"), "-d", "902", "-ckpt", ckpt], env)
    _run("3/5 stock nnU-Net preprocessing", [_bin("nnUNetv2_preprocess"), "-d", "902", "-plans_name",
                                             "nnsslPlans_MDAE_tiny", "-c", "3d_fullres", "-np", "1"], env)
    _run("4/5 stock nnU-Net finetuning with the pretrained weights",
         [_bin("nnUNetv2_train"), "902", "3d_fullres", "all", "-p", "nnsslPlans_MDAE_tiny", "-tr",
          "nnUNetTrainer_nnsslSmoke", "-pretrained_weights", ckpt, "-device", args.device], env)
    fin = os.path.join(env["nnUNet_results"], "Dataset902_DemoCTOrgans",
                       "nnUNetTrainer_nnsslSmoke__nnsslPlans_MDAE_tiny__3d_fullres", "fold_all")
    make_cls_dataset(env["nnUNet_raw"])
    _run("5/5 classification (frozen pretrained encoder + attention pooling head)",
         [_bin("nnssl_finetune"), "-d", "903", "-ckpt", ckpt, "--task", "cls", "-tr", "_smoke", "-f", "all",
          "-device", args.device], env)
    cls = os.path.join(env["nnUNet_results"], "Dataset903_DemoCTLiverInView",
                       "nnsslClsTrainer_Frozen_smoke__nnsslPlans_MDAE_tiny__3d_fullres", "fold_all")
    print(f"\nDemo finished. Finetuned model: {fin}\n  validation: {os.path.join(fin, 'validation')}\n"
          f"  summary: {os.path.join(fin, 'validation', 'summary.json')}\n"
          f"Classifier: {cls}\n  metrics: {os.path.join(cls, 'validation_classification.json')}\n"
          f"Workspace kept at {work}")
    return 0


def make_cls_dataset(raw: str, n_per_axis: int = 3) -> None:
    """Crops of the demo CT on a grid, labelled by whether the liver (TotalSegmentator label 5) fills ≥ 2 %."""
    import numpy as np
    import SimpleITK as sitk

    img = sitk.ReadImage(os.path.join(DEMO_DIR, "totalseg_ct_sm.nii.gz"))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(DEMO_DIR, "totalseg_ct_sm_seg.nii.gz")))
    ds = os.path.join(raw, "Dataset903_DemoCTLiverInView")
    os.makedirs(os.path.join(ds, "imagesTr"), exist_ok=True)
    size = (48, 48, 30)  # x, y, z voxels (3 mm)
    nx, ny, nz = img.GetSize()
    labels = {}
    for i, x0 in enumerate(np.linspace(0, nx - size[0], n_per_axis).astype(int)):
        for j, y0 in enumerate(np.linspace(0, ny - size[1], n_per_axis).astype(int)):
            crop = sitk.RegionOfInterest(img, size, [int(x0), int(y0), 0])
            liver = seg[:, y0:y0 + size[1], x0:x0 + size[0]] == DEMO_LABELS["liver"]
            case = f"crop{i}{j}"
            sitk.WriteImage(crop, os.path.join(ds, "imagesTr", f"{case}_0000.nii.gz"))
            labels[case] = int(liver.mean() >= 0.02)
    with open(os.path.join(ds, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": len(labels)}, f)
    with open(os.path.join(ds, "classification_labels.json"), "w") as f:
        json.dump({**labels, "class_names": ["no_liver", "liver"]}, f)


def main_cli():
    run_cli(main)


if __name__ == "__main__":
    main_cli()
