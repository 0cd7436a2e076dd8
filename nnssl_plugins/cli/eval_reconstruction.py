"""nnssl_eval_reconstruction -ckpt PATH -d ID [-n CASES] [-o OUT] [--seed S] [-device cpu|cuda]

Reconstruction quality of an MAE-style pretraining checkpoint (Hi-End-MAE, MAESIL): rebuilds the model from
the checkpoint's adaptation plan, takes preprocessed held-out cases (the validation cases of the checkpoint's
fold in splits_final.json when there is one, else all cases), a centre crop of the patch size, applies the
method's own masking with a fixed seed (random 75 % tokens / MAESIL dual masking along the case's S–I axis),
and reports PSNR and 3D SSIM of the reconstruction (masked tokens predicted, visible tokens copied from the
input, as in the papers) plus PSNR over the masked voxels only. Writes `reconstruction_metrics.json` and one
picture per case. data_range = 1 when the plans map CT to [0, 1], else the crop's max − min.
LPIPS is not reported: it needs pretrained 2D network weights, which are not available offline.
"""
from __future__ import annotations

import argparse
import json
import os

from nnssl_plugins.errors import run_cli

MAE_METHODS = ("HiEndMAE", "MAESIL")
LPIPS_NOTE = ("LPIPS not computed: it needs pretrained 2D network weights (AlexNet/VGG), which are not available "
              "offline. PSNR/SSIM are over the whole crop (visible tokens copied from the input); psnr_masked only "
              "over masked voxels.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnssl_eval_reconstruction",
                                description="PSNR/SSIM of masked reconstructions of a Hi-End-MAE / MAESIL checkpoint "
                                            "on preprocessed cases (LPIPS: not available offline).")
    p.add_argument("-ckpt", required=True, help="pretraining checkpoint (checkpoint_final.pth)")
    p.add_argument("-d", required=True, help="dataset ID or DatasetXXX_Name, preprocessed with the checkpoint's plans")
    p.add_argument("-n", type=int, default=5, help="number of cases (default 5)")
    p.add_argument("-o", default=None, help="output folder (default: <ckpt folder>/reconstruction_eval)")
    p.add_argument("--seed", type=int, default=0, help="masking seed (case i uses seed + i)")
    p.add_argument("-device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    return p


def _check_method(plan, ckpt_path: str) -> str:
    from nnssl_plugins.errors import UserInputError

    method = plan.method
    arch = plan.backbone_class()
    if method not in MAE_METHODS or arch != "Primus":
        kind = "a CNN" if arch != "Primus" else "a non-MAE"
        raise UserInputError(
            f"{ckpt_path}: checkpoint of method {method} ({kind} backbone: {arch}). Reconstruction evaluation "
            f"applies to the masked-autoencoder methods {list(MAE_METHODS)} (Primus backbone) only.")
    return method


def _held_out_cases(pre_dir: str, folder: str, fold, n: int):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    keys = sorted(infer_dataset_class(folder).get_identifiers(folder))
    source = "all preprocessed cases"
    splits = os.path.join(pre_dir, "splits_final.json")
    if os.path.isfile(splits) and str(fold).isdigit():
        with open(splits) as f:
            s = json.load(f)
        if int(fold) < len(s):
            val = [k for k in s[int(fold)]["val"] if k in keys]
            if val:
                keys, source = val, f"validation cases of fold {fold} (splits_final.json)"
    return keys[:max(1, n)], source


def _center_crop(x, patch):
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    pads = [(0, 0)] + [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for s, p in zip(x.shape[1:], patch)]
    x = np.pad(x, pads, mode="constant", constant_values=0)
    sl = [slice(None)] + [slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(x.shape[1:], patch)]
    return x[tuple(sl)]


def evaluate(ckpt_path: str, dataset, n: int = 5, out_dir: str = None, seed: int = 0, device: str = None) -> dict:
    import numpy as np
    import torch

    from nnssl_plugins.errors import UserInputError
    from nnssl_plugins.planners import preprocessing as U
    from nnssl_plugins.pretrain.mae_common.config import method_config_from_plans
    from nnssl_plugins.pretrain.common.adaptation import get_adaptation_plan
    from nnssl_plugins.pretrain.mae_common.loss import unpatchify
    from nnssl_plugins.pretrain.mae_common.pictures import save_pictures_from_logs
    from nnssl_plugins.pretrain.maesil.masking import find_si_axis
    from nnssl_plugins.pretrain.mae_common.metrics import psnr, ssim3d
    from nnssl_plugins.utils.io import atomic_write_json, safe_torch_load

    if not os.path.isfile(ckpt_path):
        raise UserInputError(f"-ckpt {ckpt_path}: file not found.")
    ckpt = safe_torch_load(ckpt_path)
    plan = get_adaptation_plan(ckpt, ckpt_path)
    method = _check_method(plan, ckpt_path)
    plans, cfg_name = plan.nnunet_plans, plan.pretrain_configuration
    config = method_config_from_plans(plans, cfg_name)
    if method == "HiEndMAE":
        from nnssl_plugins.pretrain.hiend_mae import build_model, compute_loss
    else:
        from nnssl_plugins.pretrain.maesil import build_model, compute_loss
    n_in = plan.pretrain_num_input_channels
    model = build_model(config, n_in)
    weights = ckpt["network_weights"]
    if "up_projection.decode.0.0.weight" not in weights and hasattr(model, "up_projection"):
        del model.up_projection  # checkpoint written before the downstream decoder was carried
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserInputError(f"{ckpt_path}: weights do not match the {method} model of its plans "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()

    U.require_env(("nnUNet_raw", "nnUNet_preprocessed"))
    name = U.dataset_name_from_id(dataset)
    pre_dir = os.path.join(os.environ["nnUNet_preprocessed"], name)
    cfg = plans["configurations"][cfg_name]
    folder = os.path.join(pre_dir, cfg["data_identifier"])
    if not os.path.isdir(folder):
        raise UserInputError(
            f"-d {dataset}: {folder} missing. Preprocess {name} with the checkpoint's plans first, e.g. "
            f"nnssl_plan_and_preprocess -d {dataset} -m {method} (same preset) or copy the plans and run "
            f"nnUNetv2_preprocess -d {dataset} -plans_name {plans['plans_name']} -c {cfg_name}.")
    fold = (ckpt.get("init_args") or {}).get("fold")
    keys, source = _held_out_cases(pre_dir, folder, fold, n)
    patch = [int(i) for i in cfg["patch_size"]]
    window = (plans.get("nnssl") or {}).get("ct_window_to_unit_range")
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "reconstruction_eval")
    os.makedirs(out_dir, exist_ok=True)

    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    ds = infer_dataset_class(folder)(folder, keys)
    results = []
    for i, key in enumerate(keys):
        data, _, _, props = ds.load_case(key)
        x = torch.from_numpy(_center_crop(data[:], patch))[None].to(dev)
        g = torch.Generator().manual_seed(seed + i)
        kwargs = {}
        if method == "MAESIL":
            direction = (props.get("sitk_stuff") or {}).get("direction")
            kwargs["si_axis"] = (find_si_axis(direction, plans.get("transpose_forward", [0, 1, 2]))
                                 if direction is not None and len(direction) == 9 else None)
        with torch.no_grad():
            _, logs = compute_loss(model, x, generator=g, return_pictures=True, **kwargs)
        rec, ref = logs["reconstruction"].float(), x.float()
        data_range = 1.0 if window else (float(ref.max() - ref.min()) or 1.0)
        m = logs["mask"][:, :, None].float().expand(-1, -1, n_in * int(np.prod(model.patch_size)))
        vox_mask = unpatchify(m, model.patch_size, n_in, model.grid_size).bool()
        mse_m = float(((rec - ref)[vox_mask] ** 2).mean())
        r = {"case": key, "psnr": float(psnr(rec, ref, data_range)), "ssim": float(ssim3d(rec, ref, data_range)),
             "psnr_masked": float(10 * np.log10(data_range ** 2 / max(mse_m, 1e-12))),
             "mask_ratio": float(logs["mask"].float().mean()), "data_range": data_range}
        if "si_axis" in kwargs:
            r["si_axis"] = kwargs["si_axis"]
        pic = os.path.join(out_dir, f"{key}_reconstruction.png")
        save_pictures_from_logs(pic, ref.cpu(), {k: logs[k].float().cpu() for k in ("masked_image", "reconstruction")},
                                title=f"{method} {key}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}")
        r["picture"] = pic
        results.append(r)
        print(f"{key}: PSNR {r['psnr']:.2f} dB (masked {r['psnr_masked']:.2f}), SSIM {r['ssim']:.4f}")
    mean = {k: float(np.mean([r[k] for r in results])) for k in ("psnr", "ssim", "psnr_masked")}
    summary = {"checkpoint": os.path.abspath(ckpt_path), "method": method, "dataset": name, "cases_from": source,
               "patch_size": patch, "seed": seed, "cases": results, "mean": mean, "lpips": None, "notes": LPIPS_NOTE}
    atomic_write_json(summary, os.path.join(out_dir, "reconstruction_metrics.json"), indent=2)
    print(f"mean PSNR {mean['psnr']:.2f} dB, SSIM {mean['ssim']:.4f} over {len(results)} case(s) → "
          f"{os.path.join(out_dir, 'reconstruction_metrics.json')}\n{LPIPS_NOTE}")
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    evaluate(args.ckpt, args.d, args.n, args.o, args.seed, args.device)
    return 0


def main_cli():
    run_cli(main)


if __name__ == "__main__":
    main_cli()
