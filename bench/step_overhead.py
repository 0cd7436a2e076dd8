"""MDAE train step ÷ stock nnU-Net train step on the same backbone and patch (goal ≤ 1.2×).

Stock step = ResidualEncoderUNet forward + nnU-Net's DC_and_CE_loss + backward + clip + SGD step (what
nnUNetTrainer.train_step does, without data loading). MDAE step = dual corruption + time-conditioned
forward + masked/visible loss + the same backward/optimizer. Both run interleaved in one process.
Usage: python bench/step_overhead.py [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnssl_plugins.pretrain.common.networks import resenc_architecture
from nnssl_plugins.pretrain.mdae.corruption import corrupt
from nnssl_plugins.pretrain.mdae.loss import mdae_loss
from nnssl_plugins.pretrain.mdae.model import MDAENetwork

CONFIGS = {
    "tiny (MDAE tiny preset, 32³, 8-16-32)": dict(features=[8, 16, 32], blocks=[1, 1, 1], patch=32, bs=2),
    "small (64³, 16-32-64-128, ResEnc-L blocks)": dict(features=[16, 32, 64, 128], blocks=[1, 3, 4, 6], patch=64, bs=2),
}


def build(cfg, out_ch):
    a = resenc_architecture(cfg["features"], cfg["blocks"])
    return get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], 1, out_ch,
                                  allow_init=True, deep_supervision=False)


def time_steps(step, reps):
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t) / reps


def bench(cfg, reps):
    torch.manual_seed(0)
    x = torch.randn(cfg["bs"], 1, *[cfg["patch"]] * 3)
    seg = torch.randint(0, 3, (cfg["bs"], 1, *[cfg["patch"]] * 3))
    stock = build(cfg, 3)
    loss_fn = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False}, {}, 1, 1,
                             dice_class=MemoryEfficientSoftDiceLoss)
    opt_s = torch.optim.SGD(stock.parameters(), 1e-2, momentum=0.99, nesterov=True)
    mdae = MDAENetwork(build(cfg, 1))
    opt_m = torch.optim.SGD(mdae.parameters(), 1e-2, momentum=0.99, nesterov=True)

    def stock_step():
        opt_s.zero_grad(set_to_none=True)
        l = loss_fn(stock(x), seg)
        l.backward()
        torch.nn.utils.clip_grad_norm_(stock.parameters(), 12)
        opt_s.step()

    def mdae_step():
        opt_m.zero_grad(set_to_none=True)
        c = corrupt(x, "ve")
        l, _ = mdae_loss(mdae(c.x_in, c.t), x, c)
        l.backward()
        torch.nn.utils.clip_grad_norm_(mdae.parameters(), 12)
        opt_m.step()

    ts, tm = [], []
    for _ in range(3):  # interleave to share machine noise
        ts.append(time_steps(stock_step, reps))
        tm.append(time_steps(mdae_step, reps))
    s, m = min(ts), min(tm)
    return s, m, m / s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None, help="also write results here")
    args = p.parse_args()
    res = {}
    for name, cfg in CONFIGS.items():
        s, m, r = bench(cfg, args.reps)
        res[name] = {"stock_ms": s * 1000, "mdae_ms": m * 1000, "ratio": r}
        print(f"{name}: stock {s * 1000:.0f} ms/step, MDAE {m * 1000:.0f} ms/step, ratio {r:.2f}× (goal ≤ 1.2×)")
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"device cpu")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
