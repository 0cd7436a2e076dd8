"""Safe loading: a malicious pickle fed to every loader we own never runs its payload.

The payload is a pickle whose `__reduce__` creates a marker file. Each loader must refuse it with one clear
message and the marker must never appear. Checked loaders: `safe_torch_load` (and through it
nnssl_transfer_plans, nnssl_eval_reconstruction, nnssl_incontext_predict -ckpt, finetune/classification
`-pretrained_weights` via weight_transfer, nnssl_predict_cls, pretraining resume), the task-embedding reader
(`--embedding`, safetensors), MaskStore.open and the SAM2 checkpoint loader.

Out of scope (nnU-Net's own stock loaders, not ours): nnU-Net's `load_checkpoint` used when *segmentation /
classification* trainers resume with --c, stock `load_pretrained_weights` for stock trainers, stock inference, and
nnU-Net's preprocessed `.pkl` case properties — those use `weights_only=False` / pickle by nnU-Net's design.
"""
from __future__ import annotations

import json
import os
import pickle
import types

import pytest
import torch

from conftest import make_synthetic_dataset


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    d = tmp_path_factory.mktemp("evil")
    marker = str(d / "PWNED")
    zip_ckpt = str(d / "evil.pth")  # torch's zip format
    torch.save({"network_weights": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, zip_ckpt)
    legacy = str(d / "evil_legacy.pth")  # a bare pickle stream
    with open(legacy, "wb") as f:
        pickle.dump({"network_weights": _Evil(marker)}, f, protocol=2)
    # the payload really works when loaded unsafely (so its absence below means something)
    sanity = str(d / "SANITY")
    p = str(d / "sanity.pth")
    torch.save(_Evil(sanity), p)
    torch.load(p, weights_only=False)
    assert os.path.exists(sanity)
    return types.SimpleNamespace(dir=str(d), marker=marker, files=[zip_ckpt, legacy])


@pytest.fixture(scope="module")
def mass_setup(tmp_path_factory, evil):
    """A random MASS checkpoint (real adaptation plan) for the --embedding path."""
    import contextlib
    import io

    from nnssl_plugins.planners.api import plan_and_preprocess
    from nnssl_plugins.pretrain.common.adaptation import make_adaptation_plan
    from nnssl_plugins.pretrain.mass import build_mass_model

    base = tmp_path_factory.mktemp("safe_ws")
    mp = pytest.MonkeyPatch()
    env = {}
    for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (base / n).mkdir()
        mp.setenv(n, str(base / n))
        env[n] = str(base / n)
    raw = make_synthetic_dataset(env["nnUNet_raw"], 990, "Syn", n_cases=2, labeled=True, shape=(24, 28, 32))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        plan_and_preprocess("Dataset990_Syn", "MASS", "tiny", preprocess=False)
    plans = json.load(open(os.path.join(env["nnUNet_preprocessed"], "Dataset990_Syn", "nnsslPlans_MASS_tiny.json")))
    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]
    model = build_mass_model(arch["arch_kwargs"], 1, patch_size=cfg["patch_size"])
    ap = make_adaptation_plan(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], plans, 1,
                              cfg["patch_size"], method="MASS", mass={"patch_size": cfg["patch_size"]})
    ck = str(base / "mass.pth")
    torch.save({"network_weights": model.state_dict(), "nnssl_adaptation_plan": ap}, ck)
    yield types.SimpleNamespace(ckpt=ck, image=os.path.join(raw, "imagesTr", "case00_0000.nii.gz"), env=env)
    mp.undo()


def _cli(module: str, argv, capsys) -> str:
    import importlib

    from nnssl_plugins.errors import run_cli

    mod = importlib.import_module(f"nnssl_plugins.cli.{module}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: mod.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("ERROR: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _refused(evil, line: str, path: str):
    assert path in line, line
    assert not os.path.exists(evil.marker), "the pickle payload ran"


def test_safe_torch_load_refuses_pickle_payload(evil):
    from nnssl_plugins.errors import UserInputError
    from nnssl_plugins.utils.io import safe_torch_load

    for f in evil.files:
        for allow_numpy in (False, True):
            with pytest.raises(UserInputError, match="weights_only") as e:
                safe_torch_load(f, allow_numpy=allow_numpy)
            _refused(evil, str(e.value), f)


def test_commands_refuse_pickle_checkpoints(evil, mass_setup, capsys, tmp_path):
    for f in evil.files:
        _refused(evil, _cli("transfer_plans", ["-d", "990", "-ckpt", f], capsys), f)
        _refused(evil, _cli("eval_reconstruction", ["-ckpt", f, "-d", "990", "-o", str(tmp_path / "e")], capsys), f)
        _refused(evil, _cli("incontext_predict", ["-ckpt", f, "-i", mass_setup.image, "-o", str(tmp_path / "o.nii.gz"),
                                                  "-r", mass_setup.image, mass_setup.image], capsys), f)
        # a pickle where a safetensors task embedding is expected
        _refused(evil, _cli("incontext_predict", ["-ckpt", mass_setup.ckpt, "-i", mass_setup.image, "-o",
                                                  str(tmp_path / "o.nii.gz"), "--embedding", f], capsys), f)
    assert not os.path.exists(tmp_path / "o.nii.gz") and not os.path.exists(tmp_path / "e")


def test_predict_cls_refuses_pickle_checkpoint(evil, tmp_path, capsys, monkeypatch):
    """nnssl_predict_cls used to load the trained model with weights_only=False."""
    import nnunetv2.paths

    results = tmp_path / "results"
    fold = results / "Dataset990_Syn" / "nnsslClsTrainer_Frozen__nnsslPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (fold.parent / name).write_text("{}")
    from nnssl_plugins.trainers.classification import CLASSES_JSON

    (fold / CLASSES_JSON).write_text(json.dumps({"class_names": ["a", "b"]}))
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_results", str(results))
    for f in evil.files:
        ck = fold / "checkpoint_final.pth"
        ck.write_bytes(open(f, "rb").read())
        _refused(evil, _cli("predict_cls", ["-i", str(tmp_path), "-o", str(tmp_path / "p.csv"), "-d",
                                            "Dataset990_Syn", "-p", "nnsslPlans", "-device", "cpu"], capsys), str(ck))
    assert not os.path.exists(tmp_path / "p.csv")


def test_finetune_and_resume_loaders_refuse_pickle(evil):
    from nnssl_plugins.errors import UserInputError
    from nnssl_plugins.pretrain.common.weight_transfer import load_pretrained_into, read_pretrained_checkpoint
    from nnssl_plugins.trainers.pretrain_base import nnsslPretrainTrainer

    for f in evil.files:
        with pytest.raises(UserInputError) as e:
            read_pretrained_checkpoint(f)
        _refused(evil, str(e.value), f)
        with pytest.raises(UserInputError) as e:
            load_pretrained_into(torch.nn.Linear(1, 1), f, mode="encoder", backbone={})
        _refused(evil, str(e.value), f)
        # pretraining resume (--c): our override loads weights_only before nnU-Net's stock load_checkpoint
        fake = types.SimpleNamespace(was_initialized=True, device=torch.device("cpu"))
        with pytest.raises(UserInputError) as e:
            nnsslPretrainTrainer.load_checkpoint(fake, f)
        _refused(evil, str(e.value), f)


def test_mask_store_and_sam2_refuse_pickle(evil):
    from nnssl_plugins.errors import UserInputError
    from nnssl_plugins.pretrain.masks import MaskStore
    from nnssl_plugins.pretrain.masks.backends.sam2 import Sam2Backend

    for f in evil.files:
        store = os.path.join(evil.dir, os.path.basename(f) + ".nnsslmask")
        with open(store, "wb") as o:
            o.write(open(f, "rb").read())
        with pytest.raises(UserInputError) as e:
            MaskStore.open(store)
        _refused(evil, str(e.value), store)
    # SAM2's own loader (sam2.build_sam._load_checkpoint) uses weights_only=True; we only wrap its error
    be = Sam2Backend(checkpoint=evil.files[0], config="configs/sam2.1/sam2.1_hiera_t.yaml")
    with pytest.raises(UserInputError) as e:
        be._load()
    _refused(evil, str(e.value), evil.files[0])
