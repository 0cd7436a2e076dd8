"""Shared MAE machinery for Hi-End-MAE and MAESIL: visible-only Primus encoder, masks, decoder
blocks, masked (per-patch normalised) MSE, reconstruction pictures, optimizer/schedule."""
from nnssl_plugins.pretrain.mae.config import (
    PRIMUS_B_ARCH_KWARGS, PRIMUS_CLASS_NAME, TINY_ARCH_KWARGS, primus_arch_kwargs, validate_arch_kwargs,
    with_input_shape,
)
from nnssl_plugins.pretrain.mae.encoder import PrimusMAEBackbone
from nnssl_plugins.pretrain.mae.losses import masked_mse, patchify, reconstruction_volumes, unpatchify
from nnssl_plugins.pretrain.mae.masking import mask_to_indices, random_token_mask
from nnssl_plugins.pretrain.mae.optim import WarmupCosineLRScheduler, configure_optimizer
from nnssl_plugins.pretrain.mae.pictures import save_pictures_from_logs, save_reconstruction_png

__all__ = [
    "PRIMUS_B_ARCH_KWARGS", "PRIMUS_CLASS_NAME", "TINY_ARCH_KWARGS", "primus_arch_kwargs",
    "validate_arch_kwargs", "with_input_shape", "PrimusMAEBackbone", "masked_mse", "patchify",
    "reconstruction_volumes", "unpatchify", "mask_to_indices", "random_token_mask",
    "WarmupCosineLRScheduler", "configure_optimizer", "save_pictures_from_logs", "save_reconstruction_png",
]
