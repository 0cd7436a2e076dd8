"""MASS model bench (CPU by default): train-step cost vs a plain ResidualEncoderUNet, cached vs recomputed
task embeddings for in-context inference, and parameter counts vs the paper.

    OMP_NUM_THREADS=1 python bench/bench_mass_model.py [--device cpu] [--configs tiny,mid] [--k 13]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from nnssl_plugins.pretrain.mass import build_backbone, build_mass_model, mass_arch_kwargs, mass_loss

PAPER = {"encoder": 37.66e6, "decoder": 46.0e6, "task_encoder": 36.35e6}
CONFIGS = {
    # name: (arch kwargs, patch, batch)
    "tiny": (dict(n_stages=4, base_features=8, max_features=64, n_blocks_per_stage=1), (32, 32, 32), 2),
    "mid": (dict(n_stages=5, base_features=16, max_features=256, n_blocks_per_stage=2), (64, 64, 64), 1),
}


def timeit(fn, reps, warmup=1, device="cpu"):
    for _ in range(warmup):
        fn()
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def bench_config(name, k, device, reps):
    kw, patch, b = CONFIGS[name]
    ak = mass_arch_kwargs(**kw)
    torch.manual_seed(0)
    mass = build_mass_model(ak, 1, patch_size=patch).to(device)
    plain = build_backbone(ak, 1, num_classes=k, deep_supervision=False).to(device)
    ref = torch.randn(b, 1, *patch, device=device)
    q = torch.randn(b, 1, *patch, device=device)
    masks = (torch.rand(b, k, *patch, device=device) > 0.8).float()
    opt_m = torch.optim.SGD(mass.parameters(), lr=1e-4)
    opt_p = torch.optim.SGD(plain.parameters(), lr=1e-4)

    def step_mass():
        loss, _ = mass_loss(mass(ref, masks, q), masks)
        opt_m.zero_grad(set_to_none=True)
        loss.backward()
        opt_m.step()

    def step_plain():  # stock-style step: same backbone, K outputs, same Dice+BCE loss
        loss, _ = mass_loss(plain(q), masks)
        opt_p.zero_grad(set_to_none=True)
        loss.backward()
        opt_p.step()

    t_p = timeit(step_plain, reps, device=device)
    t_m = timeit(step_mass, reps, device=device)
    print(f"[{name}] patch {patch} batch {b} K={k}: plain ResEncUNet step {t_p*1e3:.0f} ms, "
          f"MASS step {t_m*1e3:.0f} ms, ratio {t_m/t_p:.2f} (goal <= 2.5)")

    mass.eval()
    with torch.no_grad():
        emb = mass.encode_task(ref[:1], masks[:1])
        q1 = q[:1]
        t_cached = timeit(lambda: mass.segment(q1, emb), reps, device=device)
        t_recomp = timeit(lambda: mass.segment(q1, mass.encode_task(ref[:1], masks[:1])), reps, device=device)
        refs3, masks3 = ref[:1].repeat(3, 1, 1, 1, 1), masks[:1].repeat(3, 1, 1, 1, 1)
        t_recomp3 = timeit(lambda: mass.segment(q1, mass.encode_task(refs3, masks3).mean_over_batch()), reps,
                           device=device)
    print(f"[{name}] in-context inference per patch: cached {t_cached*1e3:.0f} ms, recomputed (1 ref) "
          f"{t_recomp*1e3:.0f} ms -> ratio {t_cached/t_recomp:.2f}; recomputed (3 refs) {t_recomp3*1e3:.0f} ms "
          f"-> ratio {t_cached/t_recomp3:.2f} (goal <= 0.5)")


def param_counts():
    m = build_mass_model(mass_arch_kwargs(), 1, patch_size=(128, 128, 128))
    c = m.parameter_counts()
    print("default MASS (5 stages 32-512, 2 blocks/stage, patch 128^3) parameter counts:")
    for k, v in c.items():
        print(f"  {k:28s} {v/1e6:7.2f} M")
    for ours, paper in [("encoder", "encoder"), ("decoder_total", "decoder"), ("task_encoder", "task_encoder")]:
        print(f"  {ours:16s} ours {c[ours]/1e6:6.2f} M vs paper {PAPER[paper]/1e6:6.2f} M "
              f"({c[ours]/PAPER[paper]:.2f}x)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default="tiny,mid")
    ap.add_argument("--k", type=int, default=13, help="masks per step (official MASS: 13)")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {a.device}, {time.strftime('%Y-%m-%d')}")
    param_counts()
    for name in a.configs.split(","):
        bench_config(name, a.k, a.device, a.reps)


if __name__ == "__main__":
    main()
