"""A Primus checkpoint whose carried (untrained) decoder was built for another class count still loads with
stock `-pretrained_weights`: nnssl_transfer_plans writes a copy with a decoder for the target's heads."""
from __future__ import annotations

import json
import os

import torch

from conftest import make_synthetic_dataset


def test_transfer_rebuilds_primus_decoder_for_target_heads(nnunet_env, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnssl_plugins.planners.api import plan_and_preprocess
    from nnssl_plugins.planners.transfer import transfer_plans
    from nnssl_plugins.pretrain.common.adaptation import make_adaptation_plan
    from nnssl_plugins.trainers.hiend_mae import HiEndMAEPretrainTrainer

    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 994, "PT", n_cases=1, labeled=False)
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 995, "PTTarget", n_cases=2, labeled=True, seed=1)  # 3 heads
    name = plan_and_preprocess(994, "HiEndMAE", "tiny", preprocess=False)  # decoder carried for 2 heads
    plans = json.load(open(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset994_PT", name + ".json")))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    net = HiEndMAEPretrainTrainer.build_network_architecture(pm, cm, 1, 1, False)
    ck = {"network_weights": net.state_dict(),
          "nnssl_adaptation_plan": make_adaptation_plan(cm.network_arch_class_name, cm.network_arch_init_kwargs, [],
                                                        plans, 1, cm.patch_size, method="HiEndMAE")}
    src = str(tmp_path / "hiend_tiny.pth")
    torch.save(ck, src)

    tp = transfer_plans(995, src)
    adapted = os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset995_PTTarget", f"{tp}__pretrained_weights.pth")
    assert os.path.isfile(adapted)
    tplans = json.load(open(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset995_PTTarget", tp + ".json")))
    a = PlansManager(tplans).get_configuration("3d_fullres").network_arch_init_kwargs
    down = get_network_from_plans(cm.network_arch_class_name, a, [], 1, 3, allow_init=True)
    try:  # the original checkpoint does not fit stock loading (decoder head has 2 channels)...
        load_pretrained_weights(down, src)
        raise AssertionError("expected a shape mismatch with the original checkpoint")
    except AssertionError as e:
        assert "shape" in str(e)
    load_pretrained_weights(down, adapted)  # ...the adapted copy does, with the encoder unchanged
    sd = down.state_dict()
    for k in ("eva.blocks.0.attn.qkv.weight", "down_projection.proj.weight", "eva.pos_embed"):
        if k in ck["network_weights"]:
            assert torch.equal(sd[k], ck["network_weights"][k]), k
    assert torch.load(adapted, weights_only=True)["nnssl_adaptation_plan"]["method"] == "HiEndMAE"
