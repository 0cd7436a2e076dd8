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
    from nnssl_plugins.planners import preprocessing as U

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


def build_parser() -> argparse.ArgumentParser:
    """Common options, then one argument group per registered method (its planner's `add_cli_arguments`)."""
    from nnssl_plugins.planners.registry import planners

    methods = planners()
    p = argparse.ArgumentParser(prog="nnssl_pretrain", description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("-d", required=True, help="dataset ID or name (raw images in nnUNet_raw)")
    p.add_argument("-m", required=True, help=f"method: {', '.join(sorted(methods))}")
    p.add_argument("--preset", default="default", help="'default' or 'tiny'")
    p.add_argument("-tr", default=None, help="trainer variant: full class name or suffix such as _smoke")
    p.add_argument("-f", default="all", help="fold (default 'all': pretraining uses every case)")
    p.add_argument("-pl", default=None, help="plans name (default nnsslPlans_<METHOD>[_<preset>])")
    p.add_argument("-device", default=None, help="cuda, cpu or mps (default: cuda if available, else cpu)")
    p.add_argument("-num_gpus", type=int, default=1)
    p.add_argument("-np", type=int, default=1, help="processes for planning/preprocessing")
    p.add_argument("--spacing", type=float, nargs=3, default=None, help="override the method's spacing (mm)")
    p.add_argument("--c", action="store_true", help="continue (also automatic when a checkpoint exists)")
    for name, planner in sorted(methods.items()):
        planner.add_cli_arguments(p.add_argument_group(f"{name} only"))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    from nnssl_plugins.cli.training import find_trainer, resolve_device, train_resumable
    from nnssl_plugins.planners.api import plan_and_preprocess
    from nnssl_plugins.planners.registry import get_planner
    from nnssl_plugins.planners.preprocessing import dataset_name_from_id, require_env
    from nnssl_plugins.trainers.pretrain_base import nnsslPretrainTrainer

    require_env()
    planner = get_planner(args.m)
    method = planner.method
    name = dataset_name_from_id(args.d)
    plans_name = args.pl or planner.default_plans_name(args.preset)
    # check every argument before planning writes anything
    device = resolve_device(args.device, args.num_gpus)
    trainer_name = _resolve_trainer(method, args.tr)
    trainer_cls = find_trainer(trainer_name, args.tr)
    if not issubclass(trainer_cls, nnsslPretrainTrainer):
        raise UserInputError(f"-tr {args.tr}: {trainer_name} is not a pretraining trainer (a subclass of "
                             f"nnsslPretrainTrainer). Use e.g. -tr _smoke or {method}PretrainTrainer.")

    if not _plans_ready(name, plans_name) or args.spacing:
        print(f"[1/3] Planning + preprocessing {name} for {method} ({plans_name})")
        plan_and_preprocess(name, method, args.preset, args.np, plans_name, spacing=args.spacing)
    else:
        print(f"[1/3] {plans_name} already preprocessed for {name}")

    print(f"[2/3] Method data preparation ({trainer_cls.__name__}.prepare_pretraining_data)")
    trainer_cls.prepare_pretraining_data(name, plans_name, dict(vars(args), device=device))

    train_resumable(name, trainer_name, plans_name, args.f, device, "[3/3]", num_gpus=args.num_gpus,
                    force_continue=args.c)
    return 0


def main_cli():
    run_cli(main)


if __name__ == "__main__":
    main_cli()
