"""SIGKILL during preprocessing: the rerun completes, and no half-written case is ever visible to nnU-Net."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import blosc2

from conftest import BIN, make_synthetic_dataset, run_cmd


def test_sigkill_during_preprocessing_then_rerun(nnunet_env):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, "Unlab", n_cases=8, shape=(60, 64, 64))
    cmd = [os.path.join(BIN, "nnssl_plan_and_preprocess"), "-d", "990", "-m", "MDAE", "--preset", "tiny"]
    folder = os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset990_Unlab", "nnsslPlans_MDAE_tiny_3d_fullres")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 120:
        if os.path.isdir(folder) and any(f.endswith("_seg.b2nd") for f in os.listdir(folder)):
            break
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done_at_kill = [f for f in os.listdir(folder) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd")]
    assert len(done_at_kill) < 8, "the kill came after preprocessing finished; the test proved nothing"
    # whatever nnU-Net would list as a case (<case>.b2nd) is complete: its seg and properties exist and it opens
    for f in os.listdir(folder):
        if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"):
            case = f[:-5]
            assert os.path.isfile(os.path.join(folder, case + "_seg.b2nd"))
            assert os.path.isfile(os.path.join(folder, case + ".pkl"))
            blosc2.open(os.path.join(folder, f))[:]
    r = run_cmd(cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    cases = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))
    assert cases == [f"case{i:02d}" for i in range(8)]
    assert not [d for d in os.listdir(folder) if d.startswith(".tmp_")]
