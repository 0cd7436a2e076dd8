"""Helpers of the interop tests (tests/test_interop_*.py).

* `run_with_peer(peer, code, args)`: run `code` in a fresh interpreter with an upstream snapshot from
  ../shared/peers first on sys.path (DKFZ nnssl: `NNSSL`, nnU-Net master: `NNUNET_MASTER`); the code reads its
  arguments from `ARGS` and reports with `report(dict)`; the dict comes back.
* `nnunet_workspace(root)`: nnUNet_raw / _preprocessed / _results under `root`, set in os.environ.
* `our_checkpoint(...)`: a checkpoint written by our real pretraining trainer (`initialize()` +
  `save_checkpoint()`, no iterations: the layout is what matters, not trained values).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import SHARED_DATA

PEERS = os.path.join(os.path.dirname(SHARED_DATA), "peers")
NNSSL = os.path.join(PEERS, "nnssl", "src")
NNUNET_MASTER = os.path.join(PEERS, "nnUNet")

_PRELUDE = """
import json, os, sys
sys.path.insert(0, {peer!r})
ARGS = json.loads(sys.argv[1])
def report(d):
    print("INTEROP_RESULT " + json.dumps(d))
"""


def run_with_peer(peer: str, code: str, args: dict, timeout: int = 600, env: dict = None) -> dict:
    assert os.path.isdir(peer), f"upstream snapshot missing: {peer} (the shared/ folder must sit beside the repo)"
    script = _PRELUDE.format(peer=peer) + textwrap.dedent(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0", "nnUNet_compile": "false", **(env or {})}
    r = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"peer run failed ({peer}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("INTEROP_RESULT ")]
    assert lines, f"peer run reported nothing:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(lines[-1][len("INTEROP_RESULT "):])


def nnunet_workspace(root: str) -> dict:
    paths = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        paths[name] = os.path.join(root, name)
        os.makedirs(paths[name], exist_ok=True)
        os.environ[name] = paths[name]
    return paths


PRETRAIN_TRAINERS = {"MDAE": "MDAEPretrainTrainer", "MASS": "MASSPretrainTrainer",
                     "HiEndMAE": "HiEndMAEPretrainTrainer", "MAESIL": "MAESILPretrainTrainer"}


def our_checkpoint(dataset_id: int, method: str, preset: str, path: str, patch_size=None) -> str:
    """Plan + preprocess `dataset_id` for `method`, build its pretraining trainer, write checkpoint `path`."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    import nnssl_plugins.trainers as trainers
    from nnssl_plugins.planners.api import plan_and_preprocess

    plans_name = plan_and_preprocess(dataset_id, method, preset, patch_size=patch_size)
    pre = os.path.join(os.environ["nnUNet_preprocessed"], maybe_convert_to_dataset_name(dataset_id))
    plans = load_json(os.path.join(pre, plans_name + ".json"))
    plans["continue_training"] = False  # nnU-Net's run_training puts it there; nnUNetTrainer pops it
    trainer = getattr(trainers, PRETRAIN_TRAINERS[method])(plans, "3d_fullres", 0,
                                                          load_json(os.path.join(pre, "dataset.json")),
                                                          device=torch.device("cpu"))
    torch.manual_seed(0)
    trainer.initialize()
    trainer.save_checkpoint(path)
    return path
