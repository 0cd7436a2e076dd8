"""Finetune loading with a checkpoint of every pretraining method (its real pretraining network and adaptation
plan, built from real plans): encoder weights equal the checkpoint's, the decoder stays fresh."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import make_synthetic_dataset

METHODS = [("MDAE", "nnssl_plugins.trainers.mdae", "MDAEPretrainTrainer"),
           ("MASS", "nnssl_plugins.trainers.mass", "MASSPretrainTrainer"),
           ("HiEndMAE", "nnssl_plugins.trainers.hiend_mae", "HiEndMAEPretrainTrainer"),
           ("MAESIL", "nnssl_plugins.trainers.maesil", "MAESILPretrainTrainer")]


@pytest.mark.parametrize("method,module,trainer", METHODS)
def test_encoder_only_loading_from_each_method(nnunet_env, tmp_path, method, module, trainer):
    import importlib

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnssl_plugins.planners.api import plan_and_preprocess
    from nnssl_plugins.planners.transfer import transfer_plans
    from nnssl_plugins.pretrain.common.adaptation import make_adaptation_plan
    from nnssl_plugins.pretrain.common.weight_transfer import backbone_keys, encoder_prefixes, load_pretrained_into
    from nnssl_plugins.pretrain.common.networks import build_primus_from_plans

    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, "Unlab", n_cases=1)
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 991, "Target", n_cases=2, labeled=True, seed=1)
    name = plan_and_preprocess(990, method, "tiny", preprocess=False)
    pm = PlansManager(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset990_Unlab", name + ".json"))
    cm = pm.get_configuration("3d_fullres")
    tr = getattr(importlib.import_module(module), trainer)
    torch.manual_seed(1)
    pre_net = tr.build_network_architecture(pm, cm, 1, 1, False)
    ck = {"network_weights": pre_net.state_dict(),
          "nnssl_adaptation_plan": make_adaptation_plan(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                                        cm.network_arch_init_kwargs_req_import, pm.plans, 1,
                                                        cm.patch_size, method=method)}
    path = str(tmp_path / f"{method}.pth")
    torch.save(ck, path)

    tp = transfer_plans(991, path)
    tpm = PlansManager(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset991_Target", tp + ".json"))
    tcm = tpm.get_configuration("3d_fullres")
    torch.manual_seed(2)
    if "Primus" in tcm.network_arch_class_name:
        net = build_primus_from_plans(tpm, tcm, 1, 3)
    else:
        net = get_network_from_plans(tcm.network_arch_class_name, tcm.network_arch_init_kwargs,
                                     tcm.network_arch_init_kwargs_req_import, 1, 3, allow_init=True,
                                     deep_supervision=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    spec = backbone_keys(type(net).__name__)
    load_pretrained_into(net, path, mode="encoder", backbone=spec, expected_arch=type(net).__name__,
                         log=lambda *a, **k: None)
    prefixes = encoder_prefixes(spec)
    after = net.state_dict()
    # dynamic-network-architectures' UNetDecoder keeps a reference to the encoder: `decoder.encoder.*` aliases it
    canon = {k: (k[len("decoder."):] if k.startswith("decoder.encoder.") else k) for k in after}
    enc = [k for k in after if any(canon[k].startswith(p) for p in prefixes)]
    dec = [k for k in after if k not in enc and after[k].is_floating_point()]
    assert enc and dec
    for k in enc:
        assert torch.equal(after[k], ck["network_weights"][canon[k]]), k
    for k in dec:
        assert torch.equal(after[k], before[k]), k
