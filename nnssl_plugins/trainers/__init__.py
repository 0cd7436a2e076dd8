"""Every nnU-Net trainer class of the package (stock `nnUNetv2_train -tr <Name>` finds them here)."""
from nnssl_plugins.trainers.pretrain_base import nnsslPretrainTrainer  # noqa: F401
from nnssl_plugins.trainers.mdae import (  # noqa: F401
    MDAEPretrainTrainer, MDAEPretrainTrainer_smoke, MDAEPretrainTrainer_flow, MDAEPretrainTrainer_fixedMask50,
    MDAEPretrainTrainer_flow_smoke,
)
