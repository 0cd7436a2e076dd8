"""The adaptation plan as a typed dataclass, and checkpoints users already have.

tests/data/legacy_adaptation_plan_*_tiny.json are the `nnssl_adaptation_plan` entries that the pretraining
trainers wrote before nnssl interop (MDAE / MAESIL `_smoke` runs, tiny presets): full nnU-Net plans as
`pretrain_plan`, dotted class names. Our loaders must keep reading them.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import REPO, make_synthetic_dataset

DATA = os.path.join(REPO, "tests", "data")


def legacy_plan(method: str) -> dict:
    with open(os.path.join(DATA, f"legacy_adaptation_plan_{method}_tiny.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("method,arch,backbone", [("MDAE", "ResidualEncoderUNet", "ResidualEncoderUNet"),
                                                  ("MAESIL", "Primus", "Primus")])
def test_older_layout_reads_as_the_current_one(method, arch, backbone, tmp_path):
    from nnssl_plugins.pretrain.common.adaptation import AdaptationPlan, nnssl_pretrain_plan

    old = legacy_plan(method)
    plan = AdaptationPlan.from_dict(json.loads(json.dumps(old)))
    assert plan.nnunet_plans == old["pretrain_plan"] and plan.pretrain_configuration == "3d_fullres"
    assert plan.pretrain_plan == nnssl_pretrain_plan(old["pretrain_plan"], "3d_fullres")
    assert list(plan.pretrain_plan["configurations"]["3d_fullres"]) == [
        "data_identifier", "preprocessor_name", "spacing_style", "normalization_schemes", "use_mask_for_norm",
        "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_mask", "resampling_fn_mask_kwargs",
        "spacing", "patch_size"]  # nnssl's ConfigurationPlan fields, nothing else
    assert plan.architecture_plans.arch_class_name == arch and plan.backbone_class() == backbone
    assert plan.nnunet_architecture() == old["pretrain_plan"]["configurations"]["3d_fullres"]["architecture"]
    assert plan.method == method and plan.trainer_name == old["trainer_name"]
    settings = "mdae" if method == "MDAE" else "mae"
    assert plan.extras == {settings: old[settings]}
    for f in ("key_to_encoder", "key_to_stem", "keys_to_in_proj", "key_to_lpe", "recommended_downstream_patchsize",
              "pretrain_num_input_channels"):
        assert getattr(plan, f) == old[f], f
    # written back in the current layout; a plain dict that torch.load(weights_only=True) reads
    d = plan.to_dict()
    assert d["nnunet_plans"] == old["pretrain_plan"] and d[settings] == old[settings]
    torch.save({"nnssl_adaptation_plan": d}, tmp_path / "p.pth")
    again = AdaptationPlan.from_dict(torch.load(tmp_path / "p.pth", weights_only=True)["nnssl_adaptation_plan"])
    assert again == plan


def test_unknown_architecture_and_malformed_plan_fail_clearly():
    from nnssl_plugins.errors import UserInputError
    from nnssl_plugins.pretrain.common.adaptation import AdaptationPlan

    d = AdaptationPlan.from_dict(legacy_plan("MDAE")).to_dict()
    d.pop("nnunet_plans")  # as a foreign tool would write it
    d["architecture_plans"] = {"arch_class_name": "SwinUNETR", "arch_kwargs": None,
                               "arch_kwargs_requiring_import": None}
    with pytest.raises(UserInputError, match=r"ckpt\.pth: pretrained architecture 'SwinUNETR'.*ResEncL.*PrimusM"):
        AdaptationPlan.from_dict(d, "ckpt.pth").nnunet_architecture("ckpt.pth")
    d["pretrain_plan"] = {"plans_name": "x"}
    with pytest.raises(UserInputError, match="pretrain_plan' has no configurations"):
        AdaptationPlan.from_dict(d, "ckpt.pth")


@pytest.mark.parametrize("method", ["MDAE", "MAESIL"])
def test_older_checkpoints_still_finetune(nnunet_env, tmp_path, method):
    """A checkpoint with the older plan (weights from the method's pretraining network built from that plan) goes
    through nnssl_transfer_plans and the finetune trainer's loading; the encoder arrives unchanged."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import nnssl_plugins.trainers as T
    from nnssl_plugins.planners.transfer import transfer_plans
    from nnssl_plugins.pretrain.common.weight_transfer import unwrap_network

    old = legacy_plan(method)
    pm = PlansManager(old["pretrain_plan"])
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = getattr(T, f"{method}PretrainTrainer").build_network_architecture(pm, cm, 1, 1, False)
    ckpt = str(tmp_path / "old.pth")
    torch.save({"network_weights": net.state_dict(), "nnssl_adaptation_plan": old, "trainer_name": old["trainer_name"]},
               ckpt)
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 991, "Target", n_cases=2, labeled=True, seed=1)
    plans_name = transfer_plans(991, ckpt)
    assert plans_name == old["pretrain_plan"]["plans_name"]
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset991_Target")
    plans = load_json(os.path.join(pre, plans_name + ".json"))
    assert plans["configurations"]["3d_fullres"]["architecture"] == cm.configuration["architecture"]
    assert plans["foreground_intensity_properties_per_channel"] == \
        old["pretrain_plan"]["foreground_intensity_properties_per_channel"]  # pretraining statistics kept
    preprocess_dataset(991, plans_name, ("3d_fullres",), (1,), show_progress_bar=False)
    plans["continue_training"] = False
    cls = T.nnsslPrimusFinetuneTrainer if method == "MAESIL" else T.nnsslFinetuneTrainer
    tr = cls(plans, "3d_fullres", 0, load_json(os.path.join(pre, "dataset.json")), torch.device("cpu"))
    tr.initialize()
    tr.load_pretrained(ckpt)
    sd = unwrap_network(tr.network).state_dict()
    keys = [k for k in sd if k.startswith(("encoder.stem.", "encoder.stages.", "eva.", "down_projection."))]
    assert len(keys) > 20
    for k in keys:
        assert torch.equal(sd[k], net.state_dict()[k]), k
