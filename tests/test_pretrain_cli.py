"""nnssl_pretrain: plans + preprocesses when needed, trains, and a rerun after SIGKILL resumes."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import torch

from conftest import BIN, make_synthetic_dataset, run_cmd

TRAINER = '''
from nnssl_plugins.trainers.mdae import MDAEPretrainTrainer

class MDAEPretrainTrainer_resumeTest(MDAEPretrainTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 4, 4, 1
        # 4 epochs: checkpoint_latest after every epoch
'''


def test_pretrain_kill_and_resume(nnunet_env, test_trainer_dir):
    with open(os.path.join(test_trainer_dir, "nnssl_resume_trainer.py"), "w") as f:
        f.write(TRAINER)
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, "Unlab", n_cases=2)
    cmd = [os.path.join(BIN, "nnssl_pretrain"), "-d", "990", "-m", "MDAE", "--preset", "tiny",
           "-tr", "MDAEPretrainTrainer_resumeTest", "-device", "cpu"]
    out = os.path.join(nnunet_env["nnUNet_results"], "Dataset990_Unlab",
                       "MDAEPretrainTrainer_resumeTest__nnsslPlans_MDAE_tiny__3d_fullres", "fold_all")
    latest = os.path.join(out, "checkpoint_latest.pth")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while not os.path.isfile(latest) and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert os.path.isfile(latest), "no checkpoint_latest.pth appeared before the kill"
    assert not os.path.isfile(os.path.join(out, "checkpoint_final.pth"))
    ck = torch.load(latest, weights_only=True)  # atomic save: never a truncated file
    done_epochs = ck["current_epoch"]
    assert 1 <= done_epochs < 4

    r = run_cmd(cmd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "already preprocessed" in r.stdout and "resuming" in r.stdout
    final = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=True)
    assert final["current_epoch"] == 4
    assert len(final["logging"]["train_losses"]) == 4
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # a save interrupted by the kill is cleaned up
    # a third run sees the finished job and does nothing
    r = run_cmd(cmd)
    assert r.returncode == 0 and "Already finished" in r.stdout
