"""nnssl_finetune: transfer → preprocessing → finetune/classification training in one command; rerun = done."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from conftest import make_synthetic_dataset, write_volume


def _mdae_checkpoint(nnunet_env, path):
    """An MDAE checkpoint as pretraining writes it (real network + adaptation plan), without the training time."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnssl_plugins.planners.api import plan_and_preprocess
    from nnssl_plugins.pretrain.common.adaptation import make_adaptation_plan
    from nnssl_plugins.trainers.mdae import MDAEPretrainTrainer

    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, "Unlab", n_cases=1)
    name = plan_and_preprocess(990, "MDAE", "tiny", preprocess=False)
    pm = PlansManager(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset990_Unlab", name + ".json"))
    cm = pm.get_configuration("3d_fullres")
    net = MDAEPretrainTrainer.build_network_architecture(pm, cm, 1, 1, False)
    torch.save({"network_weights": net.state_dict(),
                "nnssl_adaptation_plan": make_adaptation_plan(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                                              cm.network_arch_init_kwargs_req_import, pm.plans, 1,
                                                              cm.patch_size, method="MDAE")}, path)
    return net.state_dict()


def _run(argv):
    from nnssl_plugins.cli.finetune import main

    return main(argv)


def test_finetune_seg_and_cls(nnunet_env, tmp_path, capsys):
    ck = str(tmp_path / "mdae.pth")
    weights = _mdae_checkpoint(nnunet_env, ck)

    # segmentation: labeled target, our finetune trainer owns -pretrained_weights (encoder-only)
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 991, "Seg", n_cases=5, labeled=True, seed=1)
    assert _run(["-d", "991", "-ckpt", ck, "-tr", "_smoke", "-f", "0", "-device", "cpu"]) == 0
    out = os.path.join(nnunet_env["nnUNet_results"], "Dataset991_Seg",
                       "nnsslFinetuneTrainer_smoke__nnsslPlans_MDAE_tiny__3d_fullres", "fold_0")
    fin = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=False)
    assert fin["current_epoch"] == 2 and os.path.isfile(os.path.join(out, "validation", "summary.json"))
    capsys.readouterr()
    assert _run(["-d", "991", "-ckpt", ck, "-tr", "_smoke", "-f", "0", "-device", "cpu"]) == 0
    assert "Already finished" in capsys.readouterr().out

    # classification: unlabeled images + classification_labels.json, frozen encoder
    raw = os.path.join(nnunet_env["nnUNet_raw"], "Dataset992_Cls")
    os.makedirs(os.path.join(raw, "imagesTr"))
    rs = np.random.RandomState(0)
    labels = {}
    for i in range(8):
        img = (rs.randn(36, 36, 36) * 10).astype(np.float32)
        img[10:26, 10:26, 10:26] += 200 if i % 2 else -200
        write_volume(os.path.join(raw, "imagesTr", f"c{i}_0000.nii.gz"), img)
        labels[f"c{i}"] = i % 2
    json.dump({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 8},
              open(os.path.join(raw, "dataset.json"), "w"))
    json.dump({**labels, "class_names": ["dark", "bright"]}, open(os.path.join(raw, "classification_labels.json"), "w"))
    assert _run(["-d", "992", "-ckpt", ck, "--task", "cls", "-tr", "_smoke", "-f", "all", "-device", "cpu"]) == 0
    cls_out = os.path.join(nnunet_env["nnUNet_results"], "Dataset992_Cls",
                           "nnsslClsTrainer_Frozen_smoke__nnsslPlans_MDAE_tiny__3d_fullres", "fold_all")
    res = json.load(open(os.path.join(cls_out, "validation_classification.json")))
    assert "auroc" in json.dumps(res).lower()
    # frozen encoder: bit-identical to the checkpoint after training
    trained = torch.load(os.path.join(cls_out, "checkpoint_final.pth"), weights_only=False)["network_weights"]
    enc = [k for k in trained if "encoder.stages.0" in k and k.endswith("weight")]
    assert enc
    for k in enc:
        src = k[k.index("encoder."):]
        assert torch.equal(trained[k].cpu(), weights[src]), k
