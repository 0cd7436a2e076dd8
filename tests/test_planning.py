"""Unlabeled/labeled planning + preprocessing on nnU-Net's own code paths."""
from __future__ import annotations

import json
import os
import shutil

import blosc2
import numpy as np
import pytest

from nnssl_plugins.planners.api import plan_and_preprocess
from nnssl_plugins.planners.preprocessing import clipped_intensity_stats

from conftest import BIN, REAL_CT, REAL_CT_SEG, make_synthetic_dataset, run_cmd


def _folder(env, ds, ident):
    return os.path.join(env["nnUNet_preprocessed"], ds, ident)


@pytest.mark.parametrize("labels_entry", [False, True])
def test_unlabeled_dataset_plans_and_b2nd(nnunet_env, labels_entry):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, "Unlab", n_cases=2, labeled=False,
                           labels_in_json={"background": 0, "thing": 1} if labels_entry else None)
    name = plan_and_preprocess(990, "MDAE", "tiny")
    assert name == "nnsslPlans_MDAE_tiny"
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset990_Unlab")
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(os.path.join(pre, name + ".json"))  # nnU-Net reads our plans
    cm = pm.get_configuration("3d_fullres")
    assert cm.patch_size == [32, 32, 32] and cm.spacing == [1.0, 1.0, 1.0]
    assert cm.network_arch_class_name.endswith("ResidualEncoderUNet")
    assert cm.network_arch_init_kwargs["features_per_stage"] == [8, 16, 32]
    folder = _folder(nnunet_env, "Dataset990_Unlab", cm.data_identifier)
    ds_cls = infer_dataset_class(folder)
    ds = ds_cls(folder)
    data, seg, _, props = ds.load_case("case00")
    assert data.shape[0] == 1 and seg.shape[1:] == data.shape[1:]
    assert set(np.unique(seg[:])) <= {-1, 0}  # only the nonzero mask for unlabeled data
    assert "labels" in json.load(open(os.path.join(pre, "dataset.json")))


def test_default_mdae_plan_is_the_authors_setting(nnunet_env):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, "Unlab", n_cases=1)
    plan_and_preprocess(990, "MDAE", preprocess=False)
    plans = json.load(open(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset990_Unlab",
                                        "nnsslPlans_MDAE.json")))
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [1.0, 1.0, 1.0] and cfg["patch_size"] == [160, 160, 160]
    assert cfg["architecture"]["arch_kwargs"]["features_per_stage"] == [32, 64, 128, 256, 320, 320]


def test_labeled_dataset_segmentation_equals_stock_preprocessing(nnunet_env):
    """Our preprocessing of a labeled real CT == stock `nnUNetv2_preprocess` on the same plans."""
    raw = os.path.join(nnunet_env["nnUNet_raw"], "Dataset993_RealCT")
    os.makedirs(os.path.join(raw, "imagesTr"))
    os.makedirs(os.path.join(raw, "labelsTr"))
    shutil.copy(REAL_CT, os.path.join(raw, "imagesTr", "ct_0000.nii.gz"))
    shutil.copy(REAL_CT_SEG, os.path.join(raw, "labelsTr", "ct.nii.gz"))
    labels = json.load(open(REAL_CT_SEG.replace(".nii.gz", "_labels.json")))
    json.dump({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 1,
               "labels": {"background": 0, **{v: int(k) for k, v in labels.items()}}},
              open(os.path.join(raw, "dataset.json"), "w"))
    name = plan_and_preprocess(993, "MDAE", "tiny", spacing=[3.0, 3.0, 3.0])
    folder = _folder(nnunet_env, "Dataset993_RealCT", name + "_3d_fullres")
    ours_seg = blosc2.open(os.path.join(folder, "ct_seg.b2nd"))[:]
    ours_img = blosc2.open(os.path.join(folder, "ct.b2nd"))[:]
    assert len(np.unique(ours_seg)) > 30  # organ labels survived
    keep = os.path.join(str(nnunet_env["nnUNet_preprocessed"]), "ours")
    shutil.copytree(folder, keep)
    r = run_cmd([os.path.join(BIN, "nnUNetv2_preprocess"), "-d", "993", "-plans_name", name, "-c", "3d_fullres",
                 "-np", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_array_equal(blosc2.open(os.path.join(folder, "ct_seg.b2nd"))[:], ours_seg)
    np.testing.assert_array_equal(blosc2.open(os.path.join(folder, "ct.b2nd"))[:], ours_img)


def test_rerun_skips_finished_cases_and_replans_on_change(nnunet_env):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, "Unlab", n_cases=2)
    plan_and_preprocess(990, "MDAE", "tiny")
    folder = _folder(nnunet_env, "Dataset990_Unlab", "nnsslPlans_MDAE_tiny_3d_fullres")
    f = os.path.join(folder, "case00.b2nd")
    m0 = os.stat(f).st_mtime_ns
    os.remove(os.path.join(folder, "case01.b2nd"))  # as if killed before this case finished
    plan_and_preprocess(990, "MDAE", "tiny")
    assert os.stat(f).st_mtime_ns == m0 and os.path.isfile(os.path.join(folder, "case01.b2nd"))
    plan_and_preprocess(990, "MDAE", "tiny", spacing=[2.0, 2.0, 2.0])  # plans changed → data rebuilt
    assert blosc2.open(f).shape[1:] != (0,)
    assert os.stat(f).st_mtime_ns != m0


def test_clipped_stats_from_histogram():
    rs = np.random.RandomState(0)
    px = rs.randn(200000) * 300 + 50
    counts, edges = np.histogram(px, bins=4096, range=(px.min(), px.max() + 1e-6))
    fp = {"nnssl_intensity_histograms": {"0": {"counts": counts.tolist(), "min": edges[0], "max": edges[-1]}}}
    s = clipped_intensity_stats(fp, 0, -175, 250)
    c = np.clip(px, -175, 250)
    assert abs(s["mean"] - c.mean()) < 1 and abs(s["std"] - c.std()) < 1
