"""nnssl_generate_masks: class-agnostic 3D masks for MASS pretraining, one store per case.

    nnssl_generate_masks -d 500 [-p nnsslPlans_MASS] --backend slic|sam2|labels
        [--sam2-checkpoint PATH --sam2-config NAME] [--shard i/N] [-np N] [-device cuda|cpu] [--overwrite]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from nnssl_plugins.cli.training import resolve_device
from nnssl_plugins.errors import UserInputError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnssl_generate_masks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", dest="dataset", required=True, help="dataset id or DatasetXXX_Name (preprocessed)")
    p.add_argument("-p", dest="plans", default="nnsslPlans_MASS", help="plans identifier (default nnsslPlans_MASS)")
    p.add_argument("--backend", default="slic", choices=["slic", "sam2", "labels"], help="default slic")
    p.add_argument("--sam2-checkpoint", default=None, help="SAM2 checkpoint file ({'model': state_dict}); required for sam2")
    p.add_argument("--sam2-config", default="configs/sam2.1/sam2.1_hiera_l.yaml",
                   help="config name inside the sam2 package, e.g. configs/sam2.1/sam2.1_hiera_l.yaml")
    p.add_argument("--shard", default=None, help="i/N: process the i-th of N parts of the sorted case list")
    p.add_argument("-np", dest="num_processes", type=int, default=1, help="worker processes (slic/labels)")
    p.add_argument("-device", default=None, choices=["cpu", "cuda"],
                   help="device for sam2 (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="regenerate existing stores")
    p.add_argument("--seed", type=int, default=0, help="seed for the random dedup choice")
    p.add_argument("--components", action="store_true", help="labels backend: also one mask per connected component")
    p.add_argument("--options", default=None,
                   help='JSON dict of extra backend options, e.g. \'{"scales_mm": [40, 20]}\' (slic) or '
                        '\'{"ct_windows": "chest_ct"}\' (sam2); docs/mass.md lists them')
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nnssl_plugins.pretrain.masks.generate import generate_dataset

    opts = {"seed": args.seed}
    if args.options:
        try:
            extra = json.loads(args.options)
        except json.JSONDecodeError as e:
            raise UserInputError(f"--options: not valid JSON ({e}).") from None
        if not isinstance(extra, dict):
            raise UserInputError(f"--options {args.options}: expected a JSON object, e.g. '{{\"crop_n_layers\": 1}}'.")
        opts.update(extra)
    if args.backend == "sam2":
        opts.update(checkpoint=args.sam2_checkpoint, config=args.sam2_config, device=resolve_device(args.device))
    if args.backend == "labels":
        opts["components"] = args.components
    if args.num_processes < 1:
        raise UserInputError(f"-np {args.num_processes}: must be >= 1.")
    s = generate_dataset(args.dataset, plans=args.plans, backend=args.backend, backend_options=opts,
                         shard=args.shard, num_processes=args.num_processes, overwrite=args.overwrite,
                         progress=not args.no_progress)
    run = s["this_run"]
    gen = [r for r in run if not r["skipped"]]
    print(f"\n{s['dataset']} / {s['plans']} / {s['backend']}: {len(run)} cases this run "
          f"({len(gen)} generated, {len(run) - len(gen)} skipped as finished)")
    if run:
        counts = [r["masks"] for r in run]
        print(f"  masks per case: mean {sum(counts) / len(counts):.1f}, min {min(counts)}, max {max(counts)}")
    if gen:
        print(f"  seconds per generated case: {sum(r['seconds'] for r in gen) / len(gen):.1f}")
    if s["cases_with_zero_masks"]:
        print(f"  cases with zero masks (valid, nothing to segment): {', '.join(s['cases_with_zero_masks'][:10])}")
    ds_dir = os.path.join(os.environ.get("nnUNet_preprocessed", ""), s["dataset"])
    print(f"  summary: {os.path.join(ds_dir, 'nnssl_masks', s['plans'], s['backend'], 'summary.json')}")
    return 0


def main_cli() -> None:
    run_cli(lambda: main(sys.argv[1:]))


if __name__ == "__main__":
    main_cli()
