"""MaskStore format: roundtrip, random access, compactness, corruption -> UserInputError, atomicity."""
import os

import numpy as np
import pytest

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.masks import CroppedMask, MaskStore, write_store
from nnssl_plugins.pretrain.masks.postprocess import clean_mask, deduplicate, iou_cropped


def _random_masks(shape, n, rng):
    out = []
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for k in range(n):
        c = rng.uniform(0, shape)
        r = rng.uniform(3, 12, 3)
        m = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 < 1
        cm = CroppedMask.from_dense(m, {"score": float(k) / n, "seed_axis": 0, "seed_slice": k, "source": f"t{k}"})
        if cm is not None:
            out.append((m, cm))
    return out


def test_roundtrip_random_access_and_meta(tmp_path):
    rng = np.random.default_rng(0)
    shape = (40, 50, 60)
    pairs = _random_masks(shape, 30, rng)
    p = str(tmp_path / "c.nnsslmask")
    write_store(p, shape, [cm for _, cm in pairs], "test", {"a": 1}, case_id="c")
    st = MaskStore.open(p)
    assert len(st) == len(pairs) and st.shape == shape
    assert st.meta["backend"] == "test" and st.meta["params"] == {"a": 1} and st.meta["version"] == 1
    for i in rng.permutation(len(pairs)):
        dense, cm = pairs[i]
        m = st.mask(i)
        assert m.dtype == bool and m.shape == shape and np.array_equal(m, dense)
        sl, crop = st.crop(i)
        assert np.array_equal(dense[sl], crop) and crop.sum() == dense.sum()
        md = st.mask_meta(i)
        assert md["voxels"] == dense.sum() and md["seed_slice"] == cm.meta["seed_slice"]
        assert md["bbox"] == list(cm.bbox)
    # no pickle anywhere: the header is JSON, payload is raw compressed bits
    raw = open(p, "rb").read()
    assert raw[:8] == b"NNSSLMSK" and raw[-8:] == b"NNSSLEND" and b"\x80\x04\x95" not in raw[:200]


def test_empty_store_is_valid(tmp_path):
    p = str(tmp_path / "e.nnsslmask")
    write_store(p, (5, 6, 7), [], "slic", {})
    st = MaskStore.open(p)
    assert len(st) == 0 and st.shape == (5, 6, 7)


def test_compact(tmp_path):
    rng = np.random.default_rng(1)
    shape = (96, 96, 96)
    pairs = _random_masks(shape, 40, rng)
    p = str(tmp_path / "c.nnsslmask")
    write_store(p, shape, [cm for _, cm in pairs], "test", {})
    st = MaskStore.open(p)
    assert st.file_bytes() / st.dense_bitpacked_bytes() < 0.05


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flipbyte", "header"])
def test_corrupt_store_fails_with_user_error(tmp_path, damage):
    rng = np.random.default_rng(2)
    shape = (30, 30, 30)
    pairs = _random_masks(shape, 5, rng)
    p = str(tmp_path / "case_007.nnsslmask")
    write_store(p, shape, [cm for _, cm in pairs], "test", {})
    raw = bytearray(open(p, "rb").read())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"hello world" * 10)
    elif damage == "empty":
        raw = bytearray()
    elif damage == "flipbyte":
        raw[-20] ^= 0xFF
    elif damage == "header":
        raw[21] = ord("}")
    open(p, "wb").write(bytes(raw))
    with pytest.raises(UserInputError) as ei:
        st = MaskStore.open(p)
        for i in range(len(st)):  # flipped payload byte: detected by the per-mask checksum on read
            st.crop(i)
    msg = str(ei.value)
    assert "case_007.nnsslmask" in msg and "--overwrite" in msg


def test_missing_store_user_error(tmp_path):
    with pytest.raises(UserInputError):
        MaskStore.open(str(tmp_path / "nope.nnsslmask"))


def test_failed_write_leaves_nothing(tmp_path):
    p = str(tmp_path / "x.nnsslmask")
    bad = CroppedMask((0, 100, 0, 2, 0, 2), np.ones((100, 2, 2), bool))
    with pytest.raises(ValueError):
        write_store(p, (10, 10, 10), [bad], "t", {})
    assert os.listdir(tmp_path) == []


def test_postprocess_cc_minvolume_dedup():
    m = np.zeros((20, 20, 20), bool)
    m[2:8, 2:8, 2:8] = True      # 216 voxels, touches slice 5
    m[12:19, 12:19, 12:19] = True  # bigger, does not touch slice 5
    cm = clean_mask(m, 10, seed_axis=0, seed_slice=5)
    assert cm.voxels == 216 and cm.bbox == (2, 8, 2, 8, 2, 8)
    assert clean_mask(m, 1000, seed_axis=0, seed_slice=5) is None
    assert clean_mask(m, 10).voxels == 343  # no seed: largest component
    a = CroppedMask.from_dense(m)
    m2 = m.copy()
    m2[2, 2, 2] = False
    b = CroppedMask.from_dense(m2)
    c = CroppedMask.from_dense(np.roll(m, 5, axis=1))
    assert iou_cropped(a, b) > 0.9
    kept = deduplicate([a, b, c], 0.9, seed=0)
    assert len(kept) == 2 and c in kept
    assert [id(x) for x in deduplicate([a, b, c], 0.9, seed=0)] == [id(x) for x in kept]
