"""nnssl_visualize: QC figures.

    nnssl_visualize masks -d ID -c CASE [--backend slic] [-p nnsslPlans_MASS] [-n 40] -o out.png
    nnssl_visualize features -ckpt checkpoint_final.pth -i IMAGE[,CH1,...] -o pca.png [-device cpu]

Subcommands are registered in ``SUBCOMMANDS`` (name -> function(subparsers) that adds its parser and
sets ``func``); adding ``features`` = one more ``_register_features`` function + one entry.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from nnssl_plugins.errors import UserInputError, run_cli


def render_masks(image: np.ndarray, store, out_png: str, max_masks: int = 40, title: str = "", seed: int = 0) -> int:
    """Overlay up to `max_masks` masks (distinct colours) on the three orthogonal centre slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = image
    shape = x.shape
    n = len(store)
    rng = np.random.default_rng(seed)
    # prefer masks that intersect the centre slices, largest first, up to max_masks
    centre = [s // 2 for s in shape]
    cand = []
    for i in range(n):
        bb = store.mask_meta(i)["bbox"]
        hits = sum(bb[2 * a] <= centre[a] < bb[2 * a + 1] for a in range(3))
        cand.append((hits, store.mask_meta(i)["voxels"], i))
    cand.sort(reverse=True)
    chosen = [i for _, _, i in cand[:max_masks]]
    cmap = plt.get_cmap("tab20")
    colours = [cmap(k % 20)[:3] for k in range(len(chosen))]
    if len(chosen) > 20:
        colours = [tuple(rng.uniform(0.2, 1.0, 3)) for _ in chosen]
    lo, hi = np.percentile(x, [1, 99])
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    for a in range(3):
        sl = np.take(x, centre[a], axis=a)
        base = np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb = np.repeat(base[..., None], 3, -1)
        for col, i in zip(colours, chosen):
            s, crop = store.crop(i)
            if not (s[a].start <= centre[a] < s[a].stop):
                continue
            m2 = np.take(crop, centre[a] - s[a].start, axis=a)
            full = np.zeros(sl.shape, bool)
            other = [s[j] for j in range(3) if j != a]
            full[other[0], other[1]] = m2
            rgb[full] = 0.55 * rgb[full] + 0.45 * np.asarray(col)
        axes[a].imshow(np.transpose(rgb, (1, 0, 2)), origin="lower", interpolation="nearest")
        axes[a].set_title(f"axis {a}, slice {centre[a]}")
        axes[a].axis("off")
    fig.suptitle(title or f"{len(chosen)} of {n} masks")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return len(chosen)


def _run_masks(args) -> int:
    from nnssl_plugins.pretrain.masks import MaskStore
    from nnssl_plugins.pretrain.masks.dataset import PreprocessedDataset

    ds = PreprocessedDataset(args.dataset, args.plans)
    if args.case not in ds.identifiers:
        raise UserInputError(f"-c {args.case}: no such case in {ds.folder} (have e.g. {ds.identifiers[:5]}).")
    st = MaskStore.open(ds.store_path(args.backend, args.case))
    img = ds.load_image(args.case)[0]
    if tuple(img.shape) != st.shape:
        raise UserInputError(f"{st.path}: store shape {st.shape} != image {img.shape}. Rerun nnssl_generate_masks --overwrite.")
    k = render_masks(img, st, args.output, args.num_masks,
                     title=f"{ds.dataset_name} {args.case} [{args.backend}]: {len(st)} masks")
    print(f"wrote {args.output} ({k} of {len(st)} masks drawn)")
    return 0


def _register_masks(sub) -> None:
    p = sub.add_parser("masks", help="mask overlays on three orthogonal slices")
    p.add_argument("-d", dest="dataset", required=True)
    p.add_argument("-c", dest="case", required=True)
    p.add_argument("--backend", default="slic")
    p.add_argument("-p", dest="plans", default="nnsslPlans_MASS")
    p.add_argument("-n", dest="num_masks", type=int, default=40, help="max masks drawn")
    p.add_argument("-o", dest="output", required=True, help="output .png")
    p.set_defaults(func=_run_masks)


def render_features(image: np.ndarray, rgb: np.ndarray, out_png: str, title: str = "") -> None:
    """Image (top) and PCA-RGB features (bottom) on the three orthogonal centre slices; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnssl_plugins.utils.io import atomic_path

    centre = [s // 2 for s in image.shape]
    lo, hi = np.percentile(image, [1, 99])
    fig, axes = plt.subplots(2, 3, figsize=(15, 10))
    for a in range(3):
        sl = np.clip((np.take(image, centre[a], axis=a) - lo) / max(hi - lo, 1e-6), 0, 1)
        axes[0, a].imshow(sl.T, cmap="gray", origin="lower", interpolation="nearest", vmin=0, vmax=1)
        axes[0, a].set_title(f"image, axis {a}, slice {centre[a]}")
        axes[1, a].imshow(np.transpose(np.take(rgb, centre[a], axis=a), (1, 0, 2)), origin="lower",
                          interpolation="nearest")
        axes[1, a].set_title(f"decoder features PCA (RGB), axis {a}")
        for ax in axes[:, a]:
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def _run_features(args) -> int:
    import os

    import torch

    from nnssl_plugins.cli.incontext_predict import load_mass_checkpoint, preprocess
    from nnssl_plugins.pretrain.mass import decoder_features, pca_rgb

    if not os.path.isfile(args.ckpt):
        raise UserInputError(f"-ckpt {args.ckpt}: file not found. Pass a MASS checkpoint (checkpoint_final.pth).")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError("-device cuda: no CUDA GPU visible. Use -device cpu.")
    files = args.image.split(",")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UserInputError(f"-i {missing[0]}: file not found.")
    model, pm, cm, plan = load_mass_checkpoint(args.ckpt, args.device)
    n_ch = plan.pretrain_num_input_channels
    if len(files) != n_ch:
        raise UserInputError(f"-i {args.image}: {len(files)} channel file(s) but the MASS checkpoint expects {n_ch}. "
                             f"Give all channels comma-separated, in the pretraining order.")
    if not args.output.lower().endswith(".png"):
        raise UserInputError(f"-o {args.output}: the figure is a PNG; use a .png file name.")
    data, _, _ = preprocess(files, None, pm, cm)  # exactly like pretraining / in-context prediction
    feats = decoder_features(model, data, device=args.device)  # plain U-Net path: what transfers downstream
    rgb = pca_rgb(feats)
    render_features(data[0], rgb, args.output,
                    title=f"{os.path.basename(files[0])}: {feats.shape[0]}-channel decoder features at "
                          f"{tuple(float(s) for s in cm.spacing)} mm, first 3 principal components")
    print(f"wrote {args.output} (features {tuple(feats.shape)}, preprocessed image {tuple(data.shape[1:])})")
    return 0


def _register_features(sub) -> None:
    p = sub.add_parser("features", help="PCA (RGB) of a MASS checkpoint's decoder features on three slices")
    p.add_argument("-ckpt", required=True, help="MASS pretraining checkpoint (checkpoint_final.pth)")
    p.add_argument("-i", dest="image", required=True, help="image file (channels comma-separated)")
    p.add_argument("-o", dest="output", required=True, help="output .png")
    p.add_argument("-device", default="cpu", help="cpu (default) or cuda")
    p.set_defaults(func=_run_features)


SUBCOMMANDS = {"masks": _register_masks, "features": _register_features}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnssl_visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for reg in SUBCOMMANDS.values():
        reg(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def main_cli() -> None:
    run_cli(lambda: main(sys.argv[1:]))


if __name__ == "__main__":
    main_cli()
