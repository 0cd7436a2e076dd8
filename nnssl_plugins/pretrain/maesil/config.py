"""MAESIL configurations (`arch_kwargs` = Primus plans arch_kwargs, `method` = MAE part)."""
from __future__ import annotations

import copy

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.mae_common.config import PRIMUS_B_ARCH_KWARGS, TINY_ARCH_KWARGS

_METHOD = dict(plane_mask_ratio=0.75, axis_mask_ratio=0.5, si_axis=0, decoder_embed_dim=512, decoder_depth=8,
               decoder_num_heads=16, decoder_mlp_ratio=4.0, norm_pix_loss=False)

# Default: Primus-B encoder (792-d, 12 layers, 12 heads, patch 8^3) on a 128^3 superpatch (4096 tokens).
# (Paper: 768-d ViT; 792 is the closest Primus-B width and loads into nnUNet_Primus_B_Trainer.)
MAESIL_PRIMUS_B_CONFIG = {"arch_kwargs": dict(PRIMUS_B_ARCH_KWARGS, input_shape=[128, 128, 128]),
                          "method": dict(_METHOD)}

# CPU tests: 32^3 superpatch, 8^3 tokens (4^3 grid), 4 blocks of 96-d, decoder 48-d x 2.
MAESIL_TINY_CONFIG = {"arch_kwargs": dict(TINY_ARCH_KWARGS),
                      "method": dict(_METHOD, decoder_embed_dim=48, decoder_depth=2, decoder_num_heads=4)}

CONFIGS = {"primus_b": MAESIL_PRIMUS_B_CONFIG, "tiny": MAESIL_TINY_CONFIG}


def get_config(name: str) -> dict:
    if name not in CONFIGS:
        raise UserInputError(f"MAESIL config '{name}' unknown. Choose one of {sorted(CONFIGS)}.")
    return copy.deepcopy(CONFIGS[name])
