"""MASS wiring: planner, sampler, stock `nnUNetv2_train -tr MASSPretrainTrainer_smoke`, key transfer, overfit."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import BIN, make_synthetic_dataset, run_cmd

DS = "Dataset990_Syn"
PLANS = "nnsslPlans_MASS_tiny"


def prepare(nnunet_env, backend="labels", n_cases=3):
    from nnssl_plugins.planners.api import plan_and_preprocess
    from nnssl_plugins.trainers.mass import MASSPretrainTrainer

    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, "Syn", n_cases=n_cases, labeled=True)
    assert plan_and_preprocess(DS, "MASS", "tiny") == PLANS
    MASSPretrainTrainer.prepare_pretraining_data(DS, PLANS, {"mask_backend": backend})
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], DS)
    return pre, json.load(open(os.path.join(pre, PLANS + ".json")))


def loader(pre, backend="labels", augment=True, num_masks=4, batch_size=2):
    from nnssl_plugins.pretrain.common.data import nnsslDatasetBlosc2
    from nnssl_plugins.pretrain.mass.sampling import MASSDataLoader
    from nnssl_plugins.trainers.mass import mask_dir

    ds = nnsslDatasetBlosc2(os.path.join(pre, PLANS + "_3d_fullres"), None)
    return MASSDataLoader(ds, batch_size, (32, 32, 32), mask_dir(DS, PLANS, backend), num_masks=num_masks,
                          augment=augment)


def test_planner_plans(nnunet_env):
    from nnssl_plugins.planners.mass import MASSPlanner
    from nnssl_plugins.pretrain.mass import mass_architecture_plans

    _, plans = prepare(nnunet_env)
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [1.5, 1.5, 1.5] and cfg["patch_size"] == [32, 32, 32]
    assert cfg["normalization_schemes"] == ["CTNormalization"]
    ak = cfg["architecture"]["arch_kwargs"]
    assert ak["n_stages"] == 4 and ak["features_per_stage"][0] <= 16
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    assert props["percentile_00_5"] == -991.0 and props["percentile_99_5"] == 500.0
    assert plans["nnssl"]["percentile_clip_channels"] == []
    d = MASSPlanner.presets["default"]
    assert d["patch_size"] == [128] * 3
    ref = mass_architecture_plans()["arch_kwargs"]
    assert ref["features_per_stage"] == [32, 64, 128, 256, 512]


def test_sampler_batches_aligned(nnunet_env):
    pre, _ = prepare(nnunet_env)
    np.random.seed(0)
    torch.manual_seed(0)
    dl = loader(pre, augment=False)
    b = next(dl)
    assert b["data"].shape == b["ref"].shape == (2, 1, 32, 32, 32)
    assert b["target"].shape == b["ref_masks"].shape == (2, 4, 32, 32, 32)
    assert b["target"].dtype == torch.uint8 and set(torch.unique(b["target"]).tolist()) <= {0, 1}
    assert b["target"][:, 0].float().mean() > 0.9  # all-ones context mask (zeros only in padding)
    # crops overlap: ref and query are different crops of the same scan
    assert not torch.equal(b["data"], b["ref"])
    dl = loader(pre, augment=True)
    for _ in range(3):
        b = next(dl)
        for img, m in ((b["data"], b["target"]), (b["ref"], b["ref_masks"])):
            for s in range(2):
                for k in range(1, 4):
                    inside = img[s, 0][m[s, k].bool()]
                    if inside.numel() > 50:  # masks are homogeneous phantom objects: the image agrees with the mask
                        assert (inside - inside.median()).abs().median() < 0.5 * img[s, 0].std()


def test_stock_train_checkpoint_and_transfer(nnunet_env, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnssl_plugins.cli.trainer_path import trainer_discovery_folder
    from nnssl_plugins.planners.transfer import transfer_plans

    prepare(nnunet_env, backend="slic")
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "nnssl_mass_test_trainers.py").write_text("from nnssl_plugins.trainers.mass import *\n")
    env = {"nnUNet_extTrainer": os.pathsep.join([str(ext), trainer_discovery_folder()]),
           "nnssl_mass_mask_backend": "slic", "OMP_NUM_THREADS": "1"}
    r = run_cmd([os.path.join(BIN, "nnUNetv2_train"), "990", "3d_fullres", "all", "-p", PLANS,
                 "-tr", "MASSPretrainTrainer_smoke", "-device", "cpu"], env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = os.path.join(nnunet_env["nnUNet_results"], DS, f"MASSPretrainTrainer_smoke__{PLANS}__3d_fullres", "fold_all")
    ckpt_path = os.path.join(out, "checkpoint_final.pth")
    assert os.path.isfile(os.path.join(out, "progress.png"))
    ckpt = torch.load(ckpt_path, weights_only=True)
    plan = ckpt["nnssl_adaptation_plan"]
    assert plan["method"] == "MASS" and plan["key_to_encoder"] == "encoder.stages"
    assert plan["mass"]["num_masks"] == 13
    w = ckpt["network_weights"]
    assert any(k.startswith("task_encoder.") for k in w) and any(k.startswith("decoder.stages") for k in w)
    log = open([os.path.join(out, f) for f in os.listdir(out) if f.startswith("training_log")][0]).read()
    assert "val_metric" in log  # mean hard Dice of the val batches

    # a stock ResidualEncoderUNet built from the transferred plans loads the MASS checkpoint (stock loader)
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 991, "Target", n_cases=2, labeled=True, seed=1)
    pn = transfer_plans("991", ckpt_path)
    plans = json.load(open(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset991_Target", pn + ".json")))
    cm = PlansManager(plans).get_configuration("3d_fullres")
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 3, allow_init=True, deep_supervision=True)
    load_pretrained_weights(net, ckpt_path, verbose=False)
    sd = net.state_dict()
    for k, v in sd.items():
        if ".seg_layers." not in k:
            assert torch.equal(v.cpu(), w[k].cpu()), k


def test_overfit_on_sampler_batch(nnunet_env):
    """Trainer recipe (LAMB, Dice+BCE, clip 1.0) on one fixed sampler batch: hard Dice rises clearly."""
    from timm.optim import Lamb

    from nnssl_plugins.pretrain.mass import build_mass_model, hard_dice, mass_arch_kwargs, mass_loss

    pre, plans = prepare(nnunet_env)
    np.random.seed(1)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    b = next(loader(pre, augment=False, num_masks=3, batch_size=1))
    ref, rm, q, qm = b["ref"], b["ref_masks"].float(), b["data"], b["target"].float()
    m = build_mass_model(plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"], 1,
                         patch_size=(32, 32, 32))
    opt = Lamb(m.parameters(), lr=1e-2, weight_decay=1e-5)

    def score():
        m.eval()
        with torch.no_grad():
            d = hard_dice(m(ref, rm, q)[:, 1:], qm[:, 1:]).mean().item()
        m.train()
        return d

    d0 = score()
    for _ in range(40):
        loss, _ = mass_loss(m(ref, rm, q), qm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    d1 = score()
    assert d1 > max(0.6, d0 + 0.2), (d0, d1)


def test_missing_masks_is_user_error(nnunet_env):
    from nnssl_plugins.errors import UserInputError

    pre, _ = prepare(nnunet_env)
    with pytest.raises(UserInputError, match="nnssl_generate_masks"):
        loader(pre, backend="sam2")


def test_fast_spatial_path_matches_spatial_transform(nnunet_env):
    """The sampler's resampling (sub-window, bit-packed masks, one nearest grid_sample) gives what
    batchgeneratorsv2's SpatialTransform gives on the full enlarged window for the same draw: masks identical,
    image up to float rounding; identity draws are plain crops. Centres near the border exercise padding."""
    from nnssl_plugins.pretrain.mass.sampling import _window, extract_window

    pre, _ = prepare(nnunet_env)
    dl = loader(pre, augment=True, num_masks=6)
    key = dl.indices[0]
    data = dl._data.load_case(key)[0]
    shape = tuple(data.shape[1:])
    store = dl._store(key)
    chosen = [i % len(store) for i in range(dl.num_masks - 1)]
    crops = {i: store.crop(i) for i in set(chosen)}
    sp = dl.sp_query
    rng = np.random.RandomState(0)
    n_resampled = n_objects = 0
    for t in range(12):
        np.random.seed(t)
        params = sp.get_parameters(image=dl._param_probe)
        n_resampled += params["grid"] is not None
        center = [int(rng.randint(0, s)) for s in shape] if t % 3 else [0, shape[1] - 1, shape[2] // 2]
        sp.get_parameters = lambda **kw: params  # the fast path draws exactly this
        try:
            img, msk = dl._crop(data, chosen, crops, center, sp, shape, None)
        finally:
            del sp.get_parameters
        win = _window(center, dl.ext_size)
        ref_img = sp._apply_to_image(torch.from_numpy(extract_window(data, win)), **params)
        ref_msk = sp._apply_to_segmentation(
            torch.from_numpy(dl._masks_for_window(store, chosen, crops, win, shape)), **params)
        assert msk.dtype == torch.uint8 and msk.shape == ref_msk.shape == (6, 32, 32, 32)
        assert torch.equal(msk, ref_msk.to(torch.uint8)), t
        n_objects += bool(ref_msk[1:].any())
        assert torch.allclose(img, ref_img, atol=1e-4), t
    assert n_objects >= 3  # the comparison is not vacuous: stored masks inside the crops
    assert n_resampled >= 8  # query draw: rotation or scaling with p 1 - 0.2² = 0.96
