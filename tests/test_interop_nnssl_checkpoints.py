"""DKFZ nnssl checkpoints in our transfer planner, finetune and classification trainers.

The checkpoints are written by nnssl's own code (../shared/peers/nnssl, in a subprocess) the way its trainers
write them: nnssl's planner configuration, networks from `get_network_by_name` / `EvaMAE` (the MAE trainers'
pretraining network), `AdaptationPlan(...).serialize()`, `verify_adaptation_plans`, and the dict of
`AbstractBaseTrainer.save_checkpoint` through `_convert_numpy`. Real files for ResEncL and NoSkipResEncL (full size,
nnssl's presets have no small variant), a small explicit ResidualEncoderUNet and PrimusS (pretrained on 32x32x64
patches so that the positional embedding must be interpolated from a non-cubic grid). PrimusB/M/L are compared
by shape on the meta device (a real PrimusL checkpoint is 1.3 GB).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_synthetic_dataset
from interop_peers import NNSSL, nnunet_workspace, run_with_peer

NNSSL_WRITER = """
import torch
from nnssl.adaptation_planning.adaptation_plan import AdaptationPlan, ArchitecturePlans, DynamicArchitecturePlans
from nnssl.architectures.evaMAE_module import EvaMAE
from nnssl.architectures.get_network_by_name import get_network_by_name
from nnssl.architectures.get_network_from_plan import get_network_from_plans
from nnssl.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnssl.experiment_planning.experiment_planners.plan import Plan
from nnssl.training.logging.nnssl_logger import nnSSLLogger
from nnssl.training.nnsslTrainer.AbstractTrainer import AbstractBaseTrainer
from nnssl.utilities.serialization import make_serializable

RESENC_KEYS = dict(key_to_encoder="encoder.stages", key_to_stem="encoder.stem",
                   keys_to_in_proj=("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"))
PRIMUS_KEYS = dict(key_to_encoder="eva", key_to_stem="down_projection", keys_to_in_proj=("down_projection.proj",),
                   key_to_lpe="eva.pos_embed")
PRIMUS_DIMS = {"PrimusS": (396, 12, 6), "PrimusB": (792, 12, 12), "PrimusM": (864, 16, 12), "PrimusL": (1056, 24, 16)}


def plan(patch_size):
    # nnssl's planner output for 'onemmiso'; the trainer keeps only the configuration it trains and fixes its patch
    # size (AbstractBaseTrainer.__init__, BaseMAETrainer.__init__)
    planner = ExperimentPlanner.__new__(ExperimentPlanner)
    planner.plans_identifier = "nnsslPlans"
    cfg = planner.get_plans_for_configuration("onemmiso", [1.0, 1.0, 1.0], planner.generate_data_identifier("onemmiso"))
    cfg.patch_size = tuple(patch_size)
    return Plan(dataset_name="Dataset745_OpenMind", plans_name="nnsslPlans",
                original_median_spacing_after_transp=[1.0, 1.0, 1.0], image_reader_writer="SimpleITKIO",
                transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2], configurations={"onemmiso": cfg},
                experiment_planner_used="ExperimentPlanner")


def build(kind, patch_size, downstream_patch):
    p = plan(patch_size)
    if kind in ("ResEncL", "NoSkipResEncL"):  # BaseMAETrainer.build_architecture_and_adaptation_plan
        net = get_network_by_name(p.configurations["onemmiso"], kind, 1, 1)
        ap = AdaptationPlan(ArchitecturePlans(kind), p, 1, tuple(downstream_patch), **RESENC_KEYS)
    elif kind == "ResidualEncoderUNet":  # the var_arch_size trainers: explicit DynamicArchitecturePlans
        kw = DynamicArchitecturePlans(n_stages=3, features_per_stage=[8, 16, 32], conv_op=torch.nn.Conv3d,
                                      kernel_sizes=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                                      n_blocks_per_stage=[1, 2, 2], n_conv_per_stage_decoder=[1, 1], conv_bias=True,
                                      norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                                      dropout_op=None, dropout_op_kwargs=None, nonlin=torch.nn.LeakyReLU,
                                      nonlin_kwargs={"inplace": True})
        net = get_network_from_plans("ResidualEncoderUNet", kw.serialize(), kw.get_kwargs_requiring_import(), 1, 1,
                                     deep_supervision=False)
        ap = AdaptationPlan(ArchitecturePlans("ResidualEncoderUNet", kw), p, 1, tuple(downstream_patch),
                            **RESENC_KEYS)
    else:  # BaseEvaMAETrainer.build_architecture_and_adaptation_plan with the preset's width/depth/heads;
        # patch_drop_rate 0 (no parameters; timm 1.0.22 lacks the PatchDropout(return_indices) of nnssl's timm<=1.0.16)
        dim, depth, heads = PRIMUS_DIMS[kind]
        net = EvaMAE(input_channels=1, embed_dim=dim, patch_embed_size=(8, 8, 8), output_channels=1,
                     input_shape=tuple(patch_size), encoder_eva_depth=depth, encoder_eva_numheads=heads,
                     decoder_eva_depth=2, decoder_eva_numheads=heads, patch_drop_rate=0.0, drop_path_rate=0.2,
                     attn_drop_rate=0, init_values=0.1, scale_attn_inner=True)
        ap = AdaptationPlan(ArchitecturePlans(kind), p, 1, tuple(downstream_patch), **PRIMUS_KEYS)
    return p, net, ap


def save(kind, patch_size, downstream_patch, path):
    torch.manual_seed(0)
    p, net, ap = build(kind, patch_size, downstream_patch)
    verified = None
    try:  # what AbstractBaseTrainer.initialize does before training
        AbstractBaseTrainer.verify_adaptation_plans(ap.serialize(), "onemmiso", net.state_dict())
        verified = "ok"
    except Exception as e:  # the upstream verdict is reported
        verified = type(e).__name__ + ": " + str(e)[:200]
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
    checkpoint = {  # AbstractBaseTrainer.save_checkpoint
        "network_weights": net.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "grad_scaler_state": None,
        "logging": nnSSLLogger().get_checkpoint(),
        "_best_ema": None,
        "current_epoch": 1,
        "init_args": make_serializable({"plan": p, "configuration_name": "onemmiso", "fold": 0,
                                        "pretrain_json": {}, "device": "cpu"}),
        "trainer_name": "BaseEvaMAETrainer" if kind.startswith("Primus") else "BaseMAETrainer",
        "nnssl_adaptation_plan": ap.serialize(),
    }
    torch.save(AbstractBaseTrainer._convert_numpy(checkpoint), path)
    return {"path": path, "verify": verified}


out = {kind: save(kind, ps, dps, os.path.join(ARGS["out"], kind + ".pth"))
       for kind, ps, dps in [("ResidualEncoderUNet", (32, 32, 32), (32, 32, 32)),
                             ("ResEncL", (64, 64, 64), (32, 32, 32)),
                             ("NoSkipResEncL", (64, 64, 64), (32, 32, 32)),
                             ("PrimusS", (32, 32, 64), (32, 32, 32))]}
shapes = {}
with torch.device("meta"):  # B/M/L: the MAE trainer's pretraining network and the network nnssl verifies with
    for kind in ("PrimusB", "PrimusM", "PrimusL"):
        p, net, ap = build(kind, (32, 32, 64), (32, 32, 32))
        down = get_network_by_name(p.configurations["onemmiso"], kind, 1, 2)
        shapes[kind] = {"pretrain": {k: list(v.shape) for k, v in net.state_dict().items()},
                        "downstream": {k: list(v.shape) for k, v in down.state_dict().items()},
                        "plan": ap.serialize()}
report({"ckpts": out, "shapes": shapes})
"""


@pytest.fixture(scope="module")
def nnssl_ckpts(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("nnssl_ckpts"))
    res = run_with_peer(NNSSL, NNSSL_WRITER, {"out": out})
    yield res
    for c in res["ckpts"].values():  # ~0.9 GB
        os.remove(c["path"])


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A labeled target dataset (segmentation labels + classification labels) in its own workspace."""
    root = str(tmp_path_factory.mktemp("nnssl_target"))
    saved = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    paths = nnunet_workspace(root)
    ds = make_synthetic_dataset(paths["nnUNet_raw"], 991, "Target", n_cases=4, labeled=True, seed=1)
    with open(os.path.join(ds, "classification_labels.json"), "w") as f:
        json.dump({"case00": 0, "case01": 1, "case02": 0, "case03": 1}, f)
    yield paths
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_nnssl_verifies_what_it_wrote(nnssl_ckpts):
    """nnssl's own check passes for the checkpoints it can describe; NoSkipResEncL it cannot verify (its network
    has no key_to_encoder attribute), so no nnssl trainer writes one."""
    v = {k: c["verify"] for k, c in nnssl_ckpts["ckpts"].items()}
    assert v["ResidualEncoderUNet"] == v["ResEncL"] == v["PrimusS"] == "ok"
    assert v["NoSkipResEncL"].startswith("AttributeError") and "key_to_encoder" in v["NoSkipResEncL"]


def test_nnssl_plans_read_and_expand(nnssl_ckpts):
    from nnssl_plugins.pretrain.common.adaptation import PRIMUS_CLASS, RESENC_CLASS, RESENC_L_KWARGS
    from nnssl_plugins.pretrain.common.weight_transfer import read_pretrained_checkpoint

    ck = nnssl_ckpts["ckpts"]
    for kind in ("ResEncL", "NoSkipResEncL"):
        _, plan = read_pretrained_checkpoint(ck[kind]["path"])
        assert plan.written_by_nnssl and plan.backbone_class() == "ResidualEncoderUNet"
        arch = plan.nnunet_architecture()
        assert arch["network_class_name"] == RESENC_CLASS and arch["arch_kwargs"] == RESENC_L_KWARGS
        assert plan.pretrain_configuration == "onemmiso" and plan.pretrain_patch_size() == [64, 64, 64]
        assert plan.source_token_grid() is None
    _, plan = read_pretrained_checkpoint(ck["ResidualEncoderUNet"]["path"])
    arch = plan.nnunet_architecture()
    assert arch["network_class_name"] == RESENC_CLASS
    assert arch["arch_kwargs"]["features_per_stage"] == [8, 16, 32]
    assert arch["arch_kwargs"]["conv_op"] == "torch.nn.modules.conv.Conv3d"
    _, plan = read_pretrained_checkpoint(ck["PrimusS"]["path"])
    arch = plan.nnunet_architecture()
    assert plan.backbone_class() == "Primus" and arch["network_class_name"] == PRIMUS_CLASS
    assert {k: arch["arch_kwargs"][k] for k in ("embed_dim", "eva_depth", "eva_numheads", "patch_embed_size")} == \
        {"embed_dim": 396, "eva_depth": 12, "eva_numheads": 6, "patch_embed_size": [8, 8, 8]}
    assert plan.pretrain_patch_size() == [32, 32, 64] and plan.recommended_downstream_patchsize == [32, 32, 32]
    assert plan.source_token_grid() == (4, 4, 8)  # from the pretraining patch, not the recommended one


@pytest.mark.parametrize("kind", ["PrimusB", "PrimusM", "PrimusL"])
def test_primus_presets_expand_to_the_networks_nnssl_builds(nnssl_ckpts, kind):
    """Every key of our expanded Primus has the shape of nnssl's network for that preset, and our encoder-only
    transfer takes every stem/encoder tensor from nnssl's MAE pretraining network (meta tensors)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnssl_plugins.pretrain.common.adaptation import AdaptationPlan
    from nnssl_plugins.pretrain.common.weight_transfer import backbone_keys, transfer_weights

    s = nnssl_ckpts["shapes"][kind]
    plan = AdaptationPlan.from_dict(s["plan"])
    arch = plan.nnunet_architecture()
    with torch.device("meta"):
        ours = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                      1, 2, allow_init=False)
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == s["downstream"]
    pretrain = {k: torch.empty(v, device="meta") for k, v in s["pretrain"].items()}
    rep = transfer_weights(ours, pretrain, mode="encoder", backbone=backbone_keys("Primus"), plan=plan)
    n_enc = sum(k.startswith(("eva.", "down_projection.")) for k in ours.state_dict())
    assert len(rep.loaded) == n_enc and not rep.adapted
    assert any(k.startswith("decoder.") for k, _ in rep.skipped)  # nnssl's MAE decoder stays behind


def _preprocess_and_trainer(plans_name, trainer_cls):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    pre = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset991_Target")
    plans = load_json(os.path.join(pre, plans_name + ".json"))
    if not os.path.isdir(os.path.join(pre, plans["configurations"]["3d_fullres"]["data_identifier"])):
        preprocess_dataset(991, plans_name, ("3d_fullres",), (1,), show_progress_bar=False)
    plans["continue_training"] = False  # nnU-Net's run_training puts it there; nnUNetTrainer pops it
    tr = trainer_cls(plans, "3d_fullres", 0, load_json(os.path.join(pre, "dataset.json")), torch.device("cpu"))
    tr.initialize()
    return tr


@pytest.mark.parametrize("kind", ["ResEncL", "NoSkipResEncL", "ResidualEncoderUNet", "PrimusS"])
def test_transfer_finetune_and_classification_take_nnssl_checkpoints(nnssl_ckpts, target, kind):
    from nnssl_plugins.planners.transfer import transfer_plans
    from nnssl_plugins.pretrain.common.weight_transfer import interpolate_pos_embed, unwrap_network
    from nnssl_plugins.trainers.classification import nnsslClsTrainer_Frozen
    from nnssl_plugins.trainers.finetune import nnsslFinetuneTrainer, nnsslPrimusFinetuneTrainer

    ckpt = nnssl_ckpts["ckpts"][kind]["path"]
    plans_name = transfer_plans(991, ckpt, plans_name=f"nnsslPlans_{kind}")
    with open(os.path.join(target["nnUNet_preprocessed"], "Dataset991_Target", plans_name + ".json")) as f:
        plans = json.load(f)
    cfg = plans["configurations"]["3d_fullres"]
    # the checkpoint's normalisation (nnssl: Z-score) and spacing, the target's intensity statistics
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"] and cfg["spacing"] == [1.0, 1.0, 1.0]
    assert cfg["patch_size"] == [32, 32, 32]
    assert cfg["resampling_fn_seg_kwargs"]["is_seg"] is True  # labels, not nnssl's anatomy-mask resampling
    fp = json.load(open(os.path.join(target["nnUNet_preprocessed"], "Dataset991_Target", "dataset_fingerprint.json")))
    assert plans["foreground_intensity_properties_per_channel"] == fp["foreground_intensity_properties_per_channel"]
    assert plans["nnssl"]["written_by"] == "nnssl" and plans["nnssl"]["source_architecture"] == kind

    weights = torch.load(ckpt, weights_only=True)["network_weights"]
    primus = kind.startswith("Primus")
    prefixes = ("down_projection.", "eva.") if primus else ("encoder.stem.", "encoder.stages.")
    trainers = [nnsslPrimusFinetuneTrainer if primus else nnsslFinetuneTrainer]
    if kind in ("ResEncL", "PrimusS"):  # the classifier's loading is the same code for every CNN
        trainers.append(nnsslClsTrainer_Frozen)
    for cls in trainers:
        tr = _preprocess_and_trainer(plans_name, cls)
        report = tr.load_pretrained(ckpt)
        sd = unwrap_network(tr.network).state_dict()
        keys = [k for k in sd if k.startswith(prefixes)]
        assert len(keys) > 20
        for k in keys:
            if primus and k == "eva.pos_embed":  # pretraining patch 32x32x64 -> grid (4,4,8); target (4,4,4)
                expected = interpolate_pos_embed(weights[k], (4, 4, 8), (4, 4, 4))
                assert [a[0] for a in report.adapted] == ["eva.pos_embed"]
                torch.testing.assert_close(sd[k], expected)
            else:
                assert torch.equal(sd[k], weights[k]), (cls.__name__, k)
