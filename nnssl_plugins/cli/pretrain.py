"""nnssl_pretrain -d ID -m METHOD [--preset tiny] [-tr variant] [-f fold] [-device cpu] [--c]

One command: plan + preprocess when needed, method-specific data preparation (MASS: masks), then
nnU-Net's own training loop with our trainer. Rerunning resumes from the last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os

from nnssl_plugins.errors import UserInputError, run_cli


def _resolve_trainer(method: str, tr: str | None) -> str:
    base = f"{method}PretrainTrainer"
    if tr is None:
        return base
    return base + tr if tr.startswith("_") else tr


def _plans_ready(dataset_name: str, plans_name: str) -> bool:
    """Plans exist and every raw case has its preprocessed files (with the plans they were made for)."""
    from nnssl_plugins.planners import unlabeled as U

    pre = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name)
    pf = os.path.join(pre, plans_name + ".json")
    if not os.path.isfile(pf):
        return False
    with open(pf) as f:
        ident = json.load(f)["configurations"]["3d_fullres"]["data_identifier"]
    folder = os.path.join(pre, ident)
    if not os.path.isdir(folder) or not os.path.isfile(os.path.join(pre, f".nnssl_{ident}.json")):
        return False
    cases = U.list_cases(dataset_name, U.load_raw_dataset_json(dataset_name))
    return all(U.case_is_preprocessed(folder, c) for c in cases)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nnssl_pretrain", description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("-d", required=True, help="dataset ID or name (raw images in nnUNet_raw)")
    p.add_argument("-m", required=True, help="method: MDAE, MASS, HiEndMAE, MAESIL")
    p.add_argument("--preset", default="default", help="'default' or 'tiny'")
    p.add_argument("-tr", default=None, help="trainer variant: full class name or suffix such as _smoke")
    p.add_argument("-f", default="all", help="fold (default 'all': pretraining uses every case)")
    p.add_argument("-pl", default=None, help="plans name (default nnsslPlans_<METHOD>[_<preset>])")
    p.add_argument("-device", default=None, help="cuda, cpu or mps (default: cuda if available, else cpu)")
    p.add_argument("-num_gpus", type=int, default=1)
    p.add_argument("-np", type=int, default=1, help="processes for planning/preprocessing")
    p.add_argument("--spacing", type=float, nargs=3, default=None, help="override the method's spacing (mm)")
    p.add_argument("--c", action="store_true", help="continue (also automatic when a checkpoint exists)")
    p.add_argument("--mask-backend", default="slic", help="MASS only: slic (default), sam2 or labels")
    p.add_argument("--sam2-checkpoint", default=None)
    p.add_argument("--sam2-config", default=None)
    args, _ = p.parse_known_args(argv)

    import torch

    from nnssl_plugins.cli.trainer_path import ensure_trainer_discovery
    from nnssl_plugins.planners.api import plan_and_preprocess
    from nnssl_plugins.planners.registry import get_planner
    from nnssl_plugins.planners.unlabeled import dataset_name_from_id, require_env

    require_env()
    planner = get_planner(args.m)
    method = planner.method
    name = dataset_name_from_id(args.d)
    plans_name = args.pl or planner.default_plans_name(args.preset)
    # check every argument before planning writes anything
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("-device cuda: no CUDA GPU visible. Use -device cpu.")
    if args.num_gpus > 1 and device != "cuda":
        raise UserInputError(f"-num_gpus {args.num_gpus}: more than one GPU needs -device cuda (nnU-Net's DDP runs "
                             f"on GPUs only). Use -num_gpus 1 on {device}.")
    if args.num_gpus > 1 and torch.cuda.device_count() < args.num_gpus:
        raise UserInputError(f"-num_gpus {args.num_gpus}: only {torch.cuda.device_count()} CUDA GPU(s) visible. "
                             f"Lower -num_gpus or check CUDA_VISIBLE_DEVICES.")
    ensure_trainer_discovery()
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer_name = _resolve_trainer(method, args.tr)
    try:
        trainer_cls = recursive_find_trainer_class_by_name(trainer_name)
    except RuntimeError:
        raise UserInputError(f"-tr {args.tr}: no trainer class {trainer_name}. Use e.g. -tr _smoke "
                             f"or a full class name.") from None

    if not _plans_ready(name, plans_name) or args.spacing:
        print(f"[1/3] Planning + preprocessing {name} for {method} ({plans_name})")
        plan_and_preprocess(name, method, args.preset, args.np, plans_name, spacing=args.spacing)
    else:
        print(f"[1/3] {plans_name} already preprocessed for {name}")

    prepare = getattr(trainer_cls, "prepare_pretraining_data", None)
    if prepare is not None:
        print(f"[2/3] Preparing {method} training data")
        prepare(name, plans_name, vars(args))
    else:
        print("[2/3] No extra data preparation for this method")

    if device == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, os.cpu_count() or 1))  # as nnUNetv2_train does on CPU

    from nnunetv2.run.run_training import run_training

    out = os.path.join(os.environ["nnUNet_results"], name, f"{trainer_name}__{plans_name}__3d_fullres",
                       f"fold_{args.f}")
    if os.path.isfile(os.path.join(out, "checkpoint_final.pth")):
        print(f"[3/3] Already finished: {os.path.join(out, 'checkpoint_final.pth')}")
        return 0
    resume = args.c or os.path.isfile(os.path.join(out, "checkpoint_latest.pth"))
    print(f"[3/3] Training {trainer_name} on {name} (fold {args.f}, device {device}"
          f"{', resuming' if resume else ''}) → {out}")
    run_training(name, "3d_fullres", args.f, trainer_name, plans_name, num_gpus=args.num_gpus,
                 continue_training=resume, device=torch.device(device))
    print(f"Checkpoint: {os.path.join(out, 'checkpoint_final.pth')}")
    return 0


def main_cli():
    run_cli(main)


if __name__ == "__main__":
    main_cli()
