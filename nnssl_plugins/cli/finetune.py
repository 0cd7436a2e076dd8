"""nnssl_finetune -d TARGET -ckpt PATH [--task seg|cls] [-tr TRAINER] [-f FOLD] [-device cpu]

One command for downstream training from a pretraining checkpoint: transfer plans → nnU-Net preprocessing
(labels optional for classification) → nnU-Net's training loop with our finetune/classification trainer
loading the checkpoint. Rerunning resumes (checkpoint_latest) or reports the finished run.
"""
from __future__ import annotations

import argparse
import os

from nnssl_plugins.errors import UserInputError, run_cli

DEFAULT_TRAINERS = {("seg", "cnn"): "nnsslFinetuneTrainer", ("seg", "primus"): "nnsslPrimusFinetuneTrainer",
                    ("cls", "cnn"): "nnsslClsTrainer_Frozen", ("cls", "primus"): "nnsslClsTrainer_Frozen"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nnssl_finetune", description=__doc__.split("\n\n")[1])
    p.add_argument("-d", required=True, help="target dataset ID or name (in nnUNet_raw)")
    p.add_argument("-ckpt", required=True, help="pretraining checkpoint (checkpoint_final.pth)")
    p.add_argument("--task", choices=("seg", "cls"), default="seg",
                   help="seg: segmentation (labelsTr); cls: classification (classification_labels.json)")
    p.add_argument("-tr", default=None, help="trainer (default: nnsslFinetuneTrainer / nnsslPrimusFinetuneTrainer "
                                            "for seg, nnsslClsTrainer_Frozen for cls); a suffix like _smoke is "
                                            "appended to the default")
    p.add_argument("-f", default="0", help="fold (default 0; 'all' trains on every case)")
    p.add_argument("-pl", default=None, help="plans name for the target (default: the checkpoint's)")
    p.add_argument("-device", default=None, help="cuda, cpu or mps (default: cuda if available, else cpu)")
    p.add_argument("-np", type=int, default=1, help="processes for fingerprint/preprocessing")
    args = p.parse_args(argv)

    import torch

    from nnssl_plugins.cli.trainer_path import ensure_trainer_discovery
    from nnssl_plugins.planners import unlabeled as U
    from nnssl_plugins.planners.transfer import transfer_plans
    from nnssl_plugins.pretrain.common.adaptation import get_adaptation_plan
    from nnssl_plugins.utils.io import safe_torch_load

    U.require_env()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("-device cuda: no CUDA GPU visible. Use -device cpu.")
    plan = get_adaptation_plan(safe_torch_load(args.ckpt), args.ckpt)
    kind = "primus" if plan["architecture_plans"]["arch_class_name"].endswith("Primus") else "cnn"
    default = DEFAULT_TRAINERS[(args.task, kind)]
    trainer_name = default if args.tr is None else (default + args.tr if args.tr.startswith("_") else args.tr)
    ensure_trainer_discovery()
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        recursive_find_trainer_class_by_name(trainer_name)
    except RuntimeError:
        raise UserInputError(f"-tr {args.tr}: no trainer class {trainer_name}.") from None

    name = U.dataset_name_from_id(args.d)
    print(f"[1/3] Transferring plans from {args.ckpt} to {name}")
    # our trainers adapt the input channels themselves, so a different channel count is allowed here
    plans_name = transfer_plans(name, args.ckpt, args.pl, args.np, allow_channel_mismatch=True,
                                require_segmentation=args.task == "seg")
    print(f"[2/3] Preprocessing {name} with {plans_name}")
    dataset_json = U.load_raw_dataset_json(name)
    cases = U.list_cases(name, dataset_json)
    if not U.is_labeled(cases):
        for c in cases.values():
            c["label"] = None
    dj = U.write_preprocessed_dataset_json(name, dataset_json)
    U.preprocess(name, plans_name, cases, dj, "3d_fullres", args.np)

    from nnunetv2.run.run_training import run_training

    out = os.path.join(os.environ["nnUNet_results"], name, f"{trainer_name}__{plans_name}__3d_fullres",
                       f"fold_{args.f}")
    if os.path.isfile(os.path.join(out, "checkpoint_final.pth")):
        print(f"[3/3] Already finished: {out}")
        return 0
    resume = os.path.isfile(os.path.join(out, "checkpoint_latest.pth"))
    print(f"[3/3] Training {trainer_name} (fold {args.f}, device {device}"
          f"{', resuming' if resume else ', loading ' + args.ckpt}) → {out}")
    run_training(name, "3d_fullres", args.f, trainer_name, plans_name,
                 pretrained_weights=None if resume else args.ckpt, continue_training=resume,
                 device=torch.device(device))
    print(f"Done: {out}")
    return 0


def main_cli():
    run_cli(main)


if __name__ == "__main__":
    main_cli()
