"""Bad input -> one clear UserInputError message, non-zero CLI exit; constant image -> 0 masks (valid)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest_masks import build_synthetic, set_env
from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.masks import MaskStore
from nnssl_plugins.pretrain.masks.dataset import PreprocessedDataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("errors"))
    mp = pytest.MonkeyPatch()
    build_synthetic(base, 983, [(24, 48, 48)] * 2, monkeypatch=mp, seed=1, labeled=True)
    build_synthetic(os.path.join(base, "c"), 984, [(24, 48, 48)], monkeypatch=None, kind="constant")
    # both datasets must live in the same preprocessed root
    set_env(mp, base)
    import shutil
    for k in ("nnUNet_preprocessed",):
        src = os.path.join(base, "c", k, "Dataset984_Synth")
        shutil.copytree(src, os.path.join(base, k, "Dataset984_Synth"))
    yield base
    mp.undo()


class _R:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


def _cli(*args, subprocess_=False):
    """Run the CLI exactly as the console script does (run_cli wrapper), in-process unless asked."""
    if subprocess_:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-m", "nnssl_plugins.cli.generate_masks", *args, "--no-progress"],
                           capture_output=True, text=True, env=env)
        return _R(r.returncode, r.stdout, r.stderr)
    import contextlib
    import io

    from nnssl_plugins.cli.generate_masks import main
    from nnssl_plugins.errors import run_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(lambda: main([*args, "--no-progress"]))
            rc = 0
        except SystemExit as e:
            rc = int(e.code or 0)
    return _R(rc, out.getvalue(), err.getvalue())


def test_missing_checkpoint(synth):
    r = _cli("-d", "983", "--backend", "sam2", "--sam2-checkpoint", "/nonexistent/sam2.1_hiera_large.pt",
             subprocess_=True)
    assert r.returncode == 2 and "ERROR: --sam2-checkpoint /nonexistent/sam2.1_hiera_large.pt: file not found" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("-d", "983", "--backend", "sam2")
    assert r.returncode == 2 and "--sam2-checkpoint: required" in r.stderr


def test_wrong_config_and_bad_checkpoint(synth, tmp_path):
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"not a checkpoint")
    r = _cli("-d", "983", "--backend", "sam2", "--sam2-checkpoint", str(ck), "--sam2-config", "configs/nope.yaml")
    assert r.returncode == 2 and "--sam2-config configs/nope.yaml: no such config" in r.stderr
    from nnssl_plugins.pretrain.masks.backends.sam2 import Sam2Backend

    be = Sam2Backend(checkpoint=str(ck), config="configs/sam2.1/sam2.1_hiera_t.yaml")
    with pytest.raises(UserInputError, match="ck.pt"):
        be._load()


def test_not_preprocessed(synth):
    r = _cli("-d", "977", "--backend", "slic")
    assert r.returncode == 2 and "not preprocessed" in r.stderr and "Traceback" not in r.stderr
    r = _cli("-d", "983", "-p", "nnsslPlans_Nope", "--backend", "slic")
    assert r.returncode == 2 and "nnsslPlans_Nope.json: plans not found" in r.stderr


def test_2d_image(synth):
    import blosc2

    ds = PreprocessedDataset(983)
    case = ds.identifiers[0]
    p = os.path.join(ds.folder, case + ".b2nd")
    orig = p + ".orig"
    os.replace(p, orig)
    try:
        blosc2.asarray(np.zeros((1, 1, 48, 48), np.float32), urlpath=p, mode="w")
        r = _cli("-d", "983", "--backend", "slic", "--overwrite")
        assert r.returncode == 2 and "not a 3D volume" in r.stderr and case in r.stderr
    finally:
        os.replace(orig, p)


def test_constant_image_gives_zero_masks(synth):
    r = _cli("-d", "984", "--backend", "slic")
    assert r.returncode == 0, r.stderr
    assert "zero masks" in r.stdout
    ds = PreprocessedDataset(984)
    st = MaskStore.open(ds.store_path("slic", ds.identifiers[0]))
    assert len(st) == 0 and st.shape == ds.image_shape(ds.identifiers[0])[1:]


def test_labels_on_unlabeled_and_corrupt_store(synth, tmp_path):
    r = _cli("-d", "984", "--backend", "labels")
    assert r.returncode == 2 and "labels" in r.stderr
    r = _cli("-d", "983", "--backend", "slic", "--options", '{"scales_mm": [20]}')
    assert r.returncode == 0, r.stderr
    ds = PreprocessedDataset(983)
    p = ds.store_path("slic", ds.identifiers[0])
    good = open(p, "rb").read()
    open(p, "wb").write(good[: len(good) // 3])
    with pytest.raises(UserInputError, match="--overwrite"):
        MaskStore.open(p)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "nnssl_plugins.cli.visualize", "masks", "-d", "983", "-c",
                        ds.identifiers[0], "-o", str(tmp_path / "x.png")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and p in r.stderr and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    # a rerun treats the corrupt store as unfinished and regenerates it
    r = _cli("-d", "983", "--backend", "slic", "--options", '{"scales_mm": [20]}')
    assert r.returncode == 0
    assert open(p, "rb").read() == good
