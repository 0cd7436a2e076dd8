"""nnssl_transfer_plans -d TARGET_ID -ckpt PATH [-pl NAME]"""
from __future__ import annotations

import argparse

from nnssl_plugins.errors import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nnssl_transfer_plans",
                                description="Write plans for a labeled target dataset with the pretraining "
                                            "checkpoint's architecture, spacing and normalization.")
    p.add_argument("-d", required=True, help="target dataset ID or name (labeled, in nnUNet_raw)")
    p.add_argument("-ckpt", required=True, help="pretraining checkpoint (checkpoint_final.pth)")
    p.add_argument("-pl", default=None, help="plans name for the target (default: the checkpoint's plans name)")
    p.add_argument("-np", type=int, default=1, help="processes for the target fingerprint")
    p.add_argument("--allow-channel-mismatch", action="store_true",
                   help="target channel count differs (finetune with -tr nnsslFinetuneTrainer)")
    args = p.parse_args(argv)
    from nnssl_plugins.planners.transfer import transfer_plans

    transfer_plans(args.d, args.ckpt, args.pl, args.np, args.allow_channel_mismatch)
    return 0


def main_cli():
    run_cli(main)


if __name__ == "__main__":
    main_cli()
