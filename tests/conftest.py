"""Shared fixtures: an isolated nnU-Net workspace (env vars) and small raw datasets.

Real data: ../shared/data (next to the repo) — the small TotalSegmentator CT with labels.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("NNSSL_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
REAL_CT = os.path.join(SHARED_DATA, "ct", "totalseg_ct_sm.nii.gz")
REAL_CT_SEG = os.path.join(SHARED_DATA, "ct", "totalseg_ct_sm_seg.nii.gz")

if not os.path.isfile(REAL_CT):
    raise RuntimeError(f"real test data not found at {SHARED_DATA}: put the project's shared/ folder beside the repo "
                       f"or set NNSSL_SHARED_DATA to its data/ folder")

# tests run on 2 CPU cores: no background augmentation workers, no torch.compile
os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("nnUNet_compile", "false")


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Fresh nnUNet_raw / _preprocessed / _results under tmp_path (nnunetv2 reads them lazily)."""
    paths = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        d = tmp_path / name
        d.mkdir()
        monkeypatch.setenv(name, str(d))
        paths[name] = str(d)
    # MASSPretrainTrainer.prepare_pretraining_data records the chosen mask backend in this variable for the
    # training that follows in the same process; undone after the test like the paths (empty = auto-detect)
    monkeypatch.setenv("nnssl_mass_mask_backend", "")
    return paths


def write_volume(path, array, spacing=(1.0, 1.0, 1.0), ref=None):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    if ref is not None:
        img.CopyInformation(ref)
    else:
        img.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(img, str(path))
    return img


def make_synthetic_dataset(raw_root, dataset_id=990, name="Syn", n_cases=3, labeled=False, channels=("CT",),
                           shape=(40, 44, 48), spacing=(1.5, 1.1, 1.2), labels_in_json=None, seed=0):
    """Blob phantoms: noisy background + a bright box (label 1) + a dark sphere (label 2)."""
    rs = np.random.RandomState(seed)
    ds = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    os.makedirs(os.path.join(ds, "imagesTr"))
    if labeled:
        os.makedirs(os.path.join(ds, "labelsTr"))
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for i in range(n_cases):
        lab = np.zeros(shape, np.uint8)
        o = rs.randint(-3, 4, size=3)
        lab[10 + o[0]:25 + o[0], 10 + o[1]:30 + o[1], 12 + o[2]:30 + o[2]] = 1
        c = np.array(shape) // 2 + rs.randint(-4, 5, size=3) + np.array([5, 8, 8])
        lab[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < 36] = 2
        for ch in range(len(channels)):
            img = (rs.randn(*shape) * 20 + 40).astype(np.float32)
            img[lab == 1] += 300 + 50 * ch
            img[lab == 2] -= 150
            write_volume(os.path.join(ds, "imagesTr", f"case{i:02d}_{ch:04d}.nii.gz"), img, spacing)
        if labeled:
            write_volume(os.path.join(ds, "labelsTr", f"case{i:02d}.nii.gz"), lab, spacing)
    dj = {"channel_names": {str(i): c for i, c in enumerate(channels)}, "file_ending": ".nii.gz",
          "numTraining": n_cases}
    if labeled or labels_in_json:
        dj["labels"] = labels_in_json or {"background": 0, "box": 1, "sphere": 2}
    with open(os.path.join(ds, "dataset.json"), "w") as f:
        json.dump(dj, f)
    return ds


def complete_plans(architecture, patch_size, channels=1, normalization="ZScoreNormalization",
                   dataset_name="Dataset000_Fake", plans_name="fake", spacing=(1.0, 1.0, 1.0)):
    """A complete nnU-Net plans dict with one 3d_fullres configuration (what a pretraining checkpoint records)
    for tests that need plans without planning a dataset."""
    return {
        "dataset_name": dataset_name, "plans_name": plans_name, "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [64, 64, 64], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "test",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 1000.0, "mean": 100.0, "median": 90.0, "min": -1000.0, "percentile_00_5": -900.0,
                     "percentile_99_5": 900.0, "std": 50.0} for c in range(channels)},
        "configurations": {"3d_fullres": {
            "data_identifier": f"{plans_name}_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch_size), "median_image_size_in_voxels": [64.0, 64.0, 64.0],
            "spacing": list(spacing), "normalization_schemes": [normalization] * channels,
            "use_mask_for_norm": [False] * channels, "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": architecture, "batch_dice": False}},
    }


@pytest.fixture
def test_trainer_dir(tmp_path, monkeypatch):
    """An extra nnUNet_extTrainer folder with stock-derived short trainers for finetuning tests."""
    d = tmp_path / "ext_trainers"
    d.mkdir()
    (d / "nnssl_test_trainers.py").write_text(textwrap.dedent("""
        from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
            nnUNetTrainerNoMirroring)

        class nnUNetTrainer_nnsslTest(nnUNetTrainerNoMirroring):
            # stock trainer, only shorter: 1 epoch x 2 iterations, no test-time mirroring in validation
            def __init__(self, plans, configuration, fold, dataset_json, device=None):
                super().__init__(plans, configuration, fold, dataset_json, device)
                self.num_epochs = 1
                self.num_iterations_per_epoch = 2
                self.num_val_iterations_per_epoch = 1
    """))
    from nnssl_plugins.cli.trainer_path import trainer_discovery_folder

    cur = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if trainer_discovery_folder() not in cur:
        cur.append(trainer_discovery_folder())
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join(cur + [str(d)]))
    return str(d)


def run_cmd(args, env=None, timeout=600):
    """Run a console command; returns CompletedProcess (text)."""
    import subprocess

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=timeout)


BIN = os.path.dirname(sys.executable)
