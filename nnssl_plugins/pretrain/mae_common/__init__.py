"""Shared ViT-MAE machinery — not a method of its own. Used by Hi-End-MAE (pretrain/hiend_mae) and MAESIL
(pretrain/maesil): visible-only Primus encoder, token masks, decoder blocks, masked (per-patch normalised) MSE,
reconstruction metrics (PSNR, 3D SSIM) and pictures, the config dict format {arch_kwargs, method} and how it is
read from plans, optimizer/schedule. It imports no method package."""
from nnssl_plugins.pretrain.mae_common.config import (
    PRIMUS_B_ARCH_KWARGS, PRIMUS_CLASS_NAME, TINY_ARCH_KWARGS, method_config_from_plans, primus_arch_kwargs,
    validate_arch_kwargs, with_input_shape,
)
from nnssl_plugins.pretrain.mae_common.encoder import PrimusMAEBackbone
from nnssl_plugins.pretrain.mae_common.loss import masked_mse, patchify, reconstruction_volumes, unpatchify
from nnssl_plugins.pretrain.mae_common.masking import mask_to_indices, random_token_mask
from nnssl_plugins.pretrain.mae_common.metrics import psnr, ssim3d
from nnssl_plugins.pretrain.mae_common.optim import WarmupCosineLRScheduler, configure_optimizer
from nnssl_plugins.pretrain.mae_common.pictures import save_pictures_from_logs, save_reconstruction_png

__all__ = [
    "PRIMUS_B_ARCH_KWARGS", "PRIMUS_CLASS_NAME", "TINY_ARCH_KWARGS", "method_config_from_plans", "primus_arch_kwargs",
    "validate_arch_kwargs", "with_input_shape", "PrimusMAEBackbone", "masked_mse", "patchify",
    "reconstruction_volumes", "unpatchify", "mask_to_indices", "random_token_mask", "psnr", "ssim3d",
    "WarmupCosineLRScheduler", "configure_optimizer", "save_pictures_from_logs", "save_reconstruction_png",
]
