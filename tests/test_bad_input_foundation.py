"""Foundation bad input: one clear line, non-zero exit, no traceback, nothing half-written."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import BIN, complete_plans, make_synthetic_dataset, run_cmd


def _cli(module, argv, capsys):
    import importlib

    mod = importlib.import_module(f"nnssl_plugins.cli.{module}")
    with pytest.raises(SystemExit) as e:
        mod.main_cli.__wrapped__(argv) if hasattr(mod.main_cli, "__wrapped__") else _run(mod, argv)
    err = capsys.readouterr().err
    return e.value.code, err


def _run(mod, argv):
    from nnssl_plugins.errors import run_cli

    run_cli(lambda: mod.main(argv))


def _assert_clean_error(code, err, *needles):
    assert code == 2, err
    # progress bars may precede it on stderr; the error itself is exactly one line
    errors = [ln for ln in err.splitlines() if ln.startswith("ERROR: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    err = errors[0]
    for n in needles:
        assert n in err, (n, err)


def test_missing_env_vars(monkeypatch, capsys):
    for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(n, raising=False)
    code, err = _cli("plan_and_preprocess", ["-d", "1", "-m", "MDAE"], capsys)
    _assert_clean_error(code, err, "nnUNet_raw", "export")


def test_dataset_not_found_and_wrong_method(nnunet_env, capsys):
    code, err = _cli("plan_and_preprocess", ["-d", "777", "-m", "MDAE"], capsys)
    _assert_clean_error(code, err, "-d 777", "Dataset777_")
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, "Unlab", n_cases=1)
    code, err = _cli("plan_and_preprocess", ["-d", "990", "-m", "SimCLR"], capsys)
    _assert_clean_error(code, err, "-m SimCLR", "MDAE")


def test_dataset_without_images(nnunet_env, capsys):
    ds = os.path.join(nnunet_env["nnUNet_raw"], "Dataset995_Empty")
    os.makedirs(os.path.join(ds, "imagesTr"))
    json.dump({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 0},
              open(os.path.join(ds, "dataset.json"), "w"))
    code, err = _cli("plan_and_preprocess", ["-d", "995", "-m", "MDAE"], capsys)
    _assert_clean_error(code, err, "imagesTr", "no images")
    assert not os.path.exists(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset995_Empty",
                                           "nnsslPlans_MDAE.json"))


def test_nan_image_named(nnunet_env, capsys):
    # SimpleITK's NIfTI reader turns NaN into 0; NRRD keeps it, so the check must catch it there
    import numpy as np
    from conftest import write_volume

    ds = os.path.join(nnunet_env["nnUNet_raw"], "Dataset996_Nan")
    os.makedirs(os.path.join(ds, "imagesTr"))
    a = np.ones((20, 20, 20), np.float32)
    write_volume(os.path.join(ds, "imagesTr", "good_0000.nrrd"), a)
    a[3, 3, 3] = np.nan
    write_volume(os.path.join(ds, "imagesTr", "bad_0000.nrrd"), a)
    json.dump({"channel_names": {"0": "MR"}, "file_ending": ".nrrd", "numTraining": 2},
              open(os.path.join(ds, "dataset.json"), "w"))
    code, err = _cli("plan_and_preprocess", ["-d", "996", "-m", "MDAE", "--preset", "tiny"], capsys)
    _assert_clean_error(code, err, "bad_0000.nrrd", "NaN")


def _fake_ckpt(path, with_plan=True, channels=1):
    from nnssl_plugins.pretrain.common.networks import resenc_architecture
    from nnssl_plugins.pretrain.common.adaptation import make_adaptation_plan

    arch = resenc_architecture([8, 16, 32], [1, 1, 1])
    plans = complete_plans(arch, [32, 32, 32], channels, "CTNormalization", "Dataset990_Unlab", "nnsslPlans_MDAE_tiny")
    ck = {"network_weights": {}}
    if with_plan:
        ck["nnssl_adaptation_plan"] = make_adaptation_plan(arch["network_class_name"], arch["arch_kwargs"],
                                                           arch["_kw_requires_import"], plans, channels, [32] * 3)
    torch.save(ck, path)


def test_checkpoint_without_adaptation_plan(nnunet_env, tmp_path, capsys):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 991, "Target", n_cases=2, labeled=True)
    p = str(tmp_path / "plain.pth")
    _fake_ckpt(p, with_plan=False)
    code, err = _cli("transfer_plans", ["-d", "991", "-ckpt", p], capsys)
    _assert_clean_error(code, err, "plain.pth", "nnssl_adaptation_plan")
    assert not os.path.exists(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset991_Target"))


def test_target_channel_count_differs(nnunet_env, tmp_path, capsys):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 992, "TwoCh", n_cases=2, labeled=True, channels=("T1", "T2"))
    p = str(tmp_path / "ck.pth")
    _fake_ckpt(p)
    code, err = _cli("transfer_plans", ["-d", "992", "-ckpt", p], capsys)
    _assert_clean_error(code, err, "2 input channel", "nnsslFinetuneTrainer")


def test_cli_exit_code_and_no_traceback_in_subprocess(nnunet_env):
    r = run_cmd([os.path.join(BIN, "nnssl_pretrain"), "-d", "404", "-m", "MDAE", "--preset", "tiny"])
    assert r.returncode == 2 and r.stderr.startswith("ERROR: ") and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
