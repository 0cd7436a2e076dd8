"""nnssl_visualize features: PCA picture of a MASS checkpoint's decoder features; clear errors for bad checkpoints."""
from __future__ import annotations

import os

import pytest
import torch

from test_incontext import mass_ckpt  # noqa: F401 - fixture: tiny random MASS checkpoint + synthetic raw dataset


def test_features_png(mass_ckpt, tmp_path):  # noqa: F811
    from nnssl_plugins.cli.visualize import main

    ckpt, raw = mass_ckpt
    img = os.path.join(raw, "imagesTr", "case00_0000.nii.gz")
    out = tmp_path / "sub" / "pca.png"
    assert main(["features", "-ckpt", ckpt, "-i", img, "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [f for f in os.listdir(out.parent) if f != "pca.png"] == []  # atomic: no temp file left behind


def test_features_bad_checkpoints(mass_ckpt, tmp_path):  # noqa: F811
    from nnssl_plugins.cli.visualize import main
    from nnssl_plugins.errors import UserInputError

    ckpt, raw = mass_ckpt
    img = os.path.join(raw, "imagesTr", "case00_0000.nii.gz")
    out = tmp_path / "pca.png"
    with pytest.raises(UserInputError, match="file not found"):
        main(["features", "-ckpt", str(tmp_path / "nope.pth"), "-i", img, "-o", str(out)])
    other = torch.load(ckpt, weights_only=True)
    other["nnssl_adaptation_plan"]["method"] = "MDAE"
    torch.save(other, str(tmp_path / "mdae.pth"))
    with pytest.raises(UserInputError, match="not MASS"):
        main(["features", "-ckpt", str(tmp_path / "mdae.pth"), "-i", img, "-o", str(out)])
    torch.save({"network_weights": other["network_weights"]}, str(tmp_path / "plain.pth"))
    with pytest.raises(UserInputError, match="adaptation plan"):
        main(["features", "-ckpt", str(tmp_path / "plain.pth"), "-i", img, "-o", str(out)])
    with pytest.raises(UserInputError, match="file not found"):
        main(["features", "-ckpt", ckpt, "-i", str(tmp_path / "missing.nii.gz"), "-o", str(out)])
    assert not out.exists()
