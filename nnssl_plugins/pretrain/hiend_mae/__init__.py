"""Hi-End-MAE pretraining (model + loss). A trainer's train_step:

    loss, logs = compute_loss(model, batch["data"])
    optimizer.zero_grad(); loss.backward(); clip_grad_norm_(...); optimizer.step()
"""
from nnssl_plugins.pretrain.hiend_mae.config import (
    CONFIGS, HIEND_PAPER_CONFIG, HIEND_PRIMUS_B_CONFIG, HIEND_TINY_CONFIG, OPTIMIZER, PREPROCESSING, get_config,
)
from nnssl_plugins.pretrain.hiend_mae.model import (
    HiEndMAE, build_model, compute_loss, default_attend_layers,
)
from nnssl_plugins.pretrain.mae_common.optim import configure_optimizer
from nnssl_plugins.pretrain.mae_common.pictures import save_pictures_from_logs

__all__ = ["CONFIGS", "HIEND_PAPER_CONFIG", "HIEND_PRIMUS_B_CONFIG", "HIEND_TINY_CONFIG", "OPTIMIZER",
           "PREPROCESSING", "get_config", "HiEndMAE", "build_model", "compute_loss", "default_attend_layers",
           "configure_optimizer", "save_pictures_from_logs"]
