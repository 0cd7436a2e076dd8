"""Our checkpoints in the upstream code, run from ../shared/peers in subprocesses (nothing copied):

* DKFZ nnssl: `AdaptationPlan.from_dict` + `AbstractBaseTrainer.verify_adaptation_plans` (it rebuilds the
  downstream network from the plan and strict-loads stem and encoder from the checkpoint);
* nnU-Net master: `preprocess_like_nnssl` + `PretrainedTrainer` / `PretrainedTrainer_Primus[x]` build the network
  and load every stem/encoder tensor unchanged;
* our trainers import (and are found by name) with nnU-Net master first on sys.path.

Checkpoints: written by our real pretraining trainers (initialize + save_checkpoint) for the ResEnc methods (MDAE,
MASS tiny), a Primus that is no named preset (MAESIL tiny: 96-d, 4 layers) and the default Primus-B (Hi-End-MAE
default preset, patch 32³ to stay small on CPU).
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import make_synthetic_dataset
from interop_peers import NNSSL, NNUNET_MASTER, nnunet_workspace, our_checkpoint, run_with_peer

CASES = {  # name: (method, preset, patch size)
    "MDAE_tiny": ("MDAE", "tiny", None),
    "MASS_tiny": ("MASS", "tiny", None),
    "MAESIL_tiny": ("MAESIL", "tiny", None),
    "HiEndMAE_PrimusB": ("HiEndMAE", "default", [32, 32, 32]),
}


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Workspace with an unlabeled pretraining dataset (990), a labeled target (991) and our checkpoints."""
    root = str(tmp_path_factory.mktemp("interop_upstream"))
    mp = pytest.MonkeyPatch()
    saved = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    paths = nnunet_workspace(root)
    make_synthetic_dataset(paths["nnUNet_raw"], 990, "Unlab", n_cases=2)
    make_synthetic_dataset(paths["nnUNet_raw"], 991, "Target", n_cases=3, labeled=True, seed=1)
    ckpts = {name: our_checkpoint(990, m, preset, os.path.join(root, f"{name}.pth"), patch_size=ps)
             for name, (m, preset, ps) in CASES.items()}
    yield dict(paths, root=root, ckpts=ckpts)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    mp.undo()


# ------------------------------------------------------------------------------------------------------------
# DKFZ nnssl
# ------------------------------------------------------------------------------------------------------------
NNSSL_CHECK = """
import copy, torch
from nnssl.adaptation_planning.adaptation_plan import AdaptationPlan
from nnssl.training.nnsslTrainer.AbstractTrainer import AbstractBaseTrainer

results = {"nnssl_file": sys.modules[AdaptationPlan.__module__].__file__}
for name, job in ARGS["jobs"].items():
    ck = torch.load(job["ckpt"], weights_only=True)
    plan = ck["nnssl_adaptation_plan"]
    config = next(iter(plan["pretrain_plan"]["configurations"]))
    weights = {k: v for k, v in ck["network_weights"].items() if not k.startswith(job.get("drop_prefix") or "-")}
    out = results[name] = {}
    try:
        ap = AdaptationPlan.from_dict(copy.deepcopy(plan))
        out["from_dict"] = "ok"
        out["arch_class_name"] = ap.architecture_plans.arch_class_name
        out["pretrain_patch_size"] = list(ap.pretrain_plan.configurations[config].patch_size)
        AbstractBaseTrainer.verify_adaptation_plans(copy.deepcopy(plan), config, weights)
        out["verify"] = "ok"
    except Exception as e:  # the upstream verdict is the measurement
        out["error"] = type(e).__name__ + ": " + str(e)[:300]
report(results)
"""


@pytest.fixture(scope="module")
def nnssl_verdicts(ours):
    """nnssl's AdaptationPlan.from_dict + verify_adaptation_plans on each checkpoint (one subprocess)."""
    jobs = {name: {"ckpt": path} for name, path in ours["ckpts"].items()}
    # control: the oracle can fail -- the MDAE checkpoint without one encoder block
    jobs["MDAE_tiny_without_block"] = {"ckpt": ours["ckpts"]["MDAE_tiny"], "drop_prefix": "encoder.stages.1.blocks.0."}
    res = run_with_peer(NNSSL, NNSSL_CHECK, {"jobs": jobs})
    assert res.pop("nnssl_file").startswith(NNSSL)
    return res


@pytest.mark.parametrize("name,arch", [("MDAE_tiny", "ResidualEncoderUNet"), ("MASS_tiny", "ResidualEncoderUNet"),
                                       ("HiEndMAE_PrimusB", "PrimusB")])
def test_nnssl_parses_and_verifies_our_checkpoint(nnssl_verdicts, name, arch):
    res = nnssl_verdicts[name]
    assert res.get("error") is None, res
    assert res["from_dict"] == res["verify"] == "ok"
    assert res["arch_class_name"] == arch and res["pretrain_patch_size"] == [32, 32, 32]


def test_nnssl_verify_fails_when_an_encoder_tensor_is_missing(nnssl_verdicts):
    res = nnssl_verdicts["MDAE_tiny_without_block"]
    assert res["from_dict"] == "ok" and "verify" not in res
    assert res["error"].startswith("RuntimeError") and "Missing key(s)" in res["error"], res


def test_nnssl_cannot_describe_a_primus_that_is_no_named_preset(nnssl_verdicts):
    """nnssl knows the Primus presets S/B/M/L only (DynamicArchitecturePlans has CNN fields): our tiny Primus is
    written for nnU-Net master's PretrainedTrainer_Primusx (encoder_eva_* kwargs), which nnssl rejects."""
    res = nnssl_verdicts["MAESIL_tiny"]
    assert "from_dict" not in res
    assert res["error"].startswith("TypeError") and "embed_dim" in res["error"], res


def test_plan_layout(ours):
    """nnssl's fields with nnssl shapes; our full nnU-Net plans beside them; loads with weights_only=True."""
    plans = {}
    for name, path in ours["ckpts"].items():
        plans[name] = torch.load(path, weights_only=True)["nnssl_adaptation_plan"]
    for name, p in plans.items():
        cfg_name = p["pretrain_configuration"]
        assert list(p["pretrain_plan"]["configurations"]) == [cfg_name] == ["3d_fullres"]
        nn_cfg = p["nnunet_plans"]["configurations"][cfg_name]
        ssl_cfg = p["pretrain_plan"]["configurations"][cfg_name]
        assert ssl_cfg["patch_size"] == nn_cfg["patch_size"] == p["recommended_downstream_patchsize"]
        assert ssl_cfg["spacing"] == nn_cfg["spacing"]
        assert ssl_cfg["spacing_style"] == ("onemmiso" if nn_cfg["spacing"] == [1.0, 1.0, 1.0] else "fixed")
        assert ssl_cfg["normalization_schemes"] == nn_cfg["normalization_schemes"]
        assert ssl_cfg["resampling_fn_mask_kwargs"] == nn_cfg["resampling_fn_seg_kwargs"]
        assert "foreground_intensity_properties_per_channel" in p["nnunet_plans"]
    assert plans["MDAE_tiny"]["pretrain_plan"]["configurations"]["3d_fullres"]["spacing_style"] == "onemmiso"
    assert plans["MAESIL_tiny"]["pretrain_plan"]["configurations"]["3d_fullres"]["spacing_style"] == "fixed"
    assert plans["MDAE_tiny"]["architecture_plans"]["arch_kwargs"] == \
        plans["MDAE_tiny"]["nnunet_plans"]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert plans["HiEndMAE_PrimusB"]["architecture_plans"] == {
        "arch_class_name": "PrimusB", "arch_kwargs": None, "arch_kwargs_requiring_import": None}
    tiny = plans["MAESIL_tiny"]["architecture_plans"]
    assert tiny["arch_class_name"] == "Primus"
    assert (tiny["arch_kwargs"]["encoder_eva_depth"], tiny["arch_kwargs"]["encoder_eva_numheads"]) == (4, 4)


# ------------------------------------------------------------------------------------------------------------
# nnU-Net master
# ------------------------------------------------------------------------------------------------------------
MASTER_LOAD = """
import torch
import nnunetv2
assert nnunetv2.__file__.startswith(ARGS["master"]), nnunetv2.__file__
from batchgenerators.utilities.file_and_folder_operations import load_json, join, save_json
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess_dataset
from nnunetv2.experiment_planning.like_nnssl import preprocess_like_nnssl
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.pretraining.pretrainedTrainer import PretrainedTrainer, PretrainedTrainer_Primus
from nnunetv2.training.nnUNetTrainer.pretraining.thrp_primusx_finetuning import PretrainedTrainer_Primusx
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

TRAINERS = {"PretrainedTrainer": PretrainedTrainer, "PretrainedTrainer_Primus": PretrainedTrainer_Primus,
            "PretrainedTrainer_Primusx": PretrainedTrainer_Primusx}
ds = "Dataset991_Target"
extract_fingerprints([991], num_processes=1)  # the target is planned normally first (like_nnssl needs its plans)
plan_experiments([991])


def load_into(name, plans, pre):
    plans = dict(plans, continue_training=False)  # as run_training_from_pretrained sets it
    tr = TRAINERS[name](plans, "3d_fullres", 0, load_json(join(nnUNet_preprocessed, ds, "dataset.json")),
                        torch.device("cpu"))
    tr.initialize()
    sd = tr.network.state_dict()
    return {"class": type(tr.network).__name__, "n": len(pre),
            "equal": sum(k in sd and torch.equal(sd[k], v) for k, v in pre.items()),
            "differ": [k for k, v in pre.items() if not (k in sd and torch.equal(sd[k], v))][:5]}


def case00(plans):  # mean, std, min, max of a preprocessed target image
    folder = join(nnUNet_preprocessed, ds, plans["configurations"]["3d_fullres"]["data_identifier"])
    data = infer_dataset_class(folder)(folder).load_case("case00")[0][:]
    return [float(data.mean()), float(data.std()), float(data.min()), float(data.max())]


results = {}
for job in ARGS["jobs"]:
    preprocess_like_nnssl(991, job["name"], job["ckpt"], "like_pretrained", None, 1, False)
    pl = [f for f in os.listdir(join(nnUNet_preprocessed, ds)) if f.startswith("ptPlans__" + job["name"] + "____")]
    plans = load_json(join(nnUNet_preprocessed, ds, pl[0]))
    cfg = plans["configurations"]["3d_fullres"]
    ck = torch.load(job["ckpt"], weights_only=True)
    ap = ck["nnssl_adaptation_plan"]
    prefixes = (ap["key_to_stem"] + ".", ap["key_to_encoder"] + ".")
    pre = {k: v for k, v in ck["network_weights"].items() if k.startswith(prefixes)}
    out = results[job["name"]] = {"normalization_schemes": cfg["normalization_schemes"], "spacing": cfg["spacing"],
                                  "patch_size": cfg["patch_size"]}
    for name in job["trainers"]:
        out[name] = load_into(name, plans, pre)
    if job["keep_norm"]:
        # docs/interop.md, "Keeping the pretraining normalisation" on the upstream trainers
        src = ap["nnunet_plans"]
        kplans = load_json(join(nnUNet_preprocessed, ds, pl[0]))
        kcfg = kplans["configurations"]["3d_fullres"]
        kcfg["normalization_schemes"] = src["configurations"][ap["pretrain_configuration"]]["normalization_schemes"]
        kplans["foreground_intensity_properties_per_channel"] = src["foreground_intensity_properties_per_channel"]
        kplans["plans_name"] += "__pretrain_norm"
        kcfg["data_identifier"] += "__pretrain_norm"
        save_json(kplans, join(nnUNet_preprocessed, ds, kplans["plans_name"] + ".json"))
        preprocess_dataset(991, kplans["plans_name"], ("3d_fullres",), (1,))
        t = job["trainers"][0]
        out["keep_norm"] = {"normalization_schemes": kcfg["normalization_schemes"], "zscore_case00": case00(plans),
                            "pretrain_norm_case00": case00(kplans), t: load_into(t, kplans, pre)}

# our trainers on master: imported, subclasses of master's nnUNetTrainer, found by name through nnUNet_extTrainer
import nnssl_plugins.trainers as T
from nnssl_plugins.cli.trainer_path import ensure_trainer_discovery

ensure_trainer_discovery()  # what our .pth hook does at interpreter start
found = recursive_find_trainer_class_by_name("nnsslPrimusFinetuneTrainer")
results["our_trainers"] = {
    "trainers": sorted(n for n, c in vars(T).items() if isinstance(c, type) and issubclass(c, nnUNetTrainer)),
    "found": found.__name__, "master_base": issubclass(found, nnUNetTrainer)}
report(results)
"""

MASTER_JOBS = [  # (checkpoint, master's trainers that must load it, the network they build, normalisation recipe)
    ("MDAE_tiny", ["PretrainedTrainer"], "ResidualEncoderUNet", False),
    ("MAESIL_tiny", ["PretrainedTrainer_Primusx"], "Primus", False),
    ("HiEndMAE_PrimusB", ["PretrainedTrainer_Primus", "PretrainedTrainer_Primusx"], "PrimusB", True),
]


@pytest.fixture(scope="module")
def master_results(ours):
    jobs = [{"name": n, "ckpt": ours["ckpts"][n], "trainers": t, "keep_norm": k} for n, t, _, k in MASTER_JOBS]
    # nnU-Net's planner sets torch threads to nnUNet_n_proc_DA (0 is invalid there)
    return run_with_peer(NNUNET_MASTER, MASTER_LOAD, {"master": NNUNET_MASTER, "jobs": jobs},
                         env={"nnUNet_n_proc_DA": "1"})


@pytest.mark.parametrize("name,trainers,network,keep_norm", MASTER_JOBS)
def test_nnunet_master_pretrained_trainers_load_our_checkpoint(ours, master_results, name, trainers, network,
                                                               keep_norm):
    res = master_results[name]
    for t in trainers:
        assert res[t]["class"] == network
        assert res[t]["n"] > 20 and res[t]["equal"] == res[t]["n"], res[t]
    # the upstream path re-normalises with Z-score (docs/interop.md): our checkpoints were pretrained with CT norm
    assert res["normalization_schemes"] == ["ZScoreNormalization"]
    pre_cfg = torch.load(ours["ckpts"][name], weights_only=True)["nnssl_adaptation_plan"]["pretrain_plan"][
        "configurations"]["3d_fullres"]
    assert res["spacing"] == pre_cfg["spacing"] and res["patch_size"] == pre_cfg["patch_size"] == [32, 32, 32]
    if keep_norm:  # the recipe of docs/interop.md: the checkpoint's normalisation and statistics, same trainer
        k = res["keep_norm"]
        assert k["normalization_schemes"] == pre_cfg["normalization_schemes"] == ["CTNormalization"]
        assert k[trainers[0]]["equal"] == k[trainers[0]]["n"] == res[trainers[0]]["n"]
        z, ct = k["zscore_case00"], k["pretrain_norm_case00"]
        assert abs(z[0]) < 0.05 and abs(z[1] - 1) < 0.05 and z[2] < -1  # Z-score: each image by its own stats
        # Hi-End-MAE's pretraining window: CT clipped to [-175, 250] HU and scaled to [0, 1]
        assert 0 <= ct[2] and ct[3] <= 1 + 1e-6 and 0.2 < ct[0] < 0.8, ct


def test_our_trainers_import_on_nnunet_master(master_results):
    res = master_results["our_trainers"]
    assert res["found"] == "nnsslPrimusFinetuneTrainer" and res["master_base"]
    for t in ("MDAEPretrainTrainer", "MASSPretrainTrainer", "HiEndMAEPretrainTrainer", "MAESILPretrainTrainer",
              "nnsslFinetuneTrainer", "nnsslPrimusFinetuneTrainer", "nnsslClsTrainer_Frozen"):
        assert t in res["trainers"]
