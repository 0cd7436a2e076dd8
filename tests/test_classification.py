"""Classification trainers: labels validation, attention pooling, stock nnUNetv2_train end to end, predict CLI."""
from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

from test_finetune import (  # noqa: E402
    PRIMUS, blob_volume, build, make_checkpoint, make_raw_dataset, plan_and_preprocess, primus_arch_kwargs,
    run_stock_train, setup_env)

from nnssl_plugins.errors import UserInputError  # noqa: E402
from nnssl_plugins.pretrain.common.classification import (  # noqa: E402
    EncoderClassifier, classification_metrics, load_classification_labels)


def test_labels_file_validation(tmp_path):
    p = tmp_path / "classification_labels.json"
    with pytest.raises(UserInputError, match="not found"):
        load_classification_labels(str(p))
    p.write_text(json.dumps({"a": 0, "b": 0}))
    with pytest.raises(UserInputError, match="at least two"):
        load_classification_labels(str(p))
    p.write_text(json.dumps({"a": 0, "b": 1, "class_names": ["neg", "pos"]}))
    labels, names = load_classification_labels(str(p))
    assert labels == {"a": 0, "b": 1} and names == ["neg", "pos"]
    with pytest.raises(UserInputError, match="no label for 1 case.*c"):
        load_classification_labels(str(p), required_cases=["a", "b", "c"])
    p.write_text(json.dumps({"a": "x", "b": 1}))
    with pytest.raises(UserInputError, match="'a'"):
        load_classification_labels(str(p))


def test_metrics_and_primus_classifier():
    m = classification_metrics([0, 0, 1, 1, 2, 2], np.eye(3)[[0, 0, 1, 1, 2, 1]] * 0.8 + 0.1, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(5 / 6) and m["confusion_matrix"][2] == [0, 1, 1]
    assert m["auroc"] is not None and 0 <= m["balanced_accuracy"] <= 1
    net = EncoderClassifier(build(PRIMUS, primus_arch_kwargs(), 1, 2), 3)
    assert net(torch.randn(2, 1, 32, 32, 32)).shape == (2, 3)
    assert any(k.startswith("eva.") for k in net.state_dict()) and not any(k.startswith("up_projection")
                                                                          for k in net.state_dict())


@pytest.fixture(scope="module")
def cls_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    mp = pytest.MonkeyPatch()
    setup_env(mp, root)
    rng = np.random.default_rng(1)
    images, segs, labels = {}, {}, {}
    for i in range(12):
        bright = i % 2 == 0
        images[f"c{i:03d}"], segs[f"c{i:03d}"] = blob_volume(rng, bright)
        labels[f"c{i:03d}"] = int(bright)
    folder = make_raw_dataset(root, 902, "ClsTest", images, segs)
    labels["class_names"] = ["dark", "bright"]
    (folder / "classification_labels.json").write_text(json.dumps(labels))
    name = plan_and_preprocess(root, 902)
    # fold 0: 8 training cases, 4 validation cases (2 per class)
    val = ["c000", "c001", "c002", "c003"]
    splits = [{"train": [k for k in images if k not in val], "val": val}]
    (root / "pre" / name / "splits_final.json").write_text(json.dumps(splits))
    yield root, name, folder, labels
    mp.undo()


def test_frozen_classifier_end_to_end_and_predict(cls_dataset, monkeypatch, capsys, tmp_path):
    root, name, folder, labels = cls_dataset
    ck = root / "ck.pth"
    sd = make_checkpoint(ck, seed=3)
    run_stock_train(monkeypatch, ["902", "3d_fullres", "0", "-p", "nnsslTestPlans", "-tr", "nnsslClsTrainer_Frozen_test",
                                  "-pretrained_weights", str(ck)])
    out = capsys.readouterr().out
    assert "mode: encoder" in out and "cls_head" in out
    fold = root / "res" / name / "nnsslClsTrainer_Frozen_test__nnsslTestPlans__3d_fullres" / "fold_0"
    metrics = json.loads((fold / "validation_classification.json").read_text())
    assert metrics["num_cases"] == 4 and metrics["auroc"] >= 0.9, metrics
    assert set(metrics) >= {"accuracy", "balanced_accuracy", "confusion_matrix", "auroc_per_class_ovr"}
    rows = list(csv.DictReader(open(fold / "validation_classification_probabilities.csv")))
    assert [r["case_id"] for r in rows] == ["c000", "c001", "c002", "c003"] and "prob_bright" in rows[0]
    w = torch.load(fold / "checkpoint_final.pth", weights_only=False)["network_weights"]
    for k, v in w.items():
        if k.startswith("encoder."):
            assert torch.equal(v, sd[k]), k  # frozen encoder: bit-identical

    # predict new cases with the CLI
    from nnssl_plugins.cli.predict_cls import main

    rng = np.random.default_rng(7)
    new = tmp_path / "new"
    new.mkdir()
    import SimpleITK as sitk

    for i, bright in enumerate([True, False]):
        img, _ = blob_volume(rng, bright)
        sitk.WriteImage(sitk.GetImageFromArray(img), str(new / f"n{i}_0000.nii.gz"))
    out_csv = tmp_path / "pred.csv"
    rc = main(["-i", str(new), "-o", str(out_csv), "-d", "902", "-tr", "nnsslClsTrainer_Frozen_test", "-p",
               "nnsslTestPlans", "-f", "0", "-device", "cpu"])
    assert rc == 0
    rows = list(csv.DictReader(open(out_csv)))
    assert [r["case_id"] for r in rows] == ["n0", "n1"]
    assert [r["predicted_name"] for r in rows] == ["bright", "dark"]
    assert main(["-i", str(tmp_path / "nope"), "-o", str(out_csv), "-d", "902", "-tr", "nnsslClsTrainer_Frozen_test",
                 "-p", "nnsslTestPlans", "-device", "cpu"]) == 2


def test_classifier_bad_inputs_through_stock_entry(cls_dataset, monkeypatch):
    root, name, folder, labels = cls_dataset
    lf = folder / "classification_labels.json"
    good = lf.read_text()
    ck = root / "ck_bad.pth"
    make_checkpoint(ck, arch=PRIMUS, kwargs=primus_arch_kwargs())
    try:
        # Primus checkpoint into the ResEnc plans: clear architecture message
        with pytest.raises(UserInputError, match="Primus.*ResidualEncoderUNet"):
            run_stock_train(monkeypatch, ["902", "3d_fullres", "0", "-p", "nnsslTestPlans", "-tr",
                                          "nnsslClsTrainer_test", "-pretrained_weights", str(ck)])
        bad = {k: v for k, v in labels.items() if k != "c005"}
        lf.write_text(json.dumps(bad))
        with pytest.raises(UserInputError, match="no label for 1 case.*c005"):
            run_stock_train(monkeypatch, ["902", "3d_fullres", "0", "-p", "nnsslTestPlans", "-tr",
                                          "nnsslClsTrainer_test"])
        lf.unlink()
        with pytest.raises(UserInputError, match="classification_labels.json: classification labels file not found"):
            run_stock_train(monkeypatch, ["902", "3d_fullres", "0", "-p", "nnsslTestPlans", "-tr",
                                          "nnsslClsTrainer_test"])
    finally:
        lf.write_text(good)
