"""Fixtures/helpers for tests/test_masks_*.py: build tiny preprocessed nnU-Net datasets.

Uses the lead's planner (`nnssl_plugins.planners.api.plan_and_preprocess`) when it exists is NOT
required: the fixtures run stock nnU-Net 2.8.1 (fingerprint -> ExperimentPlanner with target spacing
1.5 mm iso and plans name nnsslPlans_MASS -> DefaultPreprocessor) so the mask tests only depend on
nnU-Net itself. Import with ``from conftest_masks import ...`` (tests/ is on sys.path under pytest).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from typing import Dict, Optional

import numpy as np

from conftest import SHARED_DATA as SHARED  # ../shared/data beside the repo (or $NNSSL_SHARED_DATA)
CT = os.path.join(SHARED, "ct", "totalseg_ct_sm.nii.gz")
CT_SEG = os.path.join(SHARED, "ct", "totalseg_ct_sm_seg.nii.gz")
PLANS = "nnsslPlans_MASS"


def set_env(monkeypatch, base: str) -> Dict[str, str]:
    env = {k: os.path.join(base, k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k, v in env.items():
        os.makedirs(v, exist_ok=True)
        if monkeypatch is not None:
            monkeypatch.setenv(k, v)
        else:
            os.environ[k] = v
    return env


def make_raw_dataset(raw_root: str, dataset_id: int, name: str, images: Dict[str, str],
                     labels: Optional[Dict[str, str]] = None, label_names: Optional[dict] = None,
                     channel: str = "CT") -> str:
    """images: case -> nifti path (copied). labels: case -> nifti path."""
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    for case, p in images.items():
        shutil.copy(p, os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"))
    if labels:
        os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
        for case, p in labels.items():
            shutil.copy(p, os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
    ds = {"channel_names": {"0": channel}, "labels": label_names or {"background": 0, "fg": 1},
          "numTraining": len(images), "file_ending": ".nii.gz"}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(ds, f)
    return folder


def write_nifti(path: str, arr: np.ndarray, spacing=(1.5, 1.5, 1.5)) -> str:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)  # arr in (z, y, x)
    img.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(img, path)
    return path


def preprocess_stock(dataset_id: int, spacing=(1.5, 1.5, 1.5), plans_name: str = PLANS, quiet: bool = True) -> None:
    """Stock nnU-Net planning + 3d_fullres preprocessing at a fixed target spacing, 1 process."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)

    # the planner's VRAM estimate calls torch.set_num_threads(nnUNet_n_proc_DA): must be >= 1 while planning
    old = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        _preprocess_stock(dataset_id, spacing, plans_name, quiet)
    finally:
        if old is None:
            os.environ.pop("nnUNet_n_proc_DA", None)
        else:
            os.environ["nnUNet_n_proc_DA"] = old


def _preprocess_stock(dataset_id, spacing, plans_name, quiet):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)

    out = io.StringIO()
    ctx = contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext()
    with ctx:
        extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=False, verbose=False,
                             show_progress_bar=False)
        plan_experiments([dataset_id], overwrite_target_spacing=tuple(spacing), overwrite_plans_name=plans_name)
        preprocess([dataset_id], plans_identifier=plans_name, configurations=("3d_fullres",), num_processes=(1,),
                   show_progress_bar=False)


def labels_of_ct() -> dict:
    lab = json.load(open(os.path.join(SHARED, "ct", "totalseg_ct_sm_seg_labels.json")))
    # file maps value -> name (or name -> value); normalise to nnU-Net's name -> value
    out = {"background": 0}
    items = lab.items() if isinstance(lab, dict) else []
    for k, v in items:
        if str(k).isdigit():
            out[str(v)] = int(k)
        elif isinstance(v, int):
            out[str(k)] = v
    return out


def build_real_ct(base: str, dataset_id: int = 981, monkeypatch=None, cache: bool = True) -> str:
    """Real TotalSegmentator CT (+41-label seg) preprocessed at 1.5 mm iso with stock nnU-Net.

    With cache=True the preprocessed result is cached under $TMPDIR/nnssl_masks_test_cache and copied
    into `base` (saves ~20 s per test file).
    """
    env = set_env(monkeypatch, base)
    name = f"Dataset{dataset_id:03d}_RealCT"
    cache_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"nnssl_masks_test_cache_v1", name)
    dst = os.path.join(env["nnUNet_preprocessed"], name)
    if cache and os.path.isfile(os.path.join(cache_dir, "DONE")):
        shutil.copytree(cache_dir, dst, ignore=shutil.ignore_patterns("DONE"))
        return name
    make_raw_dataset(env["nnUNet_raw"], dataset_id, "RealCT", {"ct_000": CT}, {"ct_000": CT_SEG}, labels_of_ct())
    preprocess_stock(dataset_id)
    if cache:
        tmp = cache_dir + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(dst, tmp)
        open(os.path.join(tmp, "DONE"), "w").close()
        try:
            os.replace(tmp, cache_dir) if not os.path.exists(cache_dir) else shutil.rmtree(tmp)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return name


def build_synthetic(base: str, dataset_id: int, shapes, monkeypatch=None, kind: str = "phantom",
                    seed: int = 0, labeled: bool = False, spacing=(1.5, 1.5, 1.5)) -> str:
    """Small synthetic CT-like volumes (HU), e.g. ellipsoids of various intensities in a body.

    The preprocessed result is cached under $TMPDIR/nnssl_masks_test_cache_v1 (keyed by arguments).
    """
    env = set_env(monkeypatch, base)
    name = f"Dataset{dataset_id:03d}_Synth"
    key = f"{name}_{kind}_{seed}_{int(labeled)}_" + "_".join("x".join(map(str, s)) for s in shapes) + \
          "_" + "x".join(map(str, spacing))
    cache_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "nnssl_masks_test_cache_v1", key)
    dst = os.path.join(env["nnUNet_preprocessed"], name)
    if os.path.isfile(os.path.join(cache_dir, "DONE")):
        shutil.copytree(cache_dir, dst, ignore=shutil.ignore_patterns("DONE"))
        return name
    _build_synthetic(env, dataset_id, shapes, kind, seed, labeled, spacing, base)
    tmp = cache_dir + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(dst, tmp)
    open(os.path.join(tmp, "DONE"), "w").close()
    try:
        os.replace(tmp, cache_dir) if not os.path.exists(cache_dir) else shutil.rmtree(tmp)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return name


def _build_synthetic(env, dataset_id, shapes, kind, seed, labeled, spacing, base):
    rng = np.random.default_rng(seed)
    tmpd = os.path.join(base, "_nii")
    os.makedirs(tmpd, exist_ok=True)
    images, labels = {}, {}
    for k, shp in enumerate(shapes):
        z, y, x = shp
        if kind == "constant":
            arr = np.full(shp, 40.0, dtype=np.float32)
            lab = np.zeros(shp, dtype=np.uint8)
            lab[: z // 4, : y // 4, : x // 4] = 1  # stock fingerprinting needs some foreground
        else:
            zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shp], indexing="ij")
            arr = np.full(shp, -1000.0, dtype=np.float32)
            body = (yy / 0.9) ** 2 + (xx / 0.9) ** 2 < 1
            arr[body] = 0.0
            lab = np.zeros(shp, dtype=np.uint8)
            for j in range(6):
                c = rng.uniform(-0.5, 0.5, 3)
                r = rng.uniform(0.15, 0.35, 3)
                e = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 < 1
                arr[e & body] = rng.uniform(-200, 900)
                lab[e & body] = 1 + (j % 2)
            arr += rng.normal(0, 10, shp).astype(np.float32)
        case = f"case_{k:03d}"
        images[case] = write_nifti(os.path.join(tmpd, case + ".nii.gz"), arr, spacing)
        if labeled or True:  # stock nnU-Net planning needs labelsTr
            labels[case] = write_nifti(os.path.join(tmpd, case + "_seg.nii.gz"), lab, spacing)
    label_names = {"background": 0, "a": 1, "b": 2}
    make_raw_dataset(env["nnUNet_raw"], dataset_id, "Synth", images, labels, label_names)
    preprocess_stock(dataset_id, spacing=spacing)
    if not labeled:  # mimic an unlabeled pretraining dataset: dataset.json lists no foreground labels
        pj = os.path.join(env["nnUNet_preprocessed"], f"Dataset{dataset_id:03d}_Synth", "dataset.json")
        d = json.load(open(pj))
        d["labels"] = {"background": 0}
        json.dump(d, open(pj, "w"))
