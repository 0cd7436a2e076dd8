"""Stock nnU-Net trainers, only shorter — for the demo and CPU checks of stock finetuning."""
import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainerNoMirroring,
)


class nnUNetTrainer_nnsslSmoke(nnUNetTrainerNoMirroring):
    """Stock nnUNetTrainerNoMirroring, 2 epochs × 10 iterations: a setup check on any machine. No mirroring
    keeps the final sliding-window validation 8× cheaper on CPU (no test-time mirroring)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 2
