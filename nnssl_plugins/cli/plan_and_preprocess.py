"""nnssl_plan_and_preprocess -d ID [ID ...] -m METHOD [--preset tiny] [-np N]"""
from __future__ import annotations

import argparse

from nnssl_plugins.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    from nnssl_plugins.planners.registry import planners

    p = argparse.ArgumentParser(prog="nnssl_plan_and_preprocess",
                                description="Fingerprint + method plans + nnU-Net preprocessing for (un)labeled "
                                            "datasets. Writes nnsslPlans_<METHOD>[_<preset>].json and .b2nd data.")
    p.add_argument("-d", nargs="+", required=True, help="dataset ID(s) or DatasetXXX_Name")
    p.add_argument("-m", required=True, help=f"pretraining method: {', '.join(sorted(planners()))}")
    p.add_argument("--preset", default="default", help="'default' (paper setting) or 'tiny' (CPU smoke runs)")
    p.add_argument("-np", type=int, default=1, help="processes for fingerprint and preprocessing (default 1)")
    p.add_argument("-pl", default=None, help="plans name (default nnsslPlans_<METHOD>[_<preset>])")
    p.add_argument("--patch_size", type=int, nargs=3, default=None, help="override the method's patch size")
    p.add_argument("--spacing", type=float, nargs=3, default=None, help="override the method's target spacing (mm)")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--no_pp", action="store_true", help="only plan, do not preprocess")
    p.add_argument("--overwrite", action="store_true", help="recompute fingerprint and all preprocessed cases")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nnssl_plugins.planners.api import plan_and_preprocess

    for d in args.d:
        plans = plan_and_preprocess(d, args.m, args.preset, args.np, args.pl, args.patch_size, args.spacing,
                                    args.batch_size, overwrite=args.overwrite, preprocess=not args.no_pp)
        print(f"Done: {d} → plans {plans}")
    return 0


def main_cli():
    run_cli(main)


if __name__ == "__main__":
    main_cli()
