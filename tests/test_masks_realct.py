"""labels + slic backends on the real TotalSegmentator CT, preprocessed by stock nnU-Net at 1.5 mm."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest_masks import PLANS, build_real_ct
from nnssl_plugins.pretrain.masks import MaskStore
from nnssl_plugins.pretrain.masks.dataset import PreprocessedDataset
from nnssl_plugins.pretrain.masks.postprocess import deduplicate



@pytest.fixture(scope="module")
def realct(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("realct"))
    mp = pytest.MonkeyPatch()
    name = build_real_ct(base, 981, monkeypatch=mp)
    yield name
    mp.undo()


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "nnssl_plugins.cli.generate_masks", *args],
                          capture_output=True, text=True, env=env)


def test_labels_backend_equals_nnunet_preprocessed_seg(realct):
    from nnssl_plugins.cli.generate_masks import main

    assert main(["-d", "981", "--backend", "labels", "--no-progress"]) == 0
    ds = PreprocessedDataset(981, PLANS)
    seg = ds.load_seg("ct_000")[0]
    img_shape = ds.image_shape("ct_000")[1:]
    st = MaskStore.open(ds.store_path("labels", "ct_000"))
    assert st.shape == img_shape == seg.shape
    labels = sorted(int(v) for v in np.unique(seg) if v > 0)
    assert len(st) == len(labels) >= 30
    for i in range(len(st)):
        lab = int(st.mask_meta(i)["source"].split(":")[1])
        assert np.array_equal(st.mask(i), seg == lab), lab
        assert st.mask_meta(i)["voxels"] == int((seg == lab).sum())
    # also check against nnU-Net's own dataset class
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    data, nseg, _, props = nnUNetDatasetBlosc2(ds.folder).load_case("ct_000")
    assert tuple(data.shape[1:]) == st.shape
    liver = [i for i in range(len(st)) if st.mask_meta(i)["source"] == "label:5"][0]
    assert np.array_equal(st.mask(liver), np.asarray(nseg[0]) == 5)


def test_slic_hundreds_dedup_deterministic(realct, tmp_path):
    r = _cli("-d", "981", "--backend", "slic", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "masks per case" in r.stdout
    ds = PreprocessedDataset(981, PLANS)
    p = ds.store_path("slic", "ct_000")
    st = MaskStore.open(p)
    assert st.shape == ds.image_shape("ct_000")[1:]
    assert 200 <= len(st) <= 5000
    assert all(v >= 1000 for v in st.voxels)
    crops = []
    from nnssl_plugins.pretrain.masks.store import CroppedMask
    for i in range(len(st)):
        sl, c = st.crop(i)
        assert c.any()
        crops.append(CroppedMask(st.mask_meta(i)["bbox"], c, {"voxels": int(c.sum())}))
    assert len(deduplicate(crops, 0.9, seed=123)) == len(crops)  # no pair with IoU > 0.9 left
    first = open(p, "rb").read()
    mtime = os.path.getmtime(p)
    # rerun without --overwrite: skipped; with --overwrite: byte-identical (deterministic for the seed)
    from nnssl_plugins.cli.generate_masks import main

    assert main(["-d", "981", "--backend", "slic", "--no-progress"]) == 0
    assert os.path.getmtime(p) == mtime  # skipped
    assert main(["-d", "981", "--backend", "slic", "--no-progress", "--overwrite"]) == 0
    assert open(p, "rb").read() == first
    summ = json.load(open(os.path.join(ds.store_dir("slic"), "summary.json")))
    assert summ["masks_per_case"]["ct_000"] == len(st)
    assert sum(summ["mask_size_histogram"]["counts"]) == len(st)
    assert sorted(os.listdir(ds.store_dir("slic"))) == ["ct_000.nnsslmask", "summary.json"]
    # QC figure
    from nnssl_plugins.cli.visualize import main as vis

    out = os.environ.get("NNSSL_QC_PNG") or str(tmp_path / "qc.png")
    assert vis(["masks", "-d", "981", "-c", "ct_000", "--backend", "slic", "-o", out]) == 0
    assert os.path.getsize(out) > 10000
