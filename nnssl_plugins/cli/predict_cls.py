"""nnssl_predict_cls: case-level predictions with a trained nnsslClsTrainer / nnsslClsTrainer_Frozen model.

    nnssl_predict_cls -i FOLDER -o predictions.csv -d 7 -tr nnsslClsTrainer_Frozen -p nnsslPlans_MASS -f 0

FOLDER holds images in nnU-Net naming (<case>_0000.nii.gz, one file per channel). They go through the
model's own nnU-Net preprocessing, are centre-cropped/padded to the patch and classified. The CSV has one
row per case: predicted class, its name and the probability of every class.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from nnssl_plugins.errors import UserInputError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnssl_predict_cls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", required=True, help="input folder with <case>_XXXX<file_ending> images")
    p.add_argument("-o", required=True, help="output CSV file")
    p.add_argument("-d", required=True, help="dataset name or id the model was trained on")
    p.add_argument("-tr", default="nnsslClsTrainer_Frozen", help="trainer name (default nnsslClsTrainer_Frozen)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-f", default="0", help="fold (default 0; 'all' allowed)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name (default checkpoint_final.pth)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device (default cuda)")
    return p


def _load_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: {what} not found. Check -d/-tr/-p/-c/-f point to a finished classification "
                             f"training.")
    with open(path) as f:
        return json.load(f)


def predict(args) -> str:
    import numpy as np
    import torch
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder

    from nnssl_plugins.pretrain.common.classification import (build_classifier, center_crop_or_pad,
                                                              write_probabilities_csv)
    from nnssl_plugins.trainers.classification import CLASSES_JSON

    if not nnUNet_results:
        raise UserInputError("nnUNet_results: environment variable not set. Export it (the folder with trained models).")
    try:
        dataset_name = maybe_convert_to_dataset_name(args.d if not str(args.d).isdigit() else int(args.d))
    except RuntimeError as e:
        raise UserInputError(f"-d {args.d}: {e}") from None
    model_folder = os.path.join(str(nnUNet_results), dataset_name, f"{args.tr}__{args.p}__{args.c}")
    fold = args.f if args.f == "all" else int(args.f)
    fold_folder = os.path.join(model_folder, f"fold_{fold}")
    plans = _load_json(os.path.join(model_folder, "plans.json"), "plans.json of the trained model")
    dataset_json = _load_json(os.path.join(model_folder, "dataset.json"), "dataset.json of the trained model")
    classes = _load_json(os.path.join(fold_folder, CLASSES_JSON), "class list of the trained model")
    class_names: List[str] = classes["class_names"]
    ckpt_path = os.path.join(fold_folder, args.chk)
    if not os.path.isfile(ckpt_path):
        raise UserInputError(f"{ckpt_path}: checkpoint not found. Finish the training or pass -chk checkpoint_best.pth.")
    # nnU-Net's own checkpoints carry numpy scalars in their logging entry: allow-list those data types, keep
    # weights_only loading (a tampered file cannot run code)
    from nnssl_plugins.utils.io import safe_torch_load

    ckpt = safe_torch_load(ckpt_path, map_location="cpu", allow_numpy=True)

    pm = PlansManager(plans)
    cm = pm.get_configuration(args.c)
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    device = torch.device(args.device if (args.device != "cuda" or torch.cuda.is_available()) else "cpu")
    net = build_classifier(pm, cm, n_in, len(class_names))
    net.load_state_dict(ckpt["network_weights"])
    net.to(device).eval()

    if not os.path.isdir(args.i):
        raise UserInputError(f"-i {args.i}: input folder not found.")
    fe = dataset_json["file_ending"]
    ids = [str(i) for i in get_identifiers_from_splitted_dataset_folder(args.i, fe)]
    if not ids:
        raise UserInputError(f"-i {args.i}: no images named <case>_0000{fe}. Use nnU-Net's naming (one file per "
                             f"channel, _0000 .. _{n_in - 1:04d}).")
    all_files = sorted(f for f in os.listdir(args.i) if f.endswith(fe))
    files = [create_paths_fn(args.i, all_files, fe, cid) for cid in ids]
    for cid, fl in zip(ids, files):
        if len(fl) != n_in:
            raise UserInputError(f"-i {args.i}: case '{cid}' has {len(fl)} channel file(s), the model needs {n_in}.")
    pre = cm.preprocessor_class(verbose=False)
    probs = []
    with torch.no_grad():
        for fl in files:
            data, _, _ = pre.run_case(fl, None, pm, cm, dataset_json)
            x = torch.from_numpy(center_crop_or_pad(np.asarray(data), cm.patch_size))[None].to(device)
            probs.append(torch.softmax(net(x).float(), 1)[0].cpu().numpy())
    write_probabilities_csv(args.o, ids, np.stack(probs), class_names)
    print(f"nnssl_predict_cls: wrote {len(ids)} predictions to {args.o}")
    return args.o


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        predict(args)
    except UserInputError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    return 0


def main_cli():
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
