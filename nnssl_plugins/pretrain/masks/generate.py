"""Dataset-level mask generation driver (used by ``nnssl_generate_masks``).

* one store per case at ``$nnUNet_preprocessed/DatasetXXX/nnssl_masks/<plans>/<backend>/<case>.nnsslmask``;
* atomic writes (temp file + fsync + os.replace), so a killed run never leaves a readable partial store;
* a rerun skips cases whose store opens cleanly with the right shape and backend (``--overwrite``
  regenerates); stale temp files of this shard's cases are removed first;
* ``shard="i/N"``: sorted case ids, every N-th starting at i;
* ``summary.json`` next to the stores: masks per case, mask-size histogram, seconds per case.
"""
from __future__ import annotations

import glob
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.masks.backends import CaseInput, make_backend
from nnssl_plugins.pretrain.masks.dataset import DEFAULT_PLANS, PreprocessedDataset, shard_cases
from nnssl_plugins.pretrain.masks.store import STORE_EXT, MaskStore, write_store
from nnssl_plugins.utils.io import atomic_write_json

SIZE_BINS = [0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e12]  # voxel-count histogram edges

_WORKER: Dict[str, Any] = {}


def store_is_valid(path: str, shape, backend: str) -> bool:
    try:
        st = MaskStore.open(path)
    except UserInputError:
        return False
    ok = tuple(st.shape) == tuple(shape) and st.backend == backend
    st.close()
    return ok


def _case_input(ds: PreprocessedDataset, case: str) -> CaseInput:
    img = ds.load_image(case)
    seg = ds.load_seg(case)
    if seg is not None and tuple(seg.shape[1:]) != tuple(img.shape[1:]):
        raise UserInputError(f"{ds.folder}/{case}_seg.b2nd: shape {seg.shape} differs from image {img.shape}. Rerun preprocessing.")
    return CaseInput(case_id=case, image=img, spacing=tuple(ds.spacing), hu_inverse=ds.hu_inverse(0), seg=seg)


def process_case(ds: PreprocessedDataset, backend, case: str, overwrite: bool = False) -> Dict[str, Any]:
    path = ds.store_path(backend.name, case)
    shape = ds.image_shape(case)[1:]
    if not overwrite and os.path.isfile(path) and store_is_valid(path, shape, backend.name):
        return {"case": case, "skipped": True, "masks": len(MaskStore.open(path)), "seconds": 0.0}
    t0 = time.time()
    ci = _case_input(ds, case)
    masks = backend.generate(ci)
    write_store(path, ci.image.shape[1:], masks, backend.name, backend.params, case_id=case)
    return {"case": case, "skipped": False, "masks": len(masks), "seconds": time.time() - t0}


def _worker_init(dataset, plans, backend_name, options):
    try:
        import torch
        torch.set_num_threads(1)
    except Exception:
        pass
    _WORKER["ds"] = PreprocessedDataset(dataset, plans)
    _WORKER["backend"] = make_backend(backend_name, **options)


def _worker_run(args):
    case, overwrite = args
    return process_case(_WORKER["ds"], _WORKER["backend"], case, overwrite)


def _clean_stale_tmp(folder: str, cases: List[str]) -> None:
    for case in cases:
        for p in glob.glob(os.path.join(folder, f".{case}{STORE_EXT}.*.tmp")):
            try:
                os.remove(p)
            except OSError:
                pass


def write_summary(ds: PreprocessedDataset, backend_name: str, run_stats: List[Dict[str, Any]]) -> Dict[str, Any]:
    folder = ds.store_dir(backend_name)
    per_case = {}
    sizes = []
    params = None
    for case in ds.identifiers:
        p = ds.store_path(backend_name, case)
        if not os.path.isfile(p):
            continue
        try:
            st = MaskStore.open(p)
        except UserInputError:
            continue
        per_case[case] = len(st)
        sizes.append(st.voxels)
        params = st.params
        st.close()
    allsz = np.concatenate(sizes) if sizes else np.zeros(0)
    hist, _ = np.histogram(allsz, bins=SIZE_BINS)
    secs = [r["seconds"] for r in run_stats if not r["skipped"]]
    counts = list(per_case.values())
    summary = {
        "dataset": ds.dataset_name, "plans": ds.plans_name, "backend": backend_name, "params": params,
        "num_cases_total": len(ds.identifiers), "num_cases_with_store": len(per_case),
        "masks_per_case": per_case,
        "masks_per_case_mean": float(np.mean(counts)) if counts else 0.0,
        "masks_per_case_min": int(min(counts)) if counts else 0,
        "masks_per_case_max": int(max(counts)) if counts else 0,
        "cases_with_zero_masks": sorted(c for c, n in per_case.items() if n == 0),
        "mask_size_histogram": {"bin_edges_voxels": SIZE_BINS[:-1] + ["inf"], "counts": hist.tolist()},
        "last_run": {"cases_generated": len(secs), "cases_skipped": len(run_stats) - len(secs),
                     "seconds_per_case_mean": float(np.mean(secs)) if secs else 0.0,
                     "seconds_per_case": {r["case"]: round(r["seconds"], 3) for r in run_stats if not r["skipped"]}},
    }
    atomic_write_json(summary, os.path.join(folder, "summary.json"))
    return summary


def generate_dataset(dataset, plans: str = DEFAULT_PLANS, backend: str = "slic",
                     backend_options: Optional[Dict[str, Any]] = None, shard: Optional[str] = None,
                     num_processes: int = 1, overwrite: bool = False, progress: bool = True,
                     cases: Optional[List[str]] = None) -> Dict[str, Any]:
    """Generate masks for every (shard of the) case(s) of a preprocessed dataset; returns the summary."""
    from tqdm import tqdm

    options = dict(backend_options or {})
    be = make_backend(backend, **options)  # validates options/checkpoint before any work
    ds = PreprocessedDataset(dataset, plans)
    if backend == "labels" and not ds.is_labeled():
        raise UserInputError(f"{ds.root}/dataset.json: lists no labels > 0; the labels backend needs a labeled "
                             "dataset. Use --backend slic or sam2.")
    todo = shard_cases(cases if cases is not None else ds.identifiers, shard)
    unknown = sorted(set(todo) - set(ds.identifiers))
    if unknown:
        raise UserInputError(f"cases {unknown[:5]}: not in {ds.folder}.")
    folder = ds.store_dir(backend)
    os.makedirs(folder, exist_ok=True)
    _clean_stale_tmp(folder, todo)
    stats: List[Dict[str, Any]] = []
    if backend == "sam2":
        num_processes = 1  # one model in memory; parallelism is per machine via --shard
    bar = tqdm(total=len(todo), desc=f"masks[{backend}]", unit="case", disable=not progress)
    if num_processes <= 1 or len(todo) <= 1:
        for case in todo:
            r = process_case(ds, be, case, overwrite)
            stats.append(r)
            bar.set_postfix(case=case, masks=r["masks"])
            bar.update(1)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(num_processes, initializer=_worker_init, initargs=(dataset, plans, backend, options)) as pool:
            for r in pool.imap_unordered(_worker_run, [(c, overwrite) for c in todo]):
                stats.append(r)
                bar.set_postfix(case=r["case"], masks=r["masks"])
                bar.update(1)
    bar.close()
    summary = write_summary(ds, backend, stats)
    summary["this_run"] = stats
    return summary
