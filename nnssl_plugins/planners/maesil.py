"""MAESIL planner: 128³ superpatch of 8³ tokens on a Primus-B encoder (792-d, 12 layers, 12 heads).

Spacing 1.5 mm isotropic: the paper states none. 1.5 mm makes a 128³ superpatch cover 19.2 cm — most of an
abdomen/thorax cross-section, which the axis-wise masking (50 % contiguous S–I slices) needs to be a
non-trivial task — and matches Hi-End-MAE and MASS (same preprocessed data can serve all three).
CT intensities: clip [−1000, 1000] HU → [0, 1] (again not stated by the paper; a wide window because its data
include lung CT (LIDC-IDRI), and a [0, 1] range makes PSNR/SSIM data_range = 1 well defined); other modalities
z-score. Presets: `default` (Primus-B, 128³, loads into stock nnUNet_Primus_B_Trainer with a 128³ patch) and
`tiny` (4 layers, 96-d, 32³). Method settings (plane/axis mask ratios, decoder) in plans["nnssl"]["settings"].
"""
from nnssl_plugins.planners.mae_base import PrimusMAEPlanner, mae_preset
from nnssl_plugins.pretrain.maesil.config import MAESIL_PRIMUS_B_CONFIG, MAESIL_TINY_CONFIG


class MAESILPlanner(PrimusMAEPlanner):
    method = "MAESIL"
    target_spacing = (1.5, 1.5, 1.5)
    ct_window = (-1000.0, 1000.0)
    presets = {
        "default": mae_preset(MAESIL_PRIMUS_B_CONFIG, [128, 128, 128], 2),
        "tiny": mae_preset(MAESIL_TINY_CONFIG, [32, 32, 32], 2),
    }
