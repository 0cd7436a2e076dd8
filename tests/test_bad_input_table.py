"""Bad input across every command, as one table (issue 8).

Each row: a command, its argv and the bad input it is given. Every row must give exit code 2 (1 for stock
`nnUNetv2_train`, whose exit status we do not control), exactly one
`ERROR:` line on stderr naming the file/argument (``needles``) and the fix (``fix``), no traceback, and no
new file anywhere in the workspace (nothing half-written). Commands run in-process through `run_cli`, as the
console scripts do; two rows run the real console scripts in a subprocess (exit code, stderr as a user sees
them, and the stock `nnUNetv2_train` entry point with our trainers).

More focused bad-input tests live beside the features (test_bad_input_foundation.py, test_masks_errors.py,
test_finetune.py, test_classification.py, test_incontext.py, test_hiend_mae_trainer.py).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import pytest
import torch

from conftest import BIN, make_synthetic_dataset, write_volume
from conftest_masks import build_synthetic

SEG = "Dataset990_Syn"        # labeled synthetic, planned for MASS/HiEndMAE tiny, preprocessed MDAE tiny
MASKS = "Dataset983_Synth"    # stock-preprocessed nnsslPlans_MASS (shared cache with test_masks_errors)


@dataclass
class Case:
    name: str
    command: str                       # module in nnssl_plugins.cli, or a console script when subprocess=True
    make: Callable[[dict], List[str]]  # ws -> argv (creates the bad input)
    needles: tuple                     # must all appear in the ERROR line (file/argument)
    fix: tuple = ()                    # words of the fix that must appear too
    env: dict = field(default_factory=dict)   # env overrides (None = unset)
    subprocess: bool = False
    code: int = 2                      # stock entry points we don't wrap exit with Python's 1


# ----------------------------------------------------------------------------------------------------------
# workspace: built once per module
# ----------------------------------------------------------------------------------------------------------
def _adaptation(plans: dict, method: str, channels: int = 1, **extra) -> dict:
    from nnssl_plugins.pretrain.common.adaptation import make_adaptation_plan

    arch = plans["configurations"]["3d_fullres"]["architecture"]
    return make_adaptation_plan(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], plans,
                                channels, plans["configurations"]["3d_fullres"]["patch_size"], method=method,
                                trainer_name=f"{method}PretrainTrainer", pretrain_configuration="3d_fullres", **extra)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import contextlib
    import io

    from nnssl_plugins.planners.api import plan_and_preprocess
    from nnssl_plugins.pretrain.mae_common.config import method_config_from_plans
    from nnssl_plugins.pretrain.hiend_mae import build_model as build_hiend
    from nnssl_plugins.pretrain.mass import build_mass_model

    base = str(tmp_path_factory.mktemp("badtable"))
    mp = pytest.MonkeyPatch()
    build_synthetic(base, 983, [(24, 48, 48)] * 2, monkeypatch=mp, seed=1, labeled=True)  # sets the env vars
    raw, pre = os.environ["nnUNet_raw"], os.environ["nnUNet_preprocessed"]
    make_synthetic_dataset(raw, 990, "Syn", n_cases=3, labeled=True, shape=(24, 28, 32))
    out = {"base": base, "raw": raw, "pre": pre, "results": os.environ["nnUNet_results"], "files": base + "/files"}
    os.makedirs(out["files"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        plan_and_preprocess(SEG, "MASS", "tiny", preprocess=False)
        plan_and_preprocess(SEG, "HiEndMAE", "tiny", preprocess=False)
        plan_and_preprocess(SEG, "MDAE", "tiny")
    plans = {m: json.load(open(os.path.join(pre, SEG, f"nnsslPlans_{m}_tiny.json"))) for m in ("MASS", "HiEndMAE")}
    torch.manual_seed(0)
    mass = build_mass_model(plans["MASS"]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"], 1,
                            patch_size=plans["MASS"]["configurations"]["3d_fullres"]["patch_size"])
    out["mass_ckpt"] = os.path.join(out["files"], "mass.pth")
    torch.save({"network_weights": mass.state_dict(), "nnssl_adaptation_plan": _adaptation(
        plans["MASS"], "MASS", mass={"patch_size": plans["MASS"]["configurations"]["3d_fullres"]["patch_size"]})},
        out["mass_ckpt"])
    hiend = build_hiend(method_config_from_plans(plans["HiEndMAE"], "3d_fullres"), 1)
    out["hiend_ckpt"] = os.path.join(out["files"], "hiend.pth")
    torch.save({"network_weights": hiend.state_dict(), "nnssl_adaptation_plan": _adaptation(plans["HiEndMAE"],
                                                                                            "HiEndMAE")},
               out["hiend_ckpt"])
    # HiEndMAE plans exist but were never preprocessed: the checkpoint/dataset pair is wrong
    shutil.rmtree(os.path.join(pre, SEG, "nnsslPlans_HiEndMAE_tiny_3d_fullres"), ignore_errors=True)
    out["ref_img"] = os.path.join(raw, SEG, "imagesTr", "case00_0000.nii.gz")
    out["ref_seg"] = os.path.join(raw, SEG, "labelsTr", "case00.nii.gz")
    yield out
    mp.undo()


def _new_raw(ws, did, name, files: dict, channels=("CT",), ending=".nii.gz"):
    """A raw dataset with the given {filename: array} images."""
    ds = os.path.join(ws["raw"], f"Dataset{did:03d}_{name}")
    os.makedirs(os.path.join(ds, "imagesTr"))
    for fn, arr in files.items():
        p = os.path.join(ds, "imagesTr", fn)
        if arr is None:
            open(p, "wb").close()
        else:
            write_volume(p, arr)
    json.dump({"channel_names": {str(i): c for i, c in enumerate(channels)}, "file_ending": ending,
               "numTraining": len(files)}, open(os.path.join(ds, "dataset.json"), "w"))
    return ds


def _vol(shape=(16, 18, 20), seed=0):
    return (np.random.RandomState(seed).randn(*shape) * 50 + 100).astype(np.float32)


def _file(ws, name, data: bytes) -> str:
    p = os.path.join(ws["files"], name)
    with open(p, "wb") as f:
        f.write(data)
    return p


# ----------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------
def _empty_image(ws):
    _new_raw(ws, 971, "EmptyFile", {"a_0000.nii.gz": _vol(), "b_0000.nii.gz": None})
    return ["-d", "971", "-m", "MDAE", "--preset", "tiny"]


def _two_d_image(ws):
    _new_raw(ws, 972, "TwoD", {"a_0000.nrrd": _vol(), "flat_0000.nrrd": _vol()[0]}, ending=".nrrd")
    return ["-d", "972", "-m", "MDAE", "--preset", "tiny"]


def _nan_image_pretrain(ws):
    a = _vol()
    a[2, 3, 4] = np.nan
    _new_raw(ws, 973, "NaN", {"ok_0000.nrrd": _vol(), "nan_0000.nrrd": a}, channels=("MR",), ending=".nrrd")
    return ["-d", "973", "-m", "MDAE", "--preset", "tiny", "-device", "cpu"]


def _constant_image(ws):
    _new_raw(ws, 974, "Const", {"ok_0000.nii.gz": _vol(), "flat_0000.nii.gz": np.full((16, 18, 20), 7, np.float32)})
    return ["-d", "974", "-m", "MDAE", "--preset", "tiny"]


def _missing_channel(ws):
    _new_raw(ws, 975, "OneOfTwo", {"a_0000.nii.gz": _vol(), "a_0001.nii.gz": _vol(seed=1), "b_0000.nii.gz": _vol()},
             channels=("T1", "T2"))
    return ["-d", "975", "-m", "MDAE", "--preset", "tiny"]


def _corrupt_b2nd(ws):
    folder = os.path.join(ws["pre"], MASKS, "nnsslPlans_MASS_3d_fullres")
    case = sorted(f for f in os.listdir(folder) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))[0]
    p = os.path.join(folder, case)
    data = open(p, "rb").read()
    os.replace(p, p + ".orig")  # restored by the test after this row
    open(p, "wb").write(data[: len(data) // 2])
    ws["restore"] = (p + ".orig", p)
    return ["-d", "983", "--backend", "slic", "--no-progress"]


def _corrupt_store(ws):
    from nnssl_plugins.pretrain.masks.dataset import PreprocessedDataset

    ds = PreprocessedDataset(983)
    p = ds.store_path("slic", ds.identifiers[0])
    os.makedirs(os.path.dirname(p), exist_ok=True)
    open(p, "wb").write(b"NOT A MASK STORE" * 10)
    ws["remove"] = p
    return ["masks", "-d", "983", "-c", ds.identifiers[0], "-o", os.path.join(ws["files"], "qc.png")]


def _cls_labels(ws):
    # a single class: a classifier cannot be trained
    ds = os.path.join(ws["raw"], SEG)
    json.dump({"case00": 1, "case01": 1, "case02": 1}, open(os.path.join(ds, "classification_labels.json"), "w"))
    ws["remove"] = os.path.join(ds, "classification_labels.json")
    return [os.path.join(BIN, "nnUNetv2_train"), "990", "3d_fullres", "all", "-p", "nnsslPlans_MDAE_tiny", "-tr",
            "nnsslClsTrainer_Frozen", "-device", "cpu"]


def _mdae_plan_without(ws, drop):
    from nnssl_plugins.pretrain.common.adaptation import make_adaptation_plan

    plans = json.load(open(os.path.join(ws["pre"], SEG, "nnsslPlans_MDAE_tiny.json")))
    arch = plans["configurations"]["3d_fullres"]["architecture"]

    plan = make_adaptation_plan(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], plans,
                                1, [32] * 3, method="MDAE")
    for k in drop:
        plan.pop(k)
    return plan


def _malformed_plan(ws):
    p = os.path.join(ws["files"], "noplans.pth")
    torch.save({"network_weights": {}, "nnssl_adaptation_plan": _mdae_plan_without(ws, ["pretrain_plan"])}, p)
    return ["-d", "990", "-ckpt", p, "-pl", "nnsslPlans_Transferred"]


def _truncated_ckpt(ws):
    data = open(ws["mass_ckpt"], "rb").read()
    return ["-d", "990", "-ckpt", _file(ws, "truncated.pth", data[: len(data) // 2]), "-pl", "nnsslPlans_Transferred"]


def _incontext_truncated(ws):
    data = open(ws["mass_ckpt"], "rb").read()
    return ["-ckpt", _file(ws, "trunc_mass.pth", data[:1000]), "-i", ws["ref_img"], "-o",
            os.path.join(ws["files"], "o.nii.gz"), "-r", ws["ref_img"], ws["ref_seg"]]


def _incontext_bad_embedding(ws):
    return ["-ckpt", ws["mass_ckpt"], "-i", ws["ref_img"], "-o", os.path.join(ws["files"], "o.nii.gz"),
            "--embedding", _file(ws, "emb.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")]


def _incontext_empty_reference(ws):
    seg = os.path.join(ws["files"], "empty_seg.nii.gz")
    write_volume(seg, np.zeros((24, 28, 32), np.uint8), (1.5, 1.1, 1.2))
    return ["-ckpt", ws["mass_ckpt"], "-i", ws["ref_img"], "-o", os.path.join(ws["files"], "o.nii.gz"),
            "-r", ws["ref_img"], seg]


def _eval_wrong_dataset(ws):
    return ["-ckpt", ws["hiend_ckpt"], "-d", "990", "-o", os.path.join(ws["files"], "eval"), "-device", "cpu"]


def _sam2_config(ws):
    return ["-d", "983", "--backend", "sam2", "--sam2-checkpoint", _file(ws, "sam2.pt", b"x"), "--sam2-config",
            "configs/sam2.1/sam2.1_hiera_huge.yaml", "--no-progress"]


def _pretrain_gpus_on_cpu(ws):
    _new_raw(ws, 976, "Fresh", {"a_0000.nii.gz": _vol()})
    return ["-d", "976", "-m", "MDAE", "--preset", "tiny", "-device", "cpu", "-num_gpus", "2"]


def _pretrain_bad_trainer(ws):
    return ["-d", "976", "-m", "MDAE", "--preset", "tiny", "-device", "cpu", "-tr", "_doesNotExist"]


CASES = [
    Case("env var unset", "plan_and_preprocess", lambda ws: ["-d", "990", "-m", "MDAE", "--preset", "tiny"],
         ("nnUNet_preprocessed",), ("export",), env={"nnUNet_preprocessed": None}),
    Case("dataset ID garbage", "generate_masks", lambda ws: ["-d", "Task12", "--no-progress"], ("-d Task12",),
         ("DatasetXXX_Name",)),
    Case("target dataset ID unknown", "transfer_plans", lambda ws: ["-d", "777", "-ckpt", ws["mass_ckpt"]],
         ("-d 777",), ("Check the ID",)),
    Case("empty image file", "plan_and_preprocess", _empty_image, ("b_0000.nii.gz",), ("Replace or remove",)),
    Case("2D image", "plan_and_preprocess", _two_d_image, ("flat_0000.nrrd",), ("3D", "Remove")),
    Case("NaN voxel (.nrrd) via nnssl_pretrain", "pretrain", _nan_image_pretrain, ("nan_0000.nrrd", "NaN"),
         ("Fix or remove",)),
    Case("constant image", "plan_and_preprocess", _constant_image, ("flat_0000.nii.gz", "constant"),
         ("remove",)),
    Case("missing channel file", "plan_and_preprocess", _missing_channel, ("case b", "1 channel file"),
         ("b_0001",)),
    Case("corrupt .b2nd", "generate_masks", _corrupt_b2nd, (".b2nd",), ("preprocessing",)),
    Case("corrupt mask store", "visualize", _corrupt_store, ("case_000.nnsslmask", ), ("--overwrite",)),
    Case("adaptation plan lacks pretrain_plan", "transfer_plans", _malformed_plan, ("noplans.pth", "pretrain_plan"),
         ()),
    Case("truncated checkpoint", "transfer_plans", _truncated_ckpt, ("truncated.pth",), ("checkpoint",)),
    Case("truncated checkpoint (in-context)", "incontext_predict", _incontext_truncated, ("trunc_mass.pth",),
         ("checkpoint",)),
    Case("corrupt task embedding", "incontext_predict", _incontext_bad_embedding, ("emb.safetensors",),
         ("Re-create",)),
    Case("constant (empty) reference label map", "incontext_predict", _incontext_empty_reference,
         ("empty_seg.nii.gz", "empty"), ()),
    Case("checkpoint/plans pair: dataset not preprocessed with the ckpt's plans", "eval_reconstruction",
         _eval_wrong_dataset, ("-d 990", "nnsslPlans_HiEndMAE_tiny"), ("nnUNetv2_preprocess",)),
    Case("unknown SAM2 config", "generate_masks", _sam2_config, ("--sam2-config", "hiera_huge"), ()),
    Case("bad --options JSON", "generate_masks", lambda ws: ["-d", "983", "--options", "{scales: 3}", "--no-progress"],
         ("--options",), ("JSON",)),
    Case("bad --shard", "generate_masks", lambda ws: ["-d", "983", "--shard", "2/2", "--no-progress"],
         ("--shard 2/2",), ("0 <= i < N",)),
    Case("-num_gpus 2 on cpu", "pretrain", _pretrain_gpus_on_cpu, ("-num_gpus",), ("-device cuda",)),
    Case("unknown trainer variant", "pretrain", _pretrain_bad_trainer, ("-tr _doesNotExist",), ("_smoke",)),
    Case("classification model missing", "predict_cls",
         lambda ws: ["-i", ws["files"], "-o", os.path.join(ws["files"], "p.csv"), "-d", "990", "-device", "cpu"],
         ("plans.json",), ("-d/-tr/-p",)),
    Case("visualize unknown case", "visualize",
         lambda ws: ["masks", "-d", "983", "-c", "nope", "-o", os.path.join(ws["files"], "x.png")], ("-c nope",), ()),
    # real console scripts
    Case("missing checkpoint (console script)", "nnssl_transfer_plans",
         lambda ws: [os.path.join(BIN, "nnssl_transfer_plans"), "-d", "990", "-ckpt", "/nonexistent/ck.pth"],
         ("/nonexistent/ck.pth",), ("Check the path",), subprocess=True),
    Case("single-class classification labels (stock nnUNetv2_train)", "nnUNetv2_train", _cls_labels,
         ("classification_labels.json",), ("at least two",), subprocess=True, code=1),
]


def _snapshot(root: str) -> set:
    out = set()
    for d, _, files in os.walk(root):
        for f in files:
            out.add(os.path.join(d, f))
    return out


def _run_inprocess(command: str, argv: List[str], capsys):
    from nnssl_plugins.errors import run_cli

    mod = importlib.import_module(f"nnssl_plugins.cli.{command}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: mod.main(argv))
    return e.value.code, capsys.readouterr().err


def _run_subprocess(argv: List[str], env: dict):
    full = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(argv, capture_output=True, text=True, env=full, timeout=300)
    return r.returncode, r.stderr


def test_bad_input_table(ws, capsys, monkeypatch):
    assert len({c.name for c in CASES}) == len(CASES) >= 15
    failures = []
    for case in CASES:
        with monkeypatch.context() as m:
            argv = case.make(ws)
            before = _snapshot(ws["base"])
            for k, v in case.env.items():
                m.delenv(k, raising=False) if v is None else m.setenv(k, v)
            try:
                if case.subprocess:
                    code, err = _run_subprocess(argv, case.env)
                else:
                    code, err = _run_inprocess(case.command, argv, capsys)
            except BaseException as e:  # noqa: BLE001 - a raw exception is a failing row
                import traceback

                failures.append(f"[{case.name}] raised {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
                continue
            finally:
                if "restore" in ws:
                    os.replace(*ws.pop("restore"))
                if "remove" in ws:
                    os.remove(ws.pop("remove"))
            new = sorted(_snapshot(ws["base"]) - before)
        lines = [ln for ln in err.splitlines() if ln.startswith("ERROR: ")]
        problems = []
        if code != case.code:
            problems.append(f"exit code {code}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} ERROR lines")
        if "Traceback" in err:
            problems.append("traceback")
        line = lines[0] if lines else ""
        problems += [f"missing {n!r}" for n in case.needles + case.fix if n not in line]
        if new:
            problems.append(f"new files {new[:4]}")
        if problems:
            failures.append(f"[{case.name}] {'; '.join(problems)}\n    stderr: {err.strip()[-1200:]}")
    assert not failures, "\n".join(failures)
