"""nnssl_demo --method MASS end to end on the embedded CT (about 1-2 min on 2 CPU cores; 3+ min under load)."""
from __future__ import annotations

import os
import sys

from conftest import BIN, run_cmd


def test_demo_mass(tmp_path):
    exe = os.path.join(BIN, "nnssl_demo")
    cmd = [exe] if os.path.isfile(exe) else [sys.executable, "-m", "nnssl_plugins.cli.demo"]
    work = tmp_path / "demo"
    r = run_cmd(cmd + ["--method", "MASS", "--workdir", str(work)], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = work / "mass_outputs"
    for f in ("liver_incontext.nii.gz", "liver_task_embedding.safetensors", "features_pca.png", "masks_overlay.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
        assert str(out / f) in r.stdout  # the demo says where each output is
    for f in ("features_pca.png", "masks_overlay.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = (work / "nnUNet_results" / "Dataset901_DemoCTUnlabeled" /
            "MASSPretrainTrainer_smoke__nnsslPlans_MASS_tiny__3d_fullres" / "fold_all" / "checkpoint_final.pth")
    assert ckpt.is_file()

    import numpy as np
    import SimpleITK as sitk

    from nnssl_plugins.cli.demo import DEMO_DIR

    seg = sitk.ReadImage(str(out / "liver_incontext.nii.gz"))
    ct = sitk.ReadImage(os.path.join(DEMO_DIR, "totalseg_ct_sm.nii.gz"))
    assert seg.GetSize() == ct.GetSize() and np.allclose(seg.GetSpacing(), ct.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= {0, 5}  # liver keeps its label
