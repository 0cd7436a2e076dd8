"""nnssl_finetune -d TARGET -ckpt PATH [--task seg|cls] [-tr TRAINER] [-f FOLD] [-device cpu]

One command for downstream training from a pretraining checkpoint: transfer plans → nnU-Net preprocessing
(labels optional for classification) → nnU-Net's training loop with our finetune/classification trainer
loading the checkpoint. Rerunning resumes (checkpoint_latest) or reports the finished run.
"""
from __future__ import annotations

import argparse

from nnssl_plugins.errors import run_cli

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

    from nnssl_plugins.cli.training import find_trainer, resolve_device, train_resumable
    from nnssl_plugins.planners import preprocessing as U
    from nnssl_plugins.planners.transfer import transfer_plans
    from nnssl_plugins.pretrain.common.adaptation import get_adaptation_plan
    from nnssl_plugins.utils.io import safe_torch_load

    U.require_env()
    device = resolve_device(args.device)
    plan = get_adaptation_plan(safe_torch_load(args.ckpt), args.ckpt)
    kind = "primus" if plan.backbone_class() == "Primus" else "cnn"
    default = DEFAULT_TRAINERS[(args.task, kind)]
    trainer_name = default if args.tr is None else (default + args.tr if args.tr.startswith("_") else args.tr)
    find_trainer(trainer_name, args.tr)

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

    out = train_resumable(name, trainer_name, plans_name, args.f, device, "[3/3]", pretrained_weights=args.ckpt)
    print(f"Done: {out}")
    return 0


def main_cli():
    run_cli(main)


if __name__ == "__main__":
    main_cli()
