"""MAESIL wiring through stock nnU-Net entry points (tiny preset, CPU): plan → stock
`nnUNetv2_train -tr MAESILPretrainTrainer_smoke` → checkpoint (adaptation plan, downstream Primus keys) +
reconstruction picture → per-case S–I axis from the image direction → nnssl_eval_reconstruction JSON."""
from __future__ import annotations

import json
import os

import torch

from conftest import BIN, make_synthetic_dataset, run_cmd
from test_hiend_mae_trainer import ext_trainer_env


def _rotate_direction(path):
    """Re-write an image so its ITK x index axis runs along world S–I (→ preprocessed array axis 2)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    img.SetDirection((0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0))
    sitk.WriteImage(img, path)


def test_maesil_smoke_si_axis_and_eval(nnunet_env, tmp_path):
    from nnssl_plugins.planners.api import plan_and_preprocess

    ds = make_synthetic_dataset(nnunet_env["nnUNet_raw"], 996, "Maesil", n_cases=3, labeled=False)
    _rotate_direction(os.path.join(ds, "imagesTr", "case01_0000.nii.gz"))
    plans_name = plan_and_preprocess(996, "MAESIL", "tiny")
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset996_Maesil")
    plans = json.load(open(os.path.join(pre, plans_name + ".json")))
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [1.5, 1.5, 1.5] and cfg["patch_size"] == [32, 32, 32]
    assert cfg["architecture"]["network_class_name"].endswith(".Primus")
    assert plans["nnssl"]["settings"]["method"]["plane_mask_ratio"] == 0.75
    ip = plans["foreground_intensity_properties_per_channel"]["0"]
    assert (ip["percentile_00_5"], ip["percentile_99_5"], ip["mean"], ip["std"]) == (-1000.0, 1000.0, -1000.0, 2000.0)

    # per-case S–I axis from the pickled image direction
    from nnssl_plugins.trainers.maesil import MAESILPretrainTrainer
    from types import SimpleNamespace
    tr = SimpleNamespace(preprocessed_dataset_folder=os.path.join(pre, cfg["data_identifier"]),
                         plans_manager=SimpleNamespace(transpose_forward=[0, 1, 2]), print_to_log_file=print,
                         _si_axis_cache=None, _warned_no_direction=False)
    tr.si_axis_of_case = MAESILPretrainTrainer.si_axis_of_case.__get__(tr)
    assert [tr.si_axis_of_case(k) for k in ("case00", "case01", "case02")] == [0, 2, 0]

    env = ext_trainer_env(tmp_path)
    r = run_cmd([os.path.join(BIN, "nnUNetv2_train"), "996", "3d_fullres", "all", "-p", plans_name,
                 "-tr", "MAESILPretrainTrainer_smoke", "-device", "cpu"], env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = os.path.join(nnunet_env["nnUNet_results"], "Dataset996_Maesil",
                       f"MAESILPretrainTrainer_smoke__{plans_name}__3d_fullres", "fold_all")
    ckpt_path = os.path.join(out, "checkpoint_final.pth")
    ckpt = torch.load(ckpt_path, weights_only=True)
    plan = ckpt["nnssl_adaptation_plan"]
    assert plan["method"] == "MAESIL" and plan["key_to_encoder"] == "eva"
    assert plan["recommended_downstream_patchsize"] == [32, 32, 32]
    assert os.path.isfile(os.path.join(out, "reconstructions", "epoch_0001.png"))
    log = open([os.path.join(out, f) for f in os.listdir(out) if f.startswith("training_log")][0]).read()
    assert "val_metric" in log  # PSNR of validation reconstructions

    from dynamic_network_architectures.architectures.primus import Primus
    w = ckpt["network_weights"]
    down = Primus(input_channels=1, num_classes=2,
                  **plan["nnunet_plans"]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"])
    for k, v in down.state_dict().items():
        assert k in w and w[k].shape == v.shape, k

    from nnssl_plugins.cli.eval_reconstruction import main
    assert main(["-ckpt", ckpt_path, "-d", "996", "-n", "3", "-o", str(tmp_path / "ev"), "-device", "cpu"]) == 0
    res = json.load(open(tmp_path / "ev" / "reconstruction_metrics.json"))
    assert res["method"] == "MAESIL" and res["lpips"] is None
    by_case = {c["case"]: c for c in res["cases"]}
    assert by_case["case01"]["si_axis"] == 2 and by_case["case00"]["si_axis"] == 0
    assert all(c["data_range"] == 1.0 and 0 < c["psnr"] < 100 for c in res["cases"])
    assert abs(by_case["case00"]["mask_ratio"] - 0.875) < 1e-6  # 75 % per plane ∪ 50 % of S–I slices
