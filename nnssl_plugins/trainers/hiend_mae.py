"""Hi-End-MAE pretraining trainer: thin wiring of pretrain/hiend_mae into nnU-Net's loop (shared MAE wiring:
trainers/mae_base.py)."""
from __future__ import annotations

from nnssl_plugins.pretrain.hiend_mae.model import build_model, compute_loss
from nnssl_plugins.trainers.mae_base import MAEPretrainTrainerBase, freeze_up_projection, mae_config_from_managers
from nnssl_plugins.trainers.smoke import nnsslSmokeRun


class HiEndMAEPretrainTrainer(MAEPretrainTrainerBase):
    method = "HiEndMAE"

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = False):
        return freeze_up_projection(build_model(mae_config_from_managers(plans_manager, configuration_manager),
                                                num_input_channels))

    def _method_loss(self, model, batch, return_pictures):
        return compute_loss(model, batch["data"], return_pictures=return_pictures)


class HiEndMAEPretrainTrainer_smoke(nnsslSmokeRun, HiEndMAEPretrainTrainer):
    pass
