"""nnssl_incontext_predict: 1 and 3 references, folder input, embedding reuse, input geometry, bad inputs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import BIN, make_synthetic_dataset, run_cmd

DS = "Dataset990_Syn"
PLANS = "nnsslPlans_MASS_tiny"


@pytest.fixture
def mass_ckpt(nnunet_env, tmp_path):
    """A (randomly initialised) MASS checkpoint with a real adaptation plan, without a training run."""
    from nnssl_plugins.planners.api import plan_and_preprocess
    from nnssl_plugins.pretrain.common.adaptation import make_adaptation_plan
    from nnssl_plugins.pretrain.mass import build_mass_model

    raw = make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, "Syn", n_cases=3, labeled=True)
    plan_and_preprocess(DS, "MASS", "tiny", preprocess=False)
    plans = json.load(open(os.path.join(nnunet_env["nnUNet_preprocessed"], DS, PLANS + ".json")))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    model = build_mass_model(arch["arch_kwargs"], 1, patch_size=(32, 32, 32))
    ap = make_adaptation_plan(arch_class_name=arch["network_class_name"], arch_kwargs=arch["arch_kwargs"],
                              arch_kwargs_requiring_import=arch["_kw_requires_import"], nnunet_plans=plans,
                              pretrain_num_input_channels=1, recommended_downstream_patchsize=[32, 32, 32],
                              method="MASS", trainer_name="MASSPretrainTrainer", pretrain_configuration="3d_fullres",
                              mass={"patch_size": [32, 32, 32]})
    path = str(tmp_path / "mass.pth")
    torch.save({"network_weights": model.state_dict(), "nnssl_adaptation_plan": ap}, path)
    return path, raw


def _files(raw, i):
    return os.path.join(raw, "imagesTr", f"case{i:02d}_0000.nii.gz"), os.path.join(raw, "labelsTr", f"case{i:02d}.nii.gz")


def _same_geometry(a_path, b_path):
    import SimpleITK as sitk

    a, b = sitk.ReadImage(a_path), sitk.ReadImage(b_path)
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection())
    return sitk.GetArrayFromImage(a)


def test_one_and_three_references(mass_ckpt, tmp_path):
    from nnssl_plugins.cli.incontext_predict import main

    ckpt, raw = mass_ckpt
    img2, _ = _files(raw, 2)
    out1 = str(tmp_path / "one.nii.gz")
    assert main(["-ckpt", ckpt, "-r", *_files(raw, 0), "-i", img2, "-o", out1, "--labels", "1"]) == 0
    seg = _same_geometry(out1, img2)
    assert set(np.unique(seg).tolist()) <= {0, 1}

    # three references, a folder input, embedding saved then reused
    inp = tmp_path / "in"
    inp.mkdir()
    for i in (1, 2):
        os.symlink(_files(raw, i)[0], inp / f"c{i}_0000.nii.gz")
    emb = str(tmp_path / "emb.safetensors")
    args = ["-ckpt", ckpt]
    for i in range(3):
        args += ["-r", *_files(raw, i)]
    assert main(args + ["-i", str(inp), "-o", str(tmp_path / "out3"), "--save-embedding", emb]) == 0
    for i in (1, 2):
        seg = _same_geometry(str(tmp_path / "out3" / f"c{i}.nii.gz"), _files(raw, i)[0])
        assert set(np.unique(seg).tolist()) <= {0, 1, 2}
    from nnssl_plugins.pretrain.mass import TaskEmbedding

    e = TaskEmbedding.load(emb)
    assert e.num_references == 3 and e.num_classes == 2
    out_e = str(tmp_path / "from_emb.nii.gz")
    assert main(["-ckpt", ckpt, "--embedding", emb, "--labels", "1", "2", "-i", img2, "-o", out_e]) == 0
    a = _same_geometry(out_e, img2)
    b = _same_geometry(str(tmp_path / "out3" / "c2.nii.gz"), img2)
    assert np.array_equal(a, b)


def test_bad_inputs(mass_ckpt, tmp_path):
    from nnssl_plugins.cli.incontext_predict import main
    from nnssl_plugins.errors import UserInputError

    ckpt, raw = mass_ckpt
    img2, _ = _files(raw, 2)
    out = str(tmp_path / "o.nii.gz")
    with pytest.raises(UserInputError, match=r"absent from this reference"):
        main(["-ckpt", ckpt, "-r", *_files(raw, 0), "-i", img2, "-o", out, "--labels", "1", "7"])
    ref_img, ref_seg = _files(raw, 0)
    with pytest.raises(UserInputError, match=r"channel"):
        main(["-ckpt", ckpt, "-r", f"{ref_img},{ref_img}", ref_seg, "-i", img2, "-o", out])
    with pytest.raises(UserInputError, match=r"channel"):
        main(["-ckpt", ckpt, "-r", ref_img, ref_seg, "-i", f"{img2},{img2}", "-o", out])
    other = torch.load(ckpt, weights_only=True)
    other["nnssl_adaptation_plan"]["method"] = "MDAE"
    torch.save(other, str(tmp_path / "mdae.pth"))
    with pytest.raises(UserInputError, match=r"not MASS"):
        main(["-ckpt", str(tmp_path / "mdae.pth"), "-r", ref_img, ref_seg, "-i", img2, "-o", out])
    assert not os.path.exists(out)
    # the console entry point turns it into one clear message and a non-zero exit
    exe = os.path.join(BIN, "nnssl_incontext_predict")
    if os.path.isfile(exe):
        r = run_cmd([exe, "-ckpt", str(tmp_path / "mdae.pth"), "-r", ref_img, ref_seg, "-i", img2, "-o", out])
        assert r.returncode != 0 and "not MASS" in r.stderr and "Traceback" not in r.stderr
