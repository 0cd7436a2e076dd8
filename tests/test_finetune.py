"""Finetuning from pretraining checkpoints: weight transfer units + stock `nnUNetv2_train` end-to-end runs."""
from __future__ import annotations

import json
import os
import sys
from copy import deepcopy

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from conftest import complete_plans  # noqa: E402
from nnssl_plugins.errors import UserInputError  # noqa: E402
from nnssl_plugins.pretrain.common.adaptation import ADAPTATION_PLAN_KEY, make_adaptation_plan  # noqa: E402
from nnssl_plugins.pretrain.common.weight_transfer import (  # noqa: E402
    BACKBONE_KEYS,
    adapt_input_channels,
    interpolate_pos_embed,
    transfer_weights,
)

RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
PRIMUS = "dynamic_network_architectures.architectures.primus.Primus"


# ------------------------------------------------------------------------------------------------------------
# tiny networks / checkpoints
# ------------------------------------------------------------------------------------------------------------
def resenc_arch_kwargs(features=(8, 16, 32)):
    n = len(features)
    return {
        "n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "n_blocks_per_stage": [1] * n, "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def primus_arch_kwargs(input_shape=(32, 32, 32)):
    return {"embed_dim": 48, "patch_embed_size": [8, 8, 8], "eva_depth": 2, "eva_numheads": 2,
            "input_shape": list(input_shape), "drop_path_rate": 0.0, "init_values": 0.1, "scale_attn_inner": True}


def build(arch, kwargs, in_ch, out_ch, ds=None):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(arch, kwargs, REQ_IMPORT if arch == RESENC else [], in_ch, out_ch,
                                  deep_supervision=ds)


def make_checkpoint(path, arch=RESENC, in_ch=1, kwargs=None, seed=0, extra=True):
    torch.manual_seed(seed)
    if kwargs is None:
        kwargs = resenc_arch_kwargs() if arch == RESENC else primus_arch_kwargs()
    net = build(arch, kwargs, in_ch, 1 if arch == RESENC else 3, ds=True if arch == RESENC else None)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    if arch == PRIMUS:  # MAE-style checkpoints may lack the downstream decoder
        sd = {k: v for k, v in sd.items() if not k.startswith("up_projection")}
    if extra:
        sd["mae_decoder.proj.weight"] = torch.randn(4, 4)
        sd["task_encoder.query"] = torch.randn(1, 10, 8)
    patch = kwargs.get("input_shape", [32, 32, 32])
    req = REQ_IMPORT if arch == RESENC else []
    plans = complete_plans({"network_class_name": arch, "arch_kwargs": kwargs, "_kw_requires_import": req}, patch,
                           channels=in_ch)
    plan = make_adaptation_plan(arch, kwargs, req, plans, in_ch, patch)
    torch.save({"network_weights": sd, ADAPTATION_PLAN_KEY: plan, "current_epoch": 1, "trainer_name": "Fake"}, path)
    return sd


# ------------------------------------------------------------------------------------------------------------
# units
# ------------------------------------------------------------------------------------------------------------
def test_adapt_input_channels_keeps_response_to_replicated_input():
    torch.manual_seed(0)
    src = build(RESENC, resenc_arch_kwargs(), 1, 2, ds=False).eval()
    tgt = build(RESENC, resenc_arch_kwargs(), 4, 2, ds=False).eval()
    rep = transfer_weights(tgt, src.state_dict(), mode="encoder", backbone=BACKBONE_KEYS["ResidualEncoderUNet"])
    assert [a[0] for a in rep.adapted] == ["encoder.stem.convs.0.conv.weight"]
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        a = src.encoder(x)[-1]
        b = tgt.encoder(x.repeat(1, 4, 1, 1, 1))[-1]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    w = torch.randn(8, 1, 3, 3, 3)
    torch.testing.assert_close(adapt_input_channels(w, 4), w.repeat(1, 4, 1, 1, 1) / 4)


def test_encoder_only_and_full_loading(tmp_path):
    ck = tmp_path / "ck.pth"
    sd = make_checkpoint(ck, seed=1)
    torch.manual_seed(2)
    net = build(RESENC, resenc_arch_kwargs(), 1, 3, ds=True)
    fresh = deepcopy(net.state_dict())
    from nnssl_plugins.pretrain.common.weight_transfer import read_pretrained_checkpoint

    weights, plan = read_pretrained_checkpoint(str(ck))
    rep = transfer_weights(net, weights, mode="encoder", backbone=BACKBONE_KEYS["ResidualEncoderUNet"], plan=plan)
    after = net.state_dict()
    for k, v in after.items():
        if k.startswith("encoder.") or k.startswith("decoder.encoder."):
            assert torch.equal(v, sd[k]), k
        else:
            assert torch.equal(v, fresh[k]), k  # decoder stays fresh
    skipped = dict(rep.skipped)
    assert "mae_decoder.proj.weight" in skipped and "decoder.stages.0.convs.0.conv.weight" in skipped
    assert "loaded" in rep.format() and "kept fresh" in rep.format()

    torch.manual_seed(3)
    net2 = build(RESENC, resenc_arch_kwargs(), 1, 3, ds=True)
    fresh2 = deepcopy(net2.state_dict())
    transfer_weights(net2, weights, mode="full", backbone=BACKBONE_KEYS["ResidualEncoderUNet"], plan=plan)
    for k, v in net2.state_dict().items():
        if ".seg_layers." in k:
            assert torch.equal(v, fresh2[k]), k
        else:
            assert torch.equal(v, sd[k]), k


def test_incompatible_checkpoints_fail_with_clear_message(tmp_path):
    ck = tmp_path / "wide.pth"
    make_checkpoint(ck, kwargs=resenc_arch_kwargs((8, 16, 48)))
    from nnssl_plugins.pretrain.common.weight_transfer import load_pretrained_into

    net = build(RESENC, resenc_arch_kwargs(), 1, 2, ds=True)
    with pytest.raises(UserInputError) as e:
        load_pretrained_into(net, str(ck), mode="encoder", backbone=BACKBONE_KEYS["ResidualEncoderUNet"],
                             expected_arch="ResidualEncoderUNet", log=lambda s: None)
    msg = str(e.value)
    assert "encoder.stages.2" in msg and "(48," in msg and "(32," in msg and "nnssl_transfer_plans" in msg

    ck2 = tmp_path / "primus.pth"
    make_checkpoint(ck2, arch=PRIMUS)
    with pytest.raises(UserInputError) as e:
        load_pretrained_into(net, str(ck2), mode="encoder", backbone=BACKBONE_KEYS["ResidualEncoderUNet"],
                             expected_arch="ResidualEncoderUNet", log=lambda s: None)
    assert "Primus" in str(e.value) and "ResidualEncoderUNet" in str(e.value)
    # without an adaptation plan (foreign checkpoint): key-level message
    torch.save({"network_weights": torch.load(ck2, weights_only=True)["network_weights"]}, tmp_path / "bare.pth")
    with pytest.raises(UserInputError) as e:
        load_pretrained_into(net, str(tmp_path / "bare.pth"), mode="encoder",
                             backbone=BACKBONE_KEYS["ResidualEncoderUNet"], expected_arch="ResidualEncoderUNet",
                             log=lambda s: None)
    assert "incompatible architecture" in str(e.value)


def test_pos_embed_interpolation_for_new_patch_size(tmp_path):
    pe = torch.randn(1, 27, 5)
    torch.testing.assert_close(interpolate_pos_embed(pe, (3, 3, 3), (3, 3, 3)), pe)
    ck = tmp_path / "primus48.pth"
    sd = make_checkpoint(ck, arch=PRIMUS, kwargs=primus_arch_kwargs((48, 48, 48)))
    net = build(PRIMUS, primus_arch_kwargs((32, 32, 32)), 1, 2)
    from nnssl_plugins.pretrain.common.weight_transfer import read_pretrained_checkpoint

    weights, plan = read_pretrained_checkpoint(str(ck))
    rep = transfer_weights(net, weights, mode="encoder", backbone=BACKBONE_KEYS["Primus"], plan=plan,
                           target_token_grid=(4, 4, 4))
    assert [a[0] for a in rep.adapted] == ["eva.pos_embed"]
    assert net.eva.pos_embed.shape == (1, 64, 48)
    expected = interpolate_pos_embed(sd["eva.pos_embed"], (6, 6, 6), (4, 4, 4))
    torch.testing.assert_close(net.eva.pos_embed.data, expected)
    k = [k for k in sd if k.startswith("eva.blocks.0.") and k.endswith("weight")][0]
    assert torch.equal(net.state_dict()[k], sd[k])
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


# ------------------------------------------------------------------------------------------------------------
# end-to-end through stock nnUNetv2_train
# ------------------------------------------------------------------------------------------------------------
EXT_MODULE = '''
import torch
from nnssl_plugins.trainers.finetune import *
from nnssl_plugins.trainers.classification import *


def _tiny(self, epochs=2):
    self.num_epochs = epochs
    self.num_iterations_per_epoch = 3
    self.num_val_iterations_per_epoch = 2


class nnsslFinetuneTrainer_frozenEncoder_test(nnsslFinetuneTrainer_frozenEncoder):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device); _tiny(self)


class nnsslFinetuneTrainer_test(nnsslFinetuneTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device); _tiny(self)


class nnsslPrimusFinetuneTrainer_test(nnsslPrimusFinetuneTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device); _tiny(self)


class nnsslClsTrainer_Frozen_test(nnsslClsTrainer_Frozen):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device); _tiny(self, 6); self.num_iterations_per_epoch = 4
        self.initial_lr = 3e-3


class nnsslClsTrainer_test(nnsslClsTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device); _tiny(self, 2)
'''


def setup_env(monkeypatch, root):
    for d in ("raw", "pre", "res", "ext"):
        (root / d).mkdir(exist_ok=True)
    (root / "ext" / "nnssl_test_trainers.py").write_text(EXT_MODULE)
    monkeypatch.setenv("nnUNet_raw", str(root / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "pre"))
    monkeypatch.setenv("nnUNet_results", str(root / "res"))
    monkeypatch.setenv("nnUNet_extTrainer", str(root / "ext"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_compile", "0")


def make_raw_dataset(root, dataset_id, name, images, seg=None, channels=1):
    """images: {case: array (X,Y,Z) or (C,X,Y,Z)}; seg: {case: uint8 array} or None (blob = image > mean)."""
    import SimpleITK as sitk

    folder = root / "raw" / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    for case, img in images.items():
        arr = img if img.ndim == 4 else img[None]
        for c in range(channels):
            sitk.WriteImage(sitk.GetImageFromArray(arr[c % arr.shape[0]].astype(np.float32)),
                            str(folder / "imagesTr" / f"{case}_{c:04d}.nii.gz"))
        s = seg[case] if seg is not None else (arr[0] > arr[0].mean() + arr[0].std()).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(s.astype(np.uint8)), str(folder / "labelsTr" / f"{case}.nii.gz"))
    ds = {"channel_names": {str(c): f"MR{c}" for c in range(channels)}, "labels": {"background": 0, "blob": 1},
          "numTraining": len(images), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(ds))
    return folder


def plan_and_preprocess(root, dataset_id, extra_plans=()):
    """Stock planning + preprocessing (3d_fullres), then tiny plans 'nnsslTestPlans' (+ extra variants)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    os.environ["nnUNet_n_proc_DA"] = "1"  # the planner sets torch threads to this number
    try:
        extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
        plan_experiments([dataset_id])
    finally:
        os.environ["nnUNet_n_proc_DA"] = "0"
    name = maybe_convert_to_dataset_name(dataset_id)
    pre = root / "pre" / name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg.update(patch_size=[32, 32, 32], batch_size=2)
    cfg["architecture"] = {"network_class_name": RESENC, "arch_kwargs": resenc_arch_kwargs(),
                           "_kw_requires_import": REQ_IMPORT}
    plans["configurations"] = {"3d_fullres": cfg}
    plans["plans_name"] = "nnsslTestPlans"
    (pre / "nnsslTestPlans.json").write_text(json.dumps(plans, indent=1))
    preprocess([dataset_id], "nnsslTestPlans", configurations=("3d_fullres",), num_processes=(1,), verbose=False)
    for pname, arch in extra_plans:
        p = deepcopy(plans)
        p["plans_name"] = pname
        p["configurations"]["3d_fullres"]["architecture"] = arch
        (pre / f"{pname}.json").write_text(json.dumps(p, indent=1))
    return name


def run_stock_train(monkeypatch, argv):
    from nnunetv2.run.run_training import run_training_entry

    monkeypatch.setattr(sys, "argv", ["nnUNetv2_train", *argv, "-device", "cpu"])
    run_training_entry()


def blob_volume(rng, bright: bool, shape=(40, 40, 40)):
    img = rng.normal(0, 1, shape).astype(np.float32)
    c = rng.integers(12, 28, 3)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    mask = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < 8 ** 2
    img[mask] += 4.0 if bright else -4.0
    return img, mask.astype(np.uint8)


@pytest.fixture(scope="module")
def seg_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    mp = pytest.MonkeyPatch()
    setup_env(mp, root)
    rng = np.random.default_rng(0)
    images, segs = {}, {}
    for i in range(6):
        images[f"case_{i:03d}"], segs[f"case_{i:03d}"] = blob_volume(rng, True)
    # two channels: the 1-channel checkpoints below exercise input-channel adaption end to end
    make_raw_dataset(root, 901, "FtTest", images, segs, channels=2)
    primus_arch = {"network_class_name": PRIMUS, "arch_kwargs": primus_arch_kwargs((32, 32, 32)),
                   "_kw_requires_import": []}
    name = plan_and_preprocess(root, 901, extra_plans=[("nnsslTestPrimusPlans", primus_arch)])
    yield root, name, mp
    mp.undo()


def _final_weights(root, name, trainer, plans):
    f = root / "res" / name / f"{trainer}__{plans}__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    assert f.is_file()
    return torch.load(f, map_location="cpu", weights_only=False)["network_weights"]


def test_stock_train_frozen_encoder_resenc(seg_dataset, monkeypatch, capsys):
    root, name, _ = seg_dataset
    ck = root / "resenc_ck.pth"
    sd = make_checkpoint(ck, seed=5)
    run_stock_train(monkeypatch, ["901", "3d_fullres", "0", "-p", "nnsslTestPlans",
                                  "-tr", "nnsslFinetuneTrainer_frozenEncoder_test", "-pretrained_weights", str(ck)])
    out = capsys.readouterr().out
    assert "mode: encoder" in out and "input channels 1 -> 2" in out and "mae_decoder.proj.weight" in out
    w = _final_weights(root, name, "nnsslFinetuneTrainer_frozenEncoder_test", "nnsslTestPlans")
    stem_keys = ("encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.all_modules.0.weight")
    adapted = adapt_input_channels(sd[stem_keys[0]], 2)
    n = 0
    for k, v in w.items():
        if k.startswith("encoder."):
            n += 1
            # bit-identical after training (the stem kernel: identical to its channel-adapted version)
            assert torch.equal(v, adapted if k in stem_keys else sd[k]), k
    assert n > 20
    changed = [k for k in w if k.startswith("decoder.stages") and not torch.equal(w[k], sd[k])]
    assert changed, "decoder should train"


def test_stock_train_primus_pos_embed(seg_dataset, monkeypatch, capsys):
    root, name, _ = seg_dataset
    ck = root / "primus_ck.pth"
    make_checkpoint(ck, arch=PRIMUS, kwargs=primus_arch_kwargs((48, 48, 48)), seed=6)
    run_stock_train(monkeypatch, ["901", "3d_fullres", "0", "-p", "nnsslTestPrimusPlans",
                                  "-tr", "nnsslPrimusFinetuneTrainer_test", "-pretrained_weights", str(ck)])
    out = capsys.readouterr().out
    assert "positional embedding grid (6, 6, 6) -> (4, 4, 4)" in out
    assert "input channels 1 -> 2" in out
    w = _final_weights(root, name, "nnsslPrimusFinetuneTrainer_test", "nnsslTestPrimusPlans")
    assert w["eva.pos_embed"].shape == (1, 64, 48)


def test_stock_trainer_still_uses_stock_loader(seg_dataset, monkeypatch):
    """The dispatcher only reroutes networks owned by our trainers."""
    import nnunetv2.run.run_training as rt
    from nnssl_plugins.pretrain.common import weight_transfer as wt

    wt.install_pretrained_dispatch()
    calls = []
    monkeypatch.setattr(wt._dispatching_load_pretrained_weights, "stock", lambda n, f, verbose=False: calls.append(f))
    rt.load_pretrained_weights(torch.nn.Linear(2, 2), "x.pth")
    assert calls == ["x.pth"]
