"""Planning/preprocessing machinery shared by every method: works with or without labels.

Stock nnU-Net assumes `labelsTr/`. Here a case's label is optional: when every case has one the
dataset is *labeled* and its segmentations are preprocessed exactly as nnU-Net does (MASS's labels
backend and the alignment tests rely on that); otherwise images are preprocessed alone and the
`_seg.b2nd` holds nnU-Net's nonzero mask (-1 outside the body crop, 0 inside), which is what
`DefaultPreprocessor.run_case(seg_file=None)` produces anyway. Everything else — reader/writer,
cropping, normalization, resampling, blosc2 storage — is nnU-Net's own code.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from typing import Dict

import numpy as np
from tqdm import tqdm

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.utils.io import atomic_path, atomic_write_json

ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
HIST_BINS = 4096


def require_env(names=ENV_VARS) -> Dict[str, str]:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise UserInputError(
            f"environment variable(s) {', '.join(missing)} not set. nnU-Net needs them: e.g. "
            + " ".join(f"export {n}=/data/{n}" for n in missing)
            + " (see nnU-Net's documentation/setting_up_paths.md)."
        )
    return {n: os.environ[n] for n in names}


def dataset_name_from_id(dataset: str | int) -> str:
    """'500' / 500 / 'Dataset500_X' → 'Dataset500_X' (searched in raw and preprocessed folders)."""
    require_env(("nnUNet_raw", "nnUNet_preprocessed"))
    s = str(dataset)
    if s.startswith("Dataset"):
        candidates = [s]
        ident = s[7:10]
    else:
        try:
            ident = f"{int(s):03d}"
        except ValueError:
            raise UserInputError(f"-d {dataset}: not a dataset ID or DatasetXXX_Name.") from None
        candidates = []
    for root in (os.environ["nnUNet_raw"], os.environ["nnUNet_preprocessed"]):
        if os.path.isdir(root):
            for d in sorted(os.listdir(root)):
                if d.startswith(f"Dataset{ident}_") and (not candidates or d in candidates):
                    return d
    raise UserInputError(
        f"-d {dataset}: no folder Dataset{ident}_* in nnUNet_raw ({os.environ['nnUNet_raw']}) or "
        f"nnUNet_preprocessed ({os.environ['nnUNet_preprocessed']}). Check the ID or create the raw dataset "
        f"(imagesTr/<case>_0000<ending> + dataset.json)."
    )


def load_raw_dataset_json(dataset_name: str) -> dict:
    folder = os.path.join(os.environ["nnUNet_raw"], dataset_name)
    fn = os.path.join(folder, "dataset.json")
    if not os.path.isfile(fn):
        raise UserInputError(f"{fn}: missing. Write a dataset.json with channel_names, file_ending, numTraining.")
    try:
        with open(fn) as f:
            dj = json.load(f)
    except json.JSONDecodeError as e:
        raise UserInputError(f"{fn}: invalid JSON ({e}). Fix the file.") from None
    for key in ("channel_names", "file_ending"):
        if key not in dj and not (key == "channel_names" and "modality" in dj):
            raise UserInputError(f"{fn}: missing '{key}'. Add it (e.g. \"channel_names\": {{\"0\": \"CT\"}}, "
                                 f"\"file_ending\": \".nii.gz\").")
    return dj


def channel_names(dataset_json: dict) -> dict:
    return dataset_json.get("channel_names", dataset_json.get("modality"))


def list_cases(dataset_name: str, dataset_json: dict) -> Dict[str, dict]:
    """case id → {'images': [per-channel files], 'label': file or None}."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    raw = os.path.join(os.environ["nnUNet_raw"], dataset_name)
    if "dataset" not in dataset_json and not os.path.isdir(os.path.join(raw, "imagesTr")):
        raise UserInputError(f"{raw}/imagesTr: folder missing. Put images there as <case>_0000{dataset_json['file_ending']}.")
    cases = get_filenames_of_train_images_and_targets(raw, dataset_json)
    if len(cases) == 0:
        raise UserInputError(
            f"{raw}/imagesTr: no images ending in {dataset_json['file_ending']} named <case>_XXXX"
            f"{dataset_json['file_ending']}. Add images or fix 'file_ending' in dataset.json.")
    n_ch = len(channel_names(dataset_json))
    out = {}
    for k, v in cases.items():
        if len(v["images"]) != n_ch:
            raise UserInputError(
                f"{raw}/imagesTr: case {k} has {len(v['images'])} channel file(s) but dataset.json declares "
                f"{n_ch} channel(s). Provide {k}_0000..{k}_{n_ch - 1:04d}{dataset_json['file_ending']} or fix channel_names.")
        label = v.get("label")
        out[k] = {"images": list(v["images"]), "label": label if label and os.path.isfile(label) else None}
    return out


def is_labeled(cases: Dict[str, dict]) -> bool:
    return all(c["label"] is not None for c in cases.values())


def _analyze_case(args):
    """Fingerprint of one case; labels are optional (foreground = nonzero region when unlabeled)."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    case, image_files, label_file, rw_class, num_samples = args
    rw = rw_class()
    try:
        images, props = rw.read_images(image_files)
    except Exception as e:  # corrupt/unreadable file: say which one
        raise UserInputError(f"{image_files[0]}: cannot be read as an image ({type(e).__name__}: {str(e)[:150]}). "
                             f"Replace or remove the file.") from None
    spatial = images.shape[1:]
    if len(spatial) != 3 or sum(int(s) > 1 for s in spatial) < 3:
        raise UserInputError(f"{image_files[0]}: image has shape {tuple(spatial)} — pretraining needs 3D volumes "
                             f"(three spatial axes > 1). Remove 2D images from imagesTr.")
    if not np.all(np.isfinite(images)):
        raise UserInputError(f"{image_files[0]}: contains NaN/inf voxels. Fix or remove the image "
                             f"(e.g. replace NaN with the background value).")
    for c, f in enumerate(image_files):
        lo, hi = float(images[c].min()), float(images[c].max())
        if lo == hi:
            raise UserInputError(f"{f}: image is constant (every voxel = {lo:g}); it holds nothing to learn from "
                                 f"and breaks intensity normalization. Fix or remove this case from imagesTr.")
    seg = None
    if label_file is not None:
        seg, _ = rw.read_seg(label_file)
        if seg.shape[1:] != images.shape[1:]:
            raise UserInputError(f"{label_file}: label shape {seg.shape[1:]} != image shape {images.shape[1:]}. "
                                 f"Fix the label map.")
    data_c, seg_c, _ = crop_to_nonzero(images, seg)
    fg = seg_c[0] > 0 if label_file is not None else seg_c[0] == 0
    if not fg.any():
        fg = np.ones(seg_c.shape[1:], dtype=bool)
    rs = np.random.RandomState(1234)
    samples = []
    for c in range(len(data_c)):
        px = data_c[c][fg]
        samples.append(rs.choice(px, num_samples, replace=True) if len(px) else np.zeros(0, np.float32))
    rel = float(np.prod(data_c.shape[1:]) / np.prod(images.shape[1:]))
    return case, tuple(int(i) for i in data_c.shape[1:]), [float(i) for i in props["spacing"]], samples, rel


def _cases_digest(cases: Dict[str, dict]) -> str:
    h = hashlib.sha1()
    for k in sorted(cases):
        for f in cases[k]["images"] + ([cases[k]["label"]] if cases[k]["label"] else []):
            st = os.stat(f)
            h.update(f"{k}|{f}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()


def _pool_map(fn, items, num_processes: int, desc: str):
    results = []
    if num_processes <= 1 or len(items) <= 1:
        for it in tqdm(items, desc=desc):
            results.append(fn(it))
        return results
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(items))) as p:
        for r in tqdm(p.imap(fn, items), total=len(items), desc=desc):
            results.append(r)
    return results


def extract_fingerprint(dataset_name: str, cases: Dict[str, dict], dataset_json: dict,
                        num_processes: int = 1, overwrite: bool = False) -> dict:
    """nnU-Net's dataset fingerprint (same keys), plus per-channel foreground intensity histograms
    (`nnssl_intensity_histograms`) so planners can derive statistics of clipped intensities."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    out_dir = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name)
    fn = os.path.join(out_dir, "dataset_fingerprint.json")
    digest = _cases_digest(cases)
    if os.path.isfile(fn) and not overwrite:
        with open(fn) as f:
            fp = json.load(f)
        if fp.get("nnssl_cases_digest") == digest:
            return fp
    first = cases[sorted(cases)[0]]["images"][0]
    rw_class = determine_reader_writer_from_dataset_json(dataset_json, first)
    n_samples = int(10e7 // len(cases))
    n_samples = min(n_samples, 200_000)
    items = [(k, cases[k]["images"], cases[k]["label"], rw_class, n_samples) for k in sorted(cases)]
    results = _pool_map(_analyze_case, items, num_processes, "Extracting dataset fingerprint")
    n_ch = len(channel_names(dataset_json))
    stats, hists = {}, {}
    for c in range(n_ch):
        px = np.concatenate([r[3][c] for r in results]).astype(np.float64)
        lo, med, hi = np.percentile(px, (0.5, 50.0, 99.5))
        stats[str(c)] = {"mean": float(px.mean()), "median": float(med), "std": float(px.std()),
                         "min": float(px.min()), "max": float(px.max()),
                         "percentile_99_5": float(hi), "percentile_00_5": float(lo)}
        counts, edges = np.histogram(px, bins=HIST_BINS, range=(float(px.min()), float(px.max()) + 1e-6))
        hists[str(c)] = {"counts": counts.tolist(), "min": float(edges[0]), "max": float(edges[-1])}
    fp = {
        "spacings": [r[2] for r in results],
        "shapes_after_crop": [list(r[1]) for r in results],
        "foreground_intensity_properties_per_channel": stats,
        "median_relative_size_after_cropping": float(np.median([r[4] for r in results])),
        "nnssl_intensity_histograms": hists,
        "nnssl_labeled": is_labeled(cases),
        "nnssl_cases_digest": digest,
    }
    atomic_write_json(fp, fn)
    return fp


def clipped_intensity_stats(fingerprint: dict, channel: int, lo: float, hi: float) -> dict:
    """Mean/std of foreground intensities after clipping to [lo, hi], from the stored histogram."""
    h = fingerprint["nnssl_intensity_histograms"][str(channel)]
    counts = np.asarray(h["counts"], dtype=np.float64)
    edges = np.linspace(h["min"], h["max"], len(counts) + 1)
    centers = np.clip((edges[:-1] + edges[1:]) / 2, lo, hi)
    n = counts.sum()
    mean = float((counts * centers).sum() / n)
    std = float(np.sqrt((counts * (centers - mean) ** 2).sum() / n))
    return {"mean": mean, "std": max(std, 1e-8), "percentile_00_5": float(lo), "percentile_99_5": float(hi)}


def write_preprocessed_dataset_json(dataset_name: str, dataset_json: dict) -> dict:
    """nnU-Net's trainers need a `labels` entry; unlabeled datasets get background only."""
    dj = dict(dataset_json)
    if "labels" not in dj:
        dj["labels"] = {"background": 0}
    dj["numTraining"] = dj.get("numTraining", 0)
    atomic_write_json(dj, os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, "dataset.json"))
    return dj


# ------------------------------------------------------------------------------------------------
# Preprocessing: nnU-Net's DefaultPreprocessor per case, written atomically, resumable.
# ------------------------------------------------------------------------------------------------


def _config_digest(plans: dict, configuration: str) -> str:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration)
    relevant = {"spacing": cm.spacing, "norm": cm.normalization_schemes, "mask": cm.use_mask_for_norm,
                "resampling": cm.configuration.get("resampling_fn_data_kwargs"),
                "intensity": plans.get("foreground_intensity_properties_per_channel"),
                "transpose": plans.get("transpose_forward"), "patch": cm.patch_size}
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def _preprocess_one(args):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    case, images, label, plans, configuration, dataset_json, out_dir = args
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    tmp_dir = os.path.join(out_dir, f".tmp_{case}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    pp = DefaultPreprocessor(verbose=False)
    try:
        pp.run_case_save(os.path.join(tmp_dir, case), images, label, pm, cm, dataset_json)
    except Exception as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise UserInputError(f"{images[0]}: preprocessing failed ({type(e).__name__}: {str(e)[:200]}). "
                             f"Check this case or remove it from imagesTr.") from None
    # the .b2nd image is what nnU-Net lists as "a case": move it last, so a kill leaves no visible half case
    for suffix in (".pkl", "_seg.b2nd", ".b2nd"):
        os.replace(os.path.join(tmp_dir, case + suffix), os.path.join(out_dir, case + suffix))
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return case


def case_is_preprocessed(out_dir: str, case: str) -> bool:
    return all(os.path.isfile(os.path.join(out_dir, case + s)) for s in (".b2nd", "_seg.b2nd", ".pkl"))


def preprocess(dataset_name: str, plans_name: str, cases: Dict[str, dict], dataset_json: dict,
               configuration: str = "3d_fullres", num_processes: int = 1, overwrite: bool = False) -> str:
    """Preprocess every case into `<preprocessed>/<dataset>/<data_identifier>/`; finished cases are kept
    on rerun unless the plans changed (then the folder is rebuilt)."""
    with open(os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, plans_name + ".json")) as f:
        plans = json.load(f)
    data_identifier = plans["configurations"][configuration]["data_identifier"]
    out_dir = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, data_identifier)
    digest = _config_digest(plans, configuration)
    # kept beside (not inside) the data folder: nnU-Net infers the dataset class from the file endings there
    marker = os.path.join(os.path.dirname(out_dir), f".nnssl_{data_identifier}.json")
    if os.path.isdir(out_dir):
        old = None
        if os.path.isfile(marker):
            with open(marker) as f:
                old = json.load(f).get("digest")
        if overwrite or old != digest:
            shutil.rmtree(out_dir)
            if os.path.isfile(marker):
                os.remove(marker)
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.isfile(marker):
        atomic_write_json({"digest": digest, "plans_name": plans_name, "configuration": configuration}, marker)
    for d in os.listdir(out_dir):
        if d.startswith(".tmp_"):
            shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
    todo = [k for k in sorted(cases) if not case_is_preprocessed(out_dir, k)]
    if len(todo) < len(cases):
        print(f"{len(cases) - len(todo)} case(s) already preprocessed in {out_dir}, {len(todo)} to go.")
    items = [(k, cases[k]["images"], cases[k]["label"], plans, configuration, dataset_json, out_dir) for k in todo]
    _pool_map(_preprocess_one, items, num_processes, "Preprocessing cases")
    if is_labeled(cases):
        # as nnUNetv2_preprocess does: nnU-Net's final validation reads the references from here
        gt = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, "gt_segmentations")
        os.makedirs(gt, exist_ok=True)
        for k, c in cases.items():
            dst = os.path.join(gt, k + dataset_json["file_ending"])
            if not os.path.isfile(dst) or os.stat(dst).st_mtime < os.stat(c["label"]).st_mtime:
                with atomic_path(dst) as tmp:
                    shutil.copyfile(c["label"], tmp)
    return out_dir
