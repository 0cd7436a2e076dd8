"""Hi-End-MAE planner: 1.5 mm isotropic, CT clipped to [−175, 250] HU and scaled to [0, 1] (paper /
official code), other modalities z-score; Primus plans as in planners/mae_base.py.

Presets
  default  Primus-B (792-d, 12 layers, 12 heads, patch 8³), input 96³ (the paper's crop at 1.5 mm):
           loads into stock `nnUNet_Primus_B_Trainer` (needs a patch divisible by 8 and a power-of-two token).
  paper    ViT-B/12(1536): width 1536, 12 layers, 16 heads, patch 12³, input 96³ (official encoder; plain
           ViT blocks). Stock Primus' PatchDecode cannot decode 12³ tokens → finetune with
           nnsslPrimusFinetuneTrainer (factorised decoder), not the stock Primus trainers.
  tiny     4 layers, 96-d, patch 8³, input 32³ (CPU smoke runs).
"""
from nnssl_plugins.planners.mae_base import PrimusMAEPlanner, mae_preset
from nnssl_plugins.pretrain.hiend_mae.config import HIEND_PAPER_CONFIG, HIEND_PRIMUS_B_CONFIG, HIEND_TINY_CONFIG


class HiEndMAEPlanner(PrimusMAEPlanner):
    method = "HiEndMAE"
    target_spacing = (1.5, 1.5, 1.5)
    ct_window = (-175.0, 250.0)
    presets = {
        "default": mae_preset(HIEND_PRIMUS_B_CONFIG, [96, 96, 96], 4),
        "paper": mae_preset(HIEND_PAPER_CONFIG, [96, 96, 96], 4),
        "tiny": mae_preset(HIEND_TINY_CONFIG, [32, 32, 32], 2),
    }
