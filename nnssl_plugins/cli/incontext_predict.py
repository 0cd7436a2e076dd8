"""nnssl_incontext_predict: segment new images with a MASS checkpoint from k labelled references (no finetuning).

    nnssl_incontext_predict -ckpt checkpoint_final.pth -r ref.nii.gz ref_seg.nii.gz [-r ...] \
        -i image.nii.gz|folder -o out.nii.gz|folder [--labels 1 5] [-device cpu] \
        [--save-embedding emb.safetensors] [--embedding emb.safetensors]

Pipeline: every image is preprocessed exactly like pretraining (nnU-Net's DefaultPreprocessor.run_case with the
checkpoint's plans; MR/PET channels additionally get the per-case percentile clip, see planners/mass.py); one
binary task per label; each reference encodes each label on a patch-sized crop centred on that label (objects
larger than the patch are seen partially); embeddings of the k references are averaged per stage; sliding
window (patch size, 50 % overlap, Gaussian), sigmoid; probabilities are resampled back to the input geometry
(nnU-Net's export logic: resample → uncrop → transpose_backward) and each voxel gets the label with the
highest probability among those > 0.5 (else 0). Multi-channel images: give the channel files comma-separated
(`-r a_0000.nii.gz,a_0001.nii.gz seg.nii.gz`); an input folder is grouped by nnU-Net's `_XXXX` channel suffix.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from nnssl_plugins.cli.training import resolve_device
from nnssl_plugins.errors import UserInputError, run_cli


# ----------------------------------------------------------------------------------------------------------
# model / plans
# ----------------------------------------------------------------------------------------------------------
def load_mass_checkpoint(path: str, device="cpu"):
    """-> (model, plans_manager, configuration_manager, adaptation_plan)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnssl_plugins.pretrain.common.adaptation import ADAPTATION_PLAN_KEY, get_adaptation_plan
    from nnssl_plugins.pretrain.mass import build_mass_model
    from nnssl_plugins.utils.io import safe_torch_load

    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or not ckpt.get(ADAPTATION_PLAN_KEY):
        raise UserInputError(f"-ckpt {path}: no nnssl adaptation plan; not an nnssl pretraining checkpoint. "
                             f"Pass a checkpoint written by MASSPretrainTrainer.")
    plan = get_adaptation_plan(ckpt, f"-ckpt {path}")
    if plan.method != "MASS":
        raise UserInputError(f"-ckpt {path}: checkpoint of method {plan.method!r}, not MASS. In-context "
                             f"prediction needs a MASS checkpoint (trained with MASSPretrainTrainer).")
    pm = PlansManager(plan.nnunet_plans)
    cm = pm.get_configuration(plan.pretrain_configuration)
    ps = (plan.extras.get("mass") or {}).get("patch_size") or plan.recommended_downstream_patchsize
    model = build_mass_model(cm.network_arch_init_kwargs, plan.pretrain_num_input_channels, patch_size=ps)
    try:
        model.load_state_dict(ckpt["network_weights"])
    except RuntimeError as e:
        raise UserInputError(f"-ckpt {path}: weights do not fit the MASS model of its own plan ({str(e)[:300]}).") \
            from None
    return model.to(device).eval(), pm, cm, plan


def _dataset_json(pm, n_ch: int, labels: Sequence[int] = ()) -> dict:
    lab = {"background": 0}
    lab.update({f"label_{int(v)}": int(v) for v in labels if int(v) > 0})
    return {"channel_names": {str(i): str(i) for i in range(n_ch)}, "labels": lab,
            "file_ending": ".nii.gz"}


def _check_files(files: Sequence[str], what: str, n_ch: int) -> List[str]:
    for f in files:
        if not os.path.isfile(f):
            raise UserInputError(f"{what} {f}: file not found.")
    if len(files) != n_ch:
        raise UserInputError(f"{what} {','.join(files)}: {len(files)} channel file(s) but the MASS checkpoint expects "
                             f"{n_ch} channel(s). Give all channels comma-separated, in the pretraining order.")
    return list(files)


def preprocess(files: Sequence[str], seg_file: Optional[str], pm, cm, labels: Sequence[int] = ()):
    """nnU-Net's DefaultPreprocessor.run_case + MASS' per-case percentile clip -> (data, seg, properties)."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    from nnssl_plugins.pretrain.mass.sampling import percentile_clip_zscore, percentile_stats

    data, seg, props = DefaultPreprocessor(verbose=False).run_case(list(files), seg_file, pm, cm,
                                                                  _dataset_json(pm, len(files), labels))
    nnssl = pm.plans.get("nnssl") or {}
    chans = nnssl.get("percentile_clip_channels") or []
    if chans:
        percentile_clip_zscore(data, percentile_stats(data, chans, tuple(nnssl.get("percentile_clip", (2, 98)))))
    return data.astype(np.float32), seg, props


def _crop_around(arr: np.ndarray, center, size) -> np.ndarray:
    from nnssl_plugins.pretrain.mass.sampling import extract_window

    win = [(int(c) - s // 2, int(c) - s // 2 + s) for c, s in zip(center, size)]
    return extract_window(arr, win)


@torch.no_grad()  # not inference_mode: the task encoder's masked mean uses autograd internally
def reference_embedding(model, data: np.ndarray, seg: np.ndarray, labels: Sequence[int], patch_size, device):
    """One TaskEmbedding (B=1, K=len(labels)); each label encoded on a patch crop centred on it."""
    from nnssl_plugins.pretrain.mass import TaskEmbedding

    per_label = []
    for lab in labels:
        m = seg[0] == lab
        idx = np.argwhere(m)
        center = (idx.min(0) + idx.max(0) + 1) // 2
        img = torch.from_numpy(_crop_around(data, center, patch_size))[None].to(device)
        msk = torch.from_numpy(_crop_around(m[None].astype(np.float32), center, patch_size))[None].to(device)
        per_label.append(model.encode_task(img, msk))
    tokens = [torch.cat([e.tokens[s] for e in per_label], 1) for s in range(len(per_label[0].tokens))]
    return TaskEmbedding(tokens, list(per_label[0].strides), 1)


def probabilities_to_label_map(probs: np.ndarray, labels: Sequence[int], threshold: float = 0.5) -> np.ndarray:
    """[K, ...] probabilities -> label map: label of the highest probability among those > threshold."""
    best = probs.argmax(0)
    out = np.asarray(labels, dtype=np.uint16)[best]
    out[probs.max(0) <= threshold] = 0
    return out


def export_label_map(probs: torch.Tensor, labels, props: dict, pm, cm, out_file: str) -> None:
    """Revert nnU-Net preprocessing like export_prediction (resample probabilities, uncrop, transpose back)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice

    spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
    shape = props["shape_after_cropping_and_before_resampling"]
    cur = cm.spacing if len(cm.spacing) == len(shape) else [spacing_t[0], *cm.spacing]
    p = cm.resampling_fn_probabilities(probs.float(), shape, cur, spacing_t)
    p = p.numpy() if torch.is_tensor(p) else np.asarray(p)
    seg = probabilities_to_label_map(p, labels)
    full = np.zeros(props["shape_before_cropping"], dtype=np.uint16)
    full[bounding_box_to_slice(props["bbox_used_for_cropping"])] = seg
    full = full.transpose(pm.transpose_backward)
    # atomic: write next to the target with the same extension (the writer picks the format from it), rename
    ending = ".nii.gz" if out_file.endswith(".nii.gz") else os.path.splitext(out_file)[1]
    tmp = os.path.join(os.path.dirname(os.path.abspath(out_file)), f".tmp_{os.getpid()}_{os.path.basename(out_file)}")
    tmp = tmp[: -len(ending)] + ending if not tmp.endswith(ending) else tmp
    try:
        pm.image_reader_writer_class().write_seg(full, tmp, props)
        os.replace(tmp, out_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------
def _input_cases(inp: str, n_ch: int) -> List[tuple]:
    """-> [(case_id, [channel files])]."""
    import re

    if os.path.isfile(inp):
        files = inp.split(",") if "," in inp else [inp]
        return [(_stem(files[0]), _check_files(files, "-i", n_ch))]
    if "," in inp:
        files = inp.split(",")
        return [(_stem(files[0]), _check_files(files, "-i", n_ch))]
    if not os.path.isdir(inp):
        raise UserInputError(f"-i {inp}: no such file or folder.")
    files = sorted(f for f in os.listdir(inp) if f.endswith((".nii.gz", ".nii", ".mha", ".nrrd")))
    if not files:
        raise UserInputError(f"-i {inp}: folder holds no images (.nii.gz, .nii, .mha, .nrrd).")
    groups = {}
    pat = re.compile(r"^(.*)_(\d{4})(\.nii\.gz|\.nii|\.mha|\.nrrd)$")
    if all(pat.match(f) for f in files):
        for f in files:
            mm = pat.match(f)
            groups.setdefault(mm.group(1), []).append(os.path.join(inp, f))
    else:
        groups = {_stem(f): [os.path.join(inp, f)] for f in files}
    return [(k, _check_files(v, f"-i {inp} case", n_ch)) for k, v in sorted(groups.items())]


def _stem(f: str) -> str:
    b = os.path.basename(f)
    for e in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if b.endswith(e):
            return b[: -len(e)]
    return os.path.splitext(b)[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnssl_incontext_predict", description=__doc__.split("\n\n")[0])
    p.add_argument("-ckpt", required=True, help="MASS pretraining checkpoint (checkpoint_final.pth)")
    p.add_argument("-r", nargs=2, action="append", metavar=("REF_IMAGE", "REF_LABELS"), default=[],
                   help="reference image (channels comma-separated) and its label map; repeat for k references")
    p.add_argument("-i", required=True, help="input image file (channels comma-separated) or folder")
    p.add_argument("-o", required=True, help="output file (single input) or folder")
    p.add_argument("--labels", nargs="+", type=int, default=None,
                   help="labels to segment (default: all labels > 0 of the first reference)")
    p.add_argument("-device", default=None, help="cuda, cpu or mps (default: cuda if available, else cpu)")
    p.add_argument("--save-embedding", default=None, help="write the averaged task embedding (safetensors)")
    p.add_argument("--embedding", default=None, help="use a saved task embedding instead of references")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nnssl_plugins.pretrain.mass import TaskEmbedding, average_embeddings, predict_volume

    device = torch.device(resolve_device(args.device))
    if not os.path.isfile(args.ckpt):
        raise UserInputError(f"-ckpt {args.ckpt}: file not found.")
    model, pm, cm, plan = load_mass_checkpoint(args.ckpt, device)
    n_ch = plan.pretrain_num_input_channels
    ps = tuple(int(i) for i in model.patch_size)
    if not args.r and not args.embedding:
        raise UserInputError("give at least one reference (-r IMAGE LABELS) or a saved --embedding.")
    cases = _input_cases(args.i, n_ch)  # validate inputs before the (slow) reference encoding

    if args.embedding:
        emb = TaskEmbedding.load(args.embedding)
        labels = args.labels or list(range(1, emb.num_classes + 1))
        if len(labels) != emb.num_classes:
            raise UserInputError(f"--labels {labels}: the embedding {args.embedding} holds {emb.num_classes} task(s); "
                                 f"give exactly that many labels (in the order they were encoded).")
    else:
        rw = pm.image_reader_writer_class()
        labels = None if args.labels is None else [int(v) for v in args.labels]
        embs = []
        for img_arg, seg_file in args.r:
            files = _check_files(img_arg.split(","), "-r", n_ch)
            if not os.path.isfile(seg_file):
                raise UserInputError(f"-r {seg_file}: label file not found.")
            raw_seg, _ = rw.read_seg(seg_file)
            present = set(int(v) for v in np.unique(raw_seg)) - {0}
            if labels is None:
                labels = sorted(present)
                if not labels:
                    raise UserInputError(f"-r {seg_file}: label map is empty (no label > 0).")
            missing = [v for v in labels if v not in present]
            if missing:
                raise UserInputError(f"-r {seg_file}: label(s) {missing} absent from this reference (it has "
                                     f"{sorted(present)}). Pick references that contain every --labels value.")
            data, seg, _ = preprocess(files, seg_file, pm, cm, labels)
            lost = [v for v in labels if not (seg[0] == v).any()]
            if lost:
                raise UserInputError(f"-r {seg_file}: label(s) {lost} vanish after resampling to the pretraining "
                                     f"spacing {cm.spacing} (structure too small). Use another reference.")
            embs.append(reference_embedding(model, data, seg, labels, ps, device))
        emb = average_embeddings(embs)
    if args.save_embedding:
        emb.save(args.save_embedding)
        print(f"Task embedding ({emb.num_references} reference(s), labels {labels}) → {args.save_embedding}")

    single = len(cases) == 1 and (os.path.isfile(args.i.split(",")[0]))
    if not single:
        os.makedirs(args.o, exist_ok=True)
    for case, files in cases:
        out = args.o if single else os.path.join(args.o, case + ".nii.gz")
        if os.path.dirname(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
        data, _, props = preprocess(files, None, pm, cm)
        probs = predict_volume(model, data, emb, ps, overlap=args.overlap, device=device)
        export_label_map(probs, labels, props, pm, cm, out)
        print(f"{case}: labels {labels} → {out}")
    return 0


def main_cli():
    run_cli(main)


if __name__ == "__main__":
    main_cli()
