"""Stock nnU-Net trainers, only shorter — for the demo and CPU checks of stock finetuning."""
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainerNoMirroring,
)

from nnssl_plugins.trainers.smoke import nnsslSmokeRun


class nnUNetTrainer_nnsslSmoke(nnsslSmokeRun, nnUNetTrainerNoMirroring):
    """Stock nnUNetTrainerNoMirroring, smoke run length: a setup check on any machine. No mirroring keeps the
    final sliding-window validation 8× cheaper on CPU (no test-time mirroring)."""
