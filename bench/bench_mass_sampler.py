"""MASS sampler vs stock nnU-Net dataloader throughput (single process, same data, same patch size).

    OMP_NUM_THREADS=1 python bench/bench_mass_sampler.py [--patch 64] [--shape 128] [--n 20] [--masks 13] [--rounds 5]

Stock: nnUNetDataLoader + nnUNetTrainer.get_training_transforms (one crop, image + 1-channel seg).
MASS:  MASSDataLoader (two crops per sample, K mask channels from the mask store, weak/strong affine +
intensity aug). Goal: MASS ÷ stock ≥ 0.7 (batches/s).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main():
    import shutil

    tmp = tempfile.mkdtemp(prefix="bench_mass_")
    try:
        run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: str):
    p = argparse.ArgumentParser()
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--shape", type=int, default=128)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--masks", type=int, default=13)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds (median reported)")
    a = p.parse_args()
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(os.path.join(tmp, k))
        os.environ[k] = os.path.join(tmp, k)
    from conftest import make_synthetic_dataset

    make_synthetic_dataset(os.environ["nnUNet_raw"], 990, "Syn", n_cases=3, labeled=True,
                           shape=(a.shape,) * 3, spacing=(1.5, 1.5, 1.5))
    from nnssl_plugins.planners.api import plan_and_preprocess
    from nnssl_plugins.trainers.mass import MASSPretrainTrainer, mask_dir

    ds_name = "Dataset990_Syn"
    pn = plan_and_preprocess(ds_name, "MASS", "tiny", patch_size=[a.patch] * 3)
    MASSPretrainTrainer.prepare_pretraining_data(ds_name, pn, {"mask_backend": "slic"})
    folder = os.path.join(os.environ["nnUNet_preprocessed"], ds_name, pn + "_3d_fullres")

    import json

    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnssl_plugins.pretrain.common.data import nnsslDatasetBlosc2
    from nnssl_plugins.pretrain.mass.sampling import MASSDataLoader

    ps = (a.patch,) * 3
    plans = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], ds_name, pn + ".json")))
    dj = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], ds_name, "dataset.json")))
    lm = PlansManager(plans).get_label_manager(dj)
    rot = (-np.pi / 6, np.pi / 6)
    init = get_patch_size(ps, rot, rot, rot, (0.7, 1.43))
    tr = nnUNetTrainer.get_training_transforms(ps, rot, None, (0, 1, 2), False, [False],
                                               foreground_labels=lm.foreground_labels)
    ds = nnsslDatasetBlosc2(folder, None)
    stock = nnUNetDataLoader(ds, a.batch, init, ps, lm, oversample_foreground_percent=0.33, transforms=tr)
    stores = mask_dir(ds_name, pn, "slic")
    from nnssl_plugins.pretrain.masks import MaskStore, STORE_EXT

    nm = [len(MaskStore.open(os.path.join(stores, f))) for f in os.listdir(stores) if f.endswith(STORE_EXT)]
    mass = MASSDataLoader(ds, a.batch, ps, stores, num_masks=a.masks, augment=True)

    def rate(dl, n):
        t = time.perf_counter()
        for _ in range(n):
            next(dl)
        return n / (time.perf_counter() - t)

    # alternate short rounds of both loaders and take the median of each: robust to load from other processes
    next(stock), next(mass)
    rounds = max(1, a.rounds)
    per = max(1, a.n // rounds)
    rs, rm = [], []
    for _ in range(rounds):
        rs.append(rate(stock, per))
        rm.append(rate(mass, per))
    r_stock, r_mass = float(np.median(rs)), float(np.median(rm))
    print(f"image {a.shape}^3, patch {a.patch}^3, batch {a.batch}, K={a.masks}, masks/case {nm}")
    print(f"stock nnUNetDataLoader: {r_stock:.2f} batches/s")
    print(f"MASS sampler          : {r_mass:.2f} batches/s")
    print(f"ratio MASS/stock      : {r_mass / r_stock:.2f} (goal >= 0.7; median of {rounds} alternating rounds "
          f"of {per} batches)")


if __name__ == "__main__":
    main()
