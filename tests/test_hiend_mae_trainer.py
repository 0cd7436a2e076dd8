"""Hi-End-MAE wiring through stock nnU-Net entry points (tiny preset, CPU):
plan (CT window as CTNormalization data) → stock `nnUNetv2_train -tr HiEndMAEPretrainTrainer_smoke` →
checkpoint with adaptation plan + reconstruction picture → nnssl_eval_reconstruction → bad inputs →
key transfer into the network of stock `nnUNet_Primus_B_Trainer` (Primus-B-compatible configuration)."""
from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

from conftest import BIN, make_synthetic_dataset, run_cmd


def ext_trainer_env(tmp_path) -> dict:
    """nnUNet_extTrainer with our trainers (until the lead exports them from nnssl_plugins.trainers)."""
    d = tmp_path / "ext_mae_trainers"
    d.mkdir(exist_ok=True)
    (d / "nnssl_mae_test_trainers.py").write_text(textwrap.dedent("""
        from nnssl_plugins.trainers.hiend_mae import *  # noqa
        from nnssl_plugins.trainers.maesil import *  # noqa
    """))
    cur = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    return {"nnUNet_extTrainer": os.pathsep.join(cur + [str(d)]), "OMP_NUM_THREADS": "1"}


def test_hiend_mae_smoke_eval_and_errors(nnunet_env, tmp_path):
    from nnssl_plugins.planners.api import plan_and_preprocess

    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 992, "HiEnd", n_cases=3, labeled=False)
    plans_name = plan_and_preprocess(992, "HiEndMAE", "tiny")
    assert plans_name == "nnsslPlans_HiEndMAE_tiny"
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset992_HiEnd")
    plans = json.load(open(os.path.join(pre, plans_name + ".json")))
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [1.5, 1.5, 1.5] and cfg["patch_size"] == [32, 32, 32]
    assert cfg["architecture"]["network_class_name"].endswith(".Primus")
    assert cfg["architecture"]["arch_kwargs"]["input_shape"] == [32, 32, 32]
    assert cfg["normalization_schemes"] == ["CTNormalization"]
    ip = plans["foreground_intensity_properties_per_channel"]["0"]
    assert (ip["percentile_00_5"], ip["percentile_99_5"], ip["mean"], ip["std"]) == (-175.0, 250.0, -175.0, 425.0)
    assert plans["nnssl"]["settings"]["method"]["mask_ratio"] == 0.75

    env = ext_trainer_env(tmp_path)
    r = run_cmd([os.path.join(BIN, "nnUNetv2_train"), "992", "3d_fullres", "all", "-p", plans_name,
                 "-tr", "HiEndMAEPretrainTrainer_smoke", "-device", "cpu"], env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = os.path.join(nnunet_env["nnUNet_results"], "Dataset992_HiEnd",
                       f"HiEndMAEPretrainTrainer_smoke__{plans_name}__3d_fullres", "fold_all")
    ckpt_path = os.path.join(out, "checkpoint_final.pth")
    ckpt = torch.load(ckpt_path, weights_only=True)
    plan = ckpt["nnssl_adaptation_plan"]
    assert plan["method"] == "HiEndMAE" and plan["key_to_encoder"] == "eva"
    assert plan["architecture_plans"]["arch_class_name"] == "Primus"  # tiny: no named Primus preset
    pics = sorted(os.listdir(os.path.join(out, "reconstructions")))
    assert "epoch_0000.png" in pics and "epoch_0001.png" in pics  # first and last epoch
    w = ckpt["network_weights"]
    assert any(k.startswith("mae_decoder.") for k in w) and any(k.startswith("up_projection.decode.") for k in w)

    # every key of the downstream Primus built from the checkpoint's plans is present with equal shape
    from dynamic_network_architectures.architectures.primus import Primus
    kw = dict(plan["nnunet_plans"]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"])
    down = Primus(input_channels=1, num_classes=plans["nnssl"]["settings"]["downstream_num_classes"], **kw)
    for k, v in down.state_dict().items():
        assert k in w and w[k].shape == v.shape, k

    # reconstruction evaluation
    eval_args = ["-ckpt", ckpt_path, "-d", "992", "-n", "2", "-o", str(tmp_path / "eval"), "-device", "cpu"]
    exe = os.path.join(BIN, "nnssl_eval_reconstruction")
    if os.path.isfile(exe):
        r = run_cmd([exe] + eval_args, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    else:  # entry point not registered (yet): same code in-process
        from nnssl_plugins.cli.eval_reconstruction import main
        assert main(eval_args) == 0
    res = json.load(open(tmp_path / "eval" / "reconstruction_metrics.json"))
    assert res["method"] == "HiEndMAE" and len(res["cases"]) == 2
    assert 0 < res["mean"]["psnr"] < 100 and -1 <= res["mean"]["ssim"] <= 1
    assert "LPIPS" in res["notes"]
    assert any(f.endswith(".png") for f in os.listdir(tmp_path / "eval"))


def test_bad_inputs(nnunet_env, tmp_path):
    from nnssl_plugins.cli.eval_reconstruction import main
    from nnssl_plugins.errors import UserInputError
    from nnssl_plugins.planners.api import plan_and_preprocess

    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 993, "Bad", n_cases=2, labeled=False)
    with pytest.raises(UserInputError, match=r"--patch_size \[36, 32, 32\].*not divisible by the patch-embed"):
        plan_and_preprocess(993, "HiEndMAE", "tiny", patch_size=[36, 32, 32], preprocess=False)
    with pytest.raises(UserInputError, match="not divisible by the patch-embed"):
        plan_and_preprocess(993, "MAESIL", "tiny", patch_size=[32, 30, 32], preprocess=False)
    # a CNN (ResEnc) checkpoint given to the MAE evaluation
    from nnssl_plugins.pretrain.common.adaptation import make_adaptation_plan
    cnn_plans = json.load(open(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset993_Bad", plan_and_preprocess(
        993, "MDAE", "tiny", preprocess=False) + ".json")))
    arch = cnn_plans["configurations"]["3d_fullres"]["architecture"]
    fake = {"network_weights": {"encoder.stem.convs.0.conv.weight": torch.zeros(1)},
            "nnssl_adaptation_plan": make_adaptation_plan(arch["network_class_name"], arch["arch_kwargs"],
                                                          arch["_kw_requires_import"], cnn_plans, 1, [32, 32, 32],
                                                          method="MDAE")}
    torch.save(fake, tmp_path / "cnn.pth")
    with pytest.raises(UserInputError, match="MDAE.*CNN|CNN.*MDAE"):
        main(["-ckpt", str(tmp_path / "cnn.pth"), "-d", "993"])
    if os.path.isfile(os.path.join(BIN, "nnssl_eval_reconstruction")):
        r = run_cmd([os.path.join(BIN, "nnssl_eval_reconstruction"), "-ckpt", str(tmp_path / "cnn.pth"), "-d", "993"])
        assert r.returncode == 2 and "ERROR:" in r.stderr and "Traceback" not in r.stderr


def test_primus_b_checkpoint_loads_into_stock_primus_b_trainer(nnunet_env, tmp_path):
    """Primus-B-compatible configuration (default preset's architecture, 32³ patch to stay fast): a pretraining
    checkpoint's weights load through stock `load_pretrained_weights` into the network that stock
    nnUNet_Primus_B_Trainer.build_network_architecture builds from our transferred plans."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_B_Trainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnssl_plugins.planners.api import plan_and_preprocess
    from nnssl_plugins.planners.transfer import transfer_plans
    from nnssl_plugins.pretrain.common.adaptation import make_adaptation_plan
    from nnssl_plugins.trainers.hiend_mae import HiEndMAEPretrainTrainer

    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 994, "PB", n_cases=2, labeled=False)
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 995, "PBTarget", n_cases=2, labeled=True, seed=1)
    # default preset (Primus-B), 32³ patch, target has 3 segmentation heads
    name = plan_and_preprocess(994, "HiEndMAE", "default", patch_size=[32, 32, 32], preprocess=False,
                               arch_overrides={"downstream_num_classes": 3})
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset994_PB")
    plans = json.load(open(os.path.join(pre, name + ".json")))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    assert cm.network_arch_init_kwargs["embed_dim"] == 792 and cm.network_arch_init_kwargs["eva_depth"] == 12
    net = HiEndMAEPretrainTrainer.build_network_architecture(pm, cm, 1, 1, False)
    ckpt = {"network_weights": net.state_dict(),
            "nnssl_adaptation_plan": make_adaptation_plan(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                                          [], plans, 1, cm.patch_size, method="HiEndMAE")}
    ckpt_path = str(tmp_path / "hiend_pb.pth")
    torch.save(ckpt, ckpt_path)
    del net

    tp = transfer_plans(995, ckpt_path)
    tplans = json.load(open(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset995_PBTarget", tp + ".json")))
    tpm = PlansManager(tplans)
    tcm = tpm.get_configuration("3d_fullres")
    down = nnUNet_Primus_B_Trainer.build_network_architecture(tpm, tcm, 1, 3, False)
    load_pretrained_weights(down, ckpt_path)  # asserts every non-seg key present with equal shape
    sd = down.state_dict()
    assert torch.equal(sd["eva.blocks.11.mlp.fc2.weight"], ckpt["network_weights"]["eva.blocks.11.mlp.fc2.weight"])
    # the transferred plans' architecture builds the same Primus (what a plans-driven Primus trainer uses)
    from nnssl_plugins.pretrain.common.networks import build_primus_from_plans
    alt = build_primus_from_plans(tpm, tcm, 1, 3)
    assert {k: v.shape for k, v in alt.state_dict().items()} == {k: v.shape for k, v in sd.items()}


def test_primus_b_stock_entry_point(nnunet_env, tmp_path):
    """Same as above through stock `nnUNetv2_train -tr <short nnUNet_Primus_B_Trainer> -pretrained_weights`."""
    from nnssl_plugins.planners.api import plan_and_preprocess
    from nnssl_plugins.planners.transfer import transfer_plans
    from nnssl_plugins.trainers.hiend_mae import HiEndMAEPretrainTrainer
    from nnssl_plugins.pretrain.common.adaptation import make_adaptation_plan
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 994, "PB", n_cases=2, labeled=False)
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 995, "PBTarget", n_cases=2, labeled=True, seed=1)
    name = plan_and_preprocess(994, "HiEndMAE", "default", patch_size=[32, 32, 32], preprocess=False,
                               arch_overrides={"downstream_num_classes": 3})
    plans = json.load(open(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset994_PB", name + ".json")))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    net = HiEndMAEPretrainTrainer.build_network_architecture(pm, cm, 1, 1, False)
    ckpt_path = str(tmp_path / "hiend_pb.pth")
    torch.save({"network_weights": net.state_dict(), "nnssl_adaptation_plan": make_adaptation_plan(
        cm.network_arch_class_name, cm.network_arch_init_kwargs, [], plans, 1, cm.patch_size, method="HiEndMAE")},
        ckpt_path)
    tp = transfer_plans(995, ckpt_path)
    r = run_cmd([os.path.join(BIN, "nnUNetv2_preprocess"), "-d", "995", "-plans_name", tp, "-c", "3d_fullres",
                 "-np", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    d = tmp_path / "ext_primus"
    d.mkdir()
    (d / "nnssl_primus_test_trainer.py").write_text(textwrap.dedent("""
        import torch
        from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_B_Trainer

        class nnUNet_Primus_B_Trainer_nnsslTest(nnUNet_Primus_B_Trainer):
            def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
                super().__init__(plans, configuration, fold, dataset_json, device)
                self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 1, 1

            def perform_actual_validation(self, save_probabilities=False):
                pass  # the load is what is under test; a Primus-B sliding-window pass costs minutes on CPU
    """))
    env = {"nnUNet_extTrainer": os.pathsep.join(
        [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p] + [str(d)])}
    r = run_cmd([os.path.join(BIN, "nnUNetv2_train"), "995", "3d_fullres", "all", "-p", tp, "-tr",
                 "nnUNet_Primus_B_Trainer_nnsslTest", "-pretrained_weights", ckpt_path, "-device", "cpu"], env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Loading pretrained weights" in r.stdout
