"""Hi-End-MAE configurations (plain dicts: `arch_kwargs` = Primus plans arch_kwargs, `method` = MAE part)
and the preprocessing / optimisation facts of the paper for the planner and trainer."""
from __future__ import annotations

import copy

from nnssl_plugins.pretrain.mae_common.config import PRIMUS_B_ARCH_KWARGS, TINY_ARCH_KWARGS

# Paper-faithful "ViT-B/12(1536)": width 1536, 12 layers, 16 heads, patch 12^3, input 96^3 (plain ViT blocks:
# no layer-scale, no inner attention norm). Note: a downstream stock Primus cannot use patch 12^3 (its
# PatchDecode needs power-of-two patch sizes), so transfer this one only into your own ViT/Primus variant.
HIEND_PAPER_CONFIG = {
    "arch_kwargs": dict(embed_dim=1536, patch_embed_size=[12, 12, 12], eva_depth=12, eva_numheads=16,
                        input_shape=[96, 96, 96], drop_path_rate=0.0, scale_attn_inner=False, init_values=None),
    "method": dict(mask_ratio=0.75, decoder_embed_dim=528, decoder_num_heads=16, decoder_self_depth=2,
                   decoder_mlp_ratio=4.0, attend_layers=[9, 6, 3], norm_pix_loss=True),
}

# Loads into stock nnUNet_Primus_B_Trainer (792-d, 12 layers, 12 heads, patch 8^3). Input 96^3 (paper crop
# size at 1.5 mm); the planner may change input_shape (multiples of 8).
HIEND_PRIMUS_B_CONFIG = {
    "arch_kwargs": dict(PRIMUS_B_ARCH_KWARGS, input_shape=[96, 96, 96]),
    "method": dict(mask_ratio=0.75, decoder_embed_dim=528, decoder_num_heads=16, decoder_self_depth=2,
                   decoder_mlp_ratio=4.0, attend_layers=[9, 6, 3], norm_pix_loss=True),
}

# CPU tests: 32^3 input, patch 8^3 (64 tokens, 16 visible), 4 blocks of 96-d; attends blocks 2, 1, 0.
HIEND_TINY_CONFIG = {
    "arch_kwargs": dict(TINY_ARCH_KWARGS),
    "method": dict(mask_ratio=0.75, decoder_embed_dim=48, decoder_num_heads=4, decoder_self_depth=2,
                   decoder_mlp_ratio=4.0, attend_layers=[2, 1, 0], norm_pix_loss=True),
}

CONFIGS = {"paper": HIEND_PAPER_CONFIG, "primus_b": HIEND_PRIMUS_B_CONFIG, "tiny": HIEND_TINY_CONFIG}

# Facts for the planner (paper / official code)
PREPROCESSING = dict(modality="CT", clip=(-175.0, 250.0), rescale_to=(0.0, 1.0), target_spacing=(1.5, 1.5, 1.5))
OPTIMIZER = dict(name="AdamW", lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, schedule="warmup+cosine")


def get_config(name: str) -> dict:
    from nnssl_plugins.errors import UserInputError

    if name not in CONFIGS:
        raise UserInputError(f"Hi-End-MAE config '{name}' unknown. Choose one of {sorted(CONFIGS)}.")
    return copy.deepcopy(CONFIGS[name])
