"""MAE train step time / dense Primus forward+backward on the same input (CPU, small config).

Prints, for Hi-End-MAE (75 % masking) and MAESIL (dual masking, 87.5 %): seconds per step of
`compute_loss + backward` and of a stock Primus (same encoder kwargs, its own PatchDecode head, MSE to the
input) forward+backward, and their ratio (goal <= 0.6 for Hi-End-MAE at 75 % masking).
Usage: OMP_NUM_THREADS=1 python bench/bench_mae.py [--size 64] [--reps 5]
"""
import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch

from dynamic_network_architectures.architectures.primus import Primus
from nnssl_plugins.pretrain import hiend_mae, maesil


def _time(fn, reps):
    fn()  # warm-up
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    t.sort()
    return t[len(t) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    arch = dict(embed_dim=192, patch_embed_size=[8, 8, 8], eva_depth=8, eva_numheads=8,
                input_shape=[a.size] * 3, drop_path_rate=0.0, scale_attn_inner=True, init_values=0.1)
    x = torch.randn(a.batch, 1, *[a.size] * 3)
    primus = Primus(input_channels=1, num_classes=1, **dict(arch, patch_embed_size=(8, 8, 8),
                                                           input_shape=tuple(arch["input_shape"])))

    def dense():
        primus.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(primus(x), x).backward()

    t_dense = _time(dense, a.reps)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {a.threads}; "
          f"input {a.batch}x1x{a.size}^3, encoder 192-d x 8 blocks, patch 8^3 ({(a.size // 8) ** 3} tokens)")
    print(f"dense Primus fwd+bwd: {t_dense * 1000:.1f} ms/step")
    cfgs = {
        "Hi-End-MAE (75%)": (hiend_mae, {"arch_kwargs": arch, "method": dict(
            mask_ratio=0.75, decoder_embed_dim=96, decoder_num_heads=4, decoder_self_depth=2,
            attend_layers=[6, 4, 2])}),
        "MAESIL (dual, 87.5%)": (maesil, {"arch_kwargs": arch, "method": dict(
            decoder_embed_dim=96, decoder_depth=4, decoder_num_heads=4)}),
    }
    for name, (mod, cfg) in cfgs.items():
        model = mod.build_model(cfg, 1)
        g = torch.Generator().manual_seed(0)

        def step():
            model.zero_grad(set_to_none=True)
            loss, _ = mod.compute_loss(model, x, g, return_pictures=False)
            loss.backward()

        t = _time(step, a.reps)
        print(f"{name}: {t * 1000:.1f} ms/step; ratio MAE step / dense Primus step = {t / t_dense:.2f}")


if __name__ == "__main__":
    main()
