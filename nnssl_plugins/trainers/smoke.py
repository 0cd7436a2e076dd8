"""The `_smoke` run length, once: 2 epochs × 10 iterations (2 validation iterations) — a setup check that
runs on any machine. Every `*_smoke` trainer is `class X_smoke(nnsslSmokeRun, X)`."""
from __future__ import annotations

import torch

#: (num_epochs, num_iterations_per_epoch, num_val_iterations_per_epoch)
SMOKE_RUN_LENGTH = (2, 10, 2)


class nnsslSmokeRun:
    """Mix in before any nnUNetTrainer class. The explicit __init__ signature is nnU-Net's: it records the
    init arguments by inspecting it."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = SMOKE_RUN_LENGTH
