"""MAESIL pretraining (model, dual masking, loss, PSNR/SSIM)."""
from nnssl_plugins.pretrain.maesil.config import CONFIGS, MAESIL_PRIMUS_B_CONFIG, MAESIL_TINY_CONFIG, get_config
from nnssl_plugins.pretrain.maesil.masking import dual_mask, find_si_axis
from nnssl_plugins.pretrain.mae_common.metrics import psnr, ssim3d
from nnssl_plugins.pretrain.maesil.model import MAESIL, build_model, compute_loss, reconstruction_metrics
from nnssl_plugins.pretrain.mae_common.optim import configure_optimizer
from nnssl_plugins.pretrain.mae_common.pictures import save_pictures_from_logs

__all__ = ["CONFIGS", "MAESIL_PRIMUS_B_CONFIG", "MAESIL_TINY_CONFIG", "get_config", "dual_mask", "find_si_axis",
           "psnr", "ssim3d", "MAESIL", "build_model", "compute_loss", "reconstruction_metrics",
           "configure_optimizer", "save_pictures_from_logs"]
