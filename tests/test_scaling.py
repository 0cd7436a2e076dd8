"""Scale-out (docs/scaling.md): mask shards merge into exactly a single run's stores; several datasets are
pretrained at once through a merged raw dataset made of symlinks. (Shard partitioning itself:
test_masks_resume.py::test_shards_partition_cases; DDP pieces: test_ddp.py.)"""
from __future__ import annotations

import contextlib
import filecmp
import io
import json
import os
import shutil

import pytest

from conftest import make_synthetic_dataset
from conftest_masks import build_synthetic


def test_shard_union_equals_single_run(tmp_path, monkeypatch):
    from nnssl_plugins.cli.generate_masks import main
    from nnssl_plugins.pretrain.masks.dataset import PreprocessedDataset

    build_synthetic(str(tmp_path), 983, [(24, 48, 48)] * 2, monkeypatch=monkeypatch, seed=1, labeled=True)
    args = ["-d", "983", "--backend", "slic", "--options", '{"scales_mm": [20]}', "--no-progress"]
    ds = PreprocessedDataset(983)
    folder = ds.store_dir("slic")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args + ["--shard", "0/2"]) == 0
        assert main(args + ["--shard", "1/2"]) == 0
    sharded = str(tmp_path / "sharded")
    shutil.copytree(folder, sharded)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args + ["--overwrite"]) == 0
    names = sorted(c + ".nnsslmask" for c in ds.identifiers)
    assert sorted(f for f in os.listdir(sharded) if f.endswith(".nnsslmask")) == names
    for f in names:
        assert filecmp.cmp(os.path.join(sharded, f), os.path.join(folder, f), shallow=False), f
    # worker processes (-np 2) give the same bytes as one process
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args + ["--overwrite", "-np", "2"]) == 0
    for f in names:
        assert filecmp.cmp(os.path.join(sharded, f), os.path.join(folder, f), shallow=False), f


def test_planning_a_merged_dataset_of_symlinks(nnunet_env):
    """The multi-dataset recipe of docs/scaling.md: one raw dataset whose imagesTr links to other datasets."""
    from nnssl_plugins.planners.api import plan_and_preprocess

    raw = nnunet_env["nnUNet_raw"]
    sources = [make_synthetic_dataset(raw, did, f"Src{did}", n_cases=2, shape=(20, 22, 24), seed=did)
               for did in (961, 962)]
    merged = os.path.join(raw, "Dataset963_Merged")
    os.makedirs(os.path.join(merged, "imagesTr"))
    n = 0
    for src in sources:
        tag = os.path.basename(src).split("_")[0]  # Dataset961: keeps case ids unique across sources
        for f in sorted(os.listdir(os.path.join(src, "imagesTr"))):
            os.symlink(os.path.join(src, "imagesTr", f), os.path.join(merged, "imagesTr", f"{tag}_{f}"))
            n += 1
    json.dump({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": n},
              open(os.path.join(merged, "dataset.json"), "w"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        plans = plan_and_preprocess(963, "MDAE", "tiny")
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset963_Merged")
    folder = os.path.join(pre, json.load(open(os.path.join(pre, plans + ".json")))["configurations"]["3d_fullres"]
                          ["data_identifier"])
    cases = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))
    assert cases == ["Dataset961_case00", "Dataset961_case01", "Dataset962_case00", "Dataset962_case01"]
    assert all(os.path.islink(os.path.join(merged, "imagesTr", f)) for f in os.listdir(os.path.join(merged, "imagesTr")))
