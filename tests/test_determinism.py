"""Same seed → same run. Masks: test_masks_resume.py::test_sigkill_then_rerun_equals_uninterrupted already
checks that a regenerated SLIC store is byte-identical to an uninterrupted run (same --seed).

Here: for each method (MDAE, MASS, HiEndMAE, MAESIL) the trainer is built twice in-process with the same
`nnssl_seed`, and the first training step gives the identical loss (network init, DataLoader case choice, crops,
augmentation, corruption/masking); a different seed gives a different loss. Single-threaded augmentation
(nnUNet_n_proc_DA=0, set by conftest).
"""
from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch

from conftest import make_synthetic_dataset

METHODS = ("MDAE", "MASS", "HiEndMAE", "MAESIL")


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from nnssl_plugins.cli.generate_masks import main as gen_main
    from nnssl_plugins.planners.api import plan_and_preprocess

    base = tmp_path_factory.mktemp("determinism")
    mp = pytest.MonkeyPatch()
    for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (base / n).mkdir()
        mp.setenv(n, str(base / n))
    mp.setenv("nnUNet_n_proc_DA", "0")
    make_synthetic_dataset(str(base / "nnUNet_raw"), 993, "Det", n_cases=3, labeled=False, shape=(24, 28, 32))
    plans = {}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for m in METHODS:
            plans[m] = plan_and_preprocess(993, m, "tiny")
        gen_main(["-d", "993", "-p", plans["MASS"], "--backend", "slic", "--options", '{"scales_mm": [15]}',
                  "--no-progress"])
    yield plans
    mp.undo()


def _first_loss(method: str, plans_name: str, seed: int, monkeypatch) -> float:
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnssl_plugins.cli.trainer_path import ensure_trainer_discovery

    ensure_trainer_discovery()
    monkeypatch.setenv("nnssl_seed", str(seed))
    with contextlib.redirect_stdout(io.StringIO()):
        tr = get_trainer_from_args("993", "3d_fullres", "all", f"{method}PretrainTrainer", plans_name,
                                   device=torch.device("cpu"))
        tr.on_train_start()
        tr.on_train_epoch_start()
        out = tr.train_step(next(tr.dataloader_train))
    return out["loss"]


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_first_loss(planned, method, monkeypatch):
    torch.set_num_threads(1)
    a = _first_loss(method, planned[method], 7, monkeypatch)
    torch.manual_seed(123)  # global state left over from elsewhere must not matter
    b = _first_loss(method, planned[method], 7, monkeypatch)
    assert a == b, (method, a, b)
    if method == "MDAE":
        c = _first_loss(method, planned[method], 8, monkeypatch)
        assert c != a


def test_rank_seeds_differ_and_bad_seed_is_user_error(monkeypatch):
    from nnssl_plugins.errors import UserInputError
    from nnssl_plugins.trainers.pretrain_base import nnsslPretrainTrainer, rank_seed

    seeds = {rank_seed(0, r, s) for r in range(8) for s in range(30)}
    assert len(seeds) == 8 * 30
    monkeypatch.setenv("nnssl_seed", "abc")
    with pytest.raises(UserInputError, match="nnssl_seed"):
        nnsslPretrainTrainer.effective_seed(type("T", (), {"seed": None})())
