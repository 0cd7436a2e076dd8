"""End to end through the stock nnU-Net entry points:
unlabeled planning → stock `nnUNetv2_train -tr MDAEPretrainTrainer_smoke` → transfer plans →
stock `nnUNetv2_preprocess` → stock `nnUNetv2_train -pretrained_weights` (no missing keys)."""
from __future__ import annotations

import json
import os

import torch

from conftest import BIN, make_synthetic_dataset, run_cmd


def test_unlabeled_pretrain_transfer_and_stock_finetune(nnunet_env, test_trainer_dir):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, "Unlab", n_cases=3, labeled=False)
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 991, "Target", n_cases=5, labeled=True, seed=1)

    r = run_cmd([os.path.join(BIN, "nnssl_plan_and_preprocess"), "-d", "990", "-m", "MDAE", "--preset", "tiny"])
    assert r.returncode == 0, r.stderr
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset990_Unlab")
    plans = json.load(open(os.path.join(pre, "nnsslPlans_MDAE_tiny.json")))
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["patch_size"] == [32, 32, 32] and cfg["spacing"] == [1.0, 1.0, 1.0]
    assert cfg["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")

    # stock nnU-Net training command finds our trainer (via the installed .pth / nnUNet_extTrainer)
    r = run_cmd([os.path.join(BIN, "nnUNetv2_train"), "990", "3d_fullres", "all", "-p", "nnsslPlans_MDAE_tiny",
                 "-tr", "MDAEPretrainTrainer_smoke", "-device", "cpu"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = os.path.join(nnunet_env["nnUNet_results"], "Dataset990_Unlab",
                       "MDAEPretrainTrainer_smoke__nnsslPlans_MDAE_tiny__3d_fullres", "fold_all")
    ckpt_path = os.path.join(out, "checkpoint_final.pth")
    assert os.path.isfile(os.path.join(out, "progress.png"))
    ckpt = torch.load(ckpt_path, weights_only=True)  # our checkpoints are weights_only-safe
    assert ckpt["current_epoch"] == 2
    plan = ckpt["nnssl_adaptation_plan"]
    assert plan["key_to_encoder"] == "encoder.stages" and plan["pretrain_num_input_channels"] == 1
    assert any(k.startswith("film_encoder.") for k in ckpt["network_weights"])

    r = run_cmd([os.path.join(BIN, "nnssl_transfer_plans"), "-d", "991", "-ckpt", ckpt_path])
    assert r.returncode == 0, r.stderr
    r = run_cmd([os.path.join(BIN, "nnUNetv2_preprocess"), "-d", "991", "-plans_name", "nnsslPlans_MDAE_tiny",
                 "-c", "3d_fullres", "-np", "1"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = run_cmd([os.path.join(BIN, "nnUNetv2_train"), "991", "3d_fullres", "0", "-p", "nnsslPlans_MDAE_tiny",
                 "-tr", "nnUNetTrainer_nnsslTest", "-pretrained_weights", ckpt_path, "-device", "cpu"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Loading pretrained weights" in r.stdout
    fin = torch.load(os.path.join(nnunet_env["nnUNet_results"], "Dataset991_Target",
                                  "nnUNetTrainer_nnsslTest__nnsslPlans_MDAE_tiny__3d_fullres", "fold_0",
                                  "checkpoint_final.pth"), weights_only=False)
    # the finetuned network has exactly the backbone keys of the pretraining checkpoint (minus seg layers)
    down = {k for k in fin["network_weights"] if ".seg_layers." not in k}
    assert down <= set(ckpt["network_weights"])
