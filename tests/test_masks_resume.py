"""SIGKILL mid-dataset + rerun == uninterrupted run; partial files never readable; --shard split."""
import filecmp
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest_masks import build_synthetic
from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.masks import MaskStore
from nnssl_plugins.pretrain.masks.dataset import PreprocessedDataset, shard_cases

NCASES = 6


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("resume"))
    mp = pytest.MonkeyPatch()
    build_synthetic(base, 982, [(48, 72, 72)] * NCASES, monkeypatch=mp, seed=3, labeled=True)
    yield base
    mp.undo()


def _cmd(*extra):
    return [sys.executable, "-m", "nnssl_plugins.cli.generate_masks", "-d", "982", "--backend", "slic",
            "--no-progress", "--options", '{"scales_mm": [30, 15]}', *extra]


def test_sigkill_then_rerun_equals_uninterrupted(synth):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ds = PreprocessedDataset(982)
    folder = ds.store_dir("slic")
    # reference: uninterrupted run
    assert subprocess.run(_cmd(), env=env, capture_output=True).returncode == 0
    ref = folder + "_ref"
    shutil.copytree(folder, ref)
    shutil.rmtree(folder)
    # interrupted run: SIGKILL as soon as the first store is finished
    proc = subprocess.Popen(_cmd(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120:
        done = [f for f in os.listdir(folder) if f.endswith(".nnsslmask")] if os.path.isdir(folder) else []
        if done:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    files = os.listdir(folder)
    finished = [f for f in files if f.endswith(".nnsslmask")]
    assert 1 <= len(finished) < NCASES, files
    for f in files:
        p = os.path.join(folder, f)
        if f.endswith(".nnsslmask"):
            MaskStore.open(p).verify()  # finished stores are complete
        else:  # leftover temp files are never valid stores
            with pytest.raises(UserInputError):
                MaskStore.open(p).verify()
    r = subprocess.run(_cmd(), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{len(finished)} skipped" in r.stdout
    for case in ds.identifiers:
        f = case + ".nnsslmask"
        assert filecmp.cmp(os.path.join(folder, f), os.path.join(ref, f), shallow=False), f
    assert sorted(os.listdir(folder)) == sorted(c + ".nnsslmask" for c in ds.identifiers) + ["summary.json"]


def test_shards_partition_cases(synth):
    cases = [f"c{i}" for i in range(7)]
    parts = [shard_cases(cases, f"{i}/3") for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(cases)
    assert all(len(set(a) & set(b)) == 0 for a in parts for b in parts if a is not b)
    with pytest.raises(UserInputError):
        shard_cases(cases, "3/3")
    from nnssl_plugins.cli.generate_masks import main

    ds = PreprocessedDataset(982)
    shutil.rmtree(ds.store_dir("labels"), ignore_errors=True)
    assert main(["-d", "982", "--backend", "labels", "--no-progress", "--shard", "1/2"]) == 0
    have = sorted(f[:-10] for f in os.listdir(ds.store_dir("labels")) if f.endswith(".nnsslmask"))
    assert have == ds.identifiers[1::2]
