"""MDAE pretraining trainer: thin wiring of pretrain/mdae into nnU-Net's loop (optimizer: nnU-Net's SGD + poly,
the authors' nnssl defaults for ResEnc)."""
from __future__ import annotations

from typing import Optional

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnssl_plugins.pretrain.mdae.corruption import corrupt
from nnssl_plugins.pretrain.mdae.loss import mdae_loss
from nnssl_plugins.pretrain.mdae.model import MDAENetwork
from nnssl_plugins.trainers.pretrain_base import nnsslPretrainTrainer
from nnssl_plugins.trainers.smoke import nnsslSmokeRun


class MDAEPretrainTrainer(nnsslPretrainTrainer):
    method = "MDAE"
    corruption: str = "ve"            # 've' (paper) or 'flow' (authors' main model)
    sigma_max: float = 5.0
    block_size: int = 16
    mask_ratio: Optional[float] = None  # None: p_mask ~ U(0.01, 0.99) per sample and channel
    lambda_masked: float = 1.0
    lambda_visible: float = 1.0

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = False):
        # reconstruction: as many outputs as input channels, whatever the dataset's labels say
        backbone = get_network_from_plans(configuration_manager.network_arch_class_name,
                                          configuration_manager.network_arch_init_kwargs,
                                          configuration_manager.network_arch_init_kwargs_req_import,
                                          num_input_channels, num_input_channels, allow_init=True,
                                          deep_supervision=False)
        return MDAENetwork(backbone)

    def compute_loss(self, batch: dict):
        data = batch["data"]
        c = corrupt(data, self.corruption, self.sigma_max, self.block_size, self.mask_ratio)
        pred = self.network(c.x_in, c.t)
        return mdae_loss(pred, data, c, self.lambda_masked, self.lambda_visible)

    def adaptation_plan_extras(self) -> dict:
        return {"mdae": {"corruption": self.corruption, "sigma_max": self.sigma_max, "block_size": self.block_size,
                         "mask_ratio": self.mask_ratio}}


class MDAEPretrainTrainer_smoke(nnsslSmokeRun, MDAEPretrainTrainer):
    pass


class MDAEPretrainTrainer_flow(MDAEPretrainTrainer):
    corruption = "flow"


class MDAEPretrainTrainer_fixedMask50(MDAEPretrainTrainer):
    mask_ratio = 0.5


class MDAEPretrainTrainer_flow_smoke(nnsslSmokeRun, MDAEPretrainTrainer_flow):
    pass
